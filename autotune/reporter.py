"""What the CLI's live view (or a test) hears from a tune: trials starting and ending, progress, notes."""

from __future__ import annotations

import logging
from typing import Protocol

from recipes.records import TrialRecord

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """What the CLI's live view (or a test) hears from the tuner."""

    def trial_started(self, number: int, total: int | None, role: str, label: str) -> None: ...
    def progress(self, done: int, total: int) -> None: ...
    def trial_finished(self, record: TrialRecord, best: TrialRecord | None) -> None: ...
    def message(self, text: str) -> None: ...


class NullReporter:
    def trial_started(self, number: int, total: int | None, role: str, label: str) -> None:
        log.info("trial %d (%s): %s", number, role, label)

    def progress(self, done: int, total: int) -> None:
        pass

    def trial_finished(self, record: TrialRecord, best: TrialRecord | None) -> None:
        log.info("trial %d: %s %s", record.number, record.outcome, record.reason)

    def message(self, text: str) -> None:
        log.info("%s", text)
