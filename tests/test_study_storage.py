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
