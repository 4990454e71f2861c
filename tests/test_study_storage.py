"""The study file survives what kills tuners: a torn last journal record is cut, with a backup kept."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autotune.study import open_storage, repair_torn_tail, study_to_read

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _journal(path: Path, n: int = 3) -> bytes:
    study = optuna.create_study(study_name="s", storage=open_storage(str(path)))
    for i in range(n):
        t = study.ask()
        study.tell(t, float(i))
    return path.read_bytes()


def _states(path: Path) -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name="s", storage=open_storage(str(path))).trials]


@pytest.mark.parametrize("tail", [b"", b"{not json at all}\n"])
def test_torn_last_record_is_cut_and_later_appends_survive(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "study.journal"
    whole = _journal(path)
    torn = whole[:-25] + tail  # the last tell() half written, maybe followed by a garbled line
    path.write_bytes(torn)
    note = repair_torn_tail(path)
    assert "torn last record" in note and (tmp_path / "study.journal.torn-1").read_bytes() == torn
    assert _states(path) == ["COMPLETE", "COMPLETE", "RUNNING"]  # only the torn tell is lost
    study = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    t = study.ask()
    study.tell(t, 9.0)
    assert _states(path) == ["COMPLETE", "COMPLETE", "RUNNING", "COMPLETE"]


def test_whole_journal_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    whole = _journal(path)
    assert repair_torn_tail(path) == ""
    assert path.read_bytes() == whole and not list(tmp_path.glob("*.torn-*"))


def test_without_repair_optunas_next_append_is_lost(tmp_path: Path) -> None:
    """Why the repair exists: Optuna appends right after a torn line and the new record is unreadable."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = tmp_path / "study.journal"
    path.write_bytes(_journal(path)[:-25])
    study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    with pytest.raises(Exception):  # noqa: B017 - whatever Optuna raises, the append did not land
        t = study.ask()
        study.tell(t, 9.0)
        assert len(optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path)))).trials) == 4


def test_a_requeued_trial_counts_once_against_the_budget() -> None:
    """An interrupted (or stale) trial ends FAIL and its parameters are queued again: the budget counts the
    copy when it ends, not the failed original as well (a resumed --trials 6 ran 5 stacks)."""
    import optuna
    from optuna.trial import TrialState

    from autotune.study import finished_trials, requeue_once

    study = optuna.create_study()
    done = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(done, 1.0)
    cut = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(cut, state=TrialState.FAIL)
    assert requeue_once(study, cut.number, cut.params, {})
    assert finished_trials(study) == 1
    copy = study.ask()
    study.tell(copy, 2.0)
    assert finished_trials(study) == 2
    lost = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # a plain failure still counts
    study.tell(lost, state=TrialState.FAIL)
    assert finished_trials(study) == 3


def test_a_reader_of_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    """`wanctl report --storage sqlite:////typo.db` left a 114 KB empty database behind."""
    from autotune.study import open_storage
    from recipes.errors import BadInput

    url = f"sqlite:///{tmp_path / 'typo.db'}"
    with pytest.raises(BadInput, match="no SQLite study database at"):
        open_storage(url, create=False)
    assert not (tmp_path / "typo.db").exists()
    open_storage(url)  # a tuner creates it
    assert (tmp_path / "typo.db").is_file()
    open_storage(url, create=False)  # and a reader then opens it


def test_a_reader_takes_the_only_study_and_lists_several(tmp_path: Path) -> None:
    """`wanctl report` asked for --study even of a tune's own journal, which holds one study."""
    from recipes.errors import BadInput

    url = str(tmp_path / "study.journal")
    open_storage(url)
    with pytest.raises(BadInput, match="holds no study"):
        study_to_read(url)
    optuna.create_study(study_name="tiny_a", storage=open_storage(url))
    assert study_to_read(url) == "tiny_a" and study_to_read(url, "other") == "other"
    optuna.create_study(study_name="tiny_b", storage=open_storage(url))
    with pytest.raises(BadInput, match="holds 2 studies: tiny_a, tiny_b") as e:
        study_to_read(url)
    assert e.value.hint == "name one with --study NAME"
    with pytest.raises(BadInput, match="no study journal"):
        study_to_read(str(tmp_path / "typo.journal"))


def test_a_study_a_live_tuner_holds_is_refused_naming_its_pid_and_host(tmp_path: Path) -> None:
    """Two `tune --resume` at once on one journal both ran: the second failed the first's live baseline as
    a killed tuner's. The second is refused, told who holds the study; a killed holder blocks nothing."""
    import os
    import signal
    import socket

    from autotune.study import hold_study, study_lock_path
    from recipes.errors import StudyBusy
    from tests.conftest import study_held_elsewhere

    url = str(tmp_path / "study.journal")
    with study_held_elsewhere(url, "s") as (holder, trial_child):
        with pytest.raises(StudyBusy) as refused:
            with hold_study(url, "s"):
                pytest.fail("a second tuner held a study another one holds")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in refused.value.message
        assert refused.value.exit_code == 2 and "postgresql://" in refused.value.hint
        with hold_study(url, "other"):  # another study in the same journal has a tuner of its own
            pass
        os.kill(holder.pid, signal.SIGKILL)  # a killed tuner; its trial's process lives on for now
        holder.wait(timeout=30)
        assert os.path.exists(f"/proc/{trial_child}")
        with hold_study(url, "s"):  # free at once: the kernel dropped the lock, and no child inherited it
            assert str(os.getpid()) in study_lock_path(tmp_path / "study.journal", "s").read_text()


def test_a_study_name_that_is_no_file_name_gets_a_lock_file_of_its_own(tmp_path: Path) -> None:
    from autotune.study import hold_study, study_lock_path

    journal = tmp_path / "study.journal"
    paths = {study_lock_path(journal, name) for name in ("a/b", "a_b", "a?b", "x" * 300)}
    assert len(paths) == 4 and all(p.parent == tmp_path and len(p.name) < 200 for p in paths)
    with hold_study(str(journal), "a/b"), hold_study(str(journal), "a_b"):
        pass


def test_rdb_studies_are_not_locked(tmp_path: Path) -> None:
    """Several tuners share an RDB study (heartbeats tell their running trials apart)."""
    from autotune.study import hold_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    with hold_study(url, "s"), hold_study(url, "s"):
        pass
    assert not list(tmp_path.iterdir())
