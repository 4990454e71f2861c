"""Optuna storage and study handling: journal file on one host, RDB (SQLite/PostgreSQL) across hosts.

Optuna advises the journal file over SQLite for several workers on one host, and an RDB for several hosts.
The journal storage has no heartbeat, so a tuner killed mid-trial leaves a RUNNING trial behind: on
``--resume`` such trials are marked FAIL and their parameters re-queued once. On an RDB storage the
heartbeat does that (``RetryHeartbeatStaleTrialCallback``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from recipes.errors import BadInput, StudyError
from recipes.files import check_creatable, create_exclusive_text, user_path
from recipes.locations import TUNE_OUTPUTS

log = logging.getLogger(__name__)

REQUEUED_KEY = "wanctl_requeued"
HEARTBEAT_S = 60
SCHEMA_RACE_TRIES = 3
GRACE_S = 180


RDB_DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb", "mssql", "oracle", "cockroachdb")
"""SQLAlchemy dialects (``dialect[+driver]://``) opened as Optuna's RDBStorage."""


def is_rdb_url(url: str) -> bool:
    """``dialect[+driver]://...`` for one of RDB_DIALECTS."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return scheme.split("+", 1)[0].lower() in RDB_DIALECTS


_SQLITE_MAGIC = b"SQLite format 3\x00"


def journal_path(url: str) -> Path | None:
    """The journal file a storage string names, or None for an RDB URL; anything else is refused.

    Refused rather than guessed: an unknown scheme (``postgres://`` is a common misspelling) would
    otherwise become a local file named after the URL, and every host would tune its own study.
    """
    if is_rdb_url(url):
        return None
    if "://" in url and not url.startswith("journal://"):
        scheme = url.split("://", 1)[0]
        fix = "postgresql://" if scheme in ("postgres", "pg", "psql") else "a path, journal://PATH, sqlite:///PATH"
        raise BadInput(f"storage {url!r}: unknown scheme {scheme}://",
                       f"use {fix} (also postgresql://..., mysql://...)")
    return Path(url.removeprefix("journal://")).expanduser()


def check_storage(url: str) -> None:
    """What can be known of a --storage before any work: a journal that is no journal, an SQLite file whose
    folder cannot hold it (SQLAlchemy only says "unable to open database file")."""
    path = journal_path(url)
    if path is not None:
        check_journal(path)
        check_creatable(path, "write the study journal")
    elif url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        db = Path(url.removeprefix("sqlite:///")).expanduser()
        with user_path(db, "open the SQLite study database"):
            if db.is_dir():
                raise BadInput(f"storage {db} is a directory", f"pass a file, e.g. sqlite:///{db / 'study.db'}")
            if not db.exists() and not db.parent.is_dir():
                raise BadInput(f"cannot create the SQLite study database {db}: the folder {db.parent} does not exist "
                               "or is not a folder", "create the folder first, or pass another path")


def check_journal(path: Path) -> None:
    """Refuse a file that is not an Optuna journal before anything writes to it.

    The torn-tail repair cuts whatever does not parse, so a notes file or an SQLite database passed as
    ``--storage`` would be rewritten as a journal (its old self only in a ``.torn`` backup).
    """
    with user_path(path, "read the study journal"):
        if path.is_dir():
            raise BadInput(f"storage {path} is a directory", f"pass a file, e.g. {path / 'study.journal'}")
        if not path.is_file() or path.stat().st_size == 0:
            return
        with open(path, "rb") as fh:
            head = fh.read(65536)
    if head.startswith(_SQLITE_MAGIC):
        raise BadInput(f"storage {path} is an SQLite database, not a journal file", f"pass sqlite:///{path}")
    first = head.split(b"\n", 1)[0]
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    torn_first = b"\n" not in head and (first.startswith(b'{"op_code"') or b'{"op_code"'.startswith(first))
    if not (isinstance(record, dict) and "op_code" in record) and not torn_first and len(first) < 65536:
        raise BadInput(f"storage {path} is not an Optuna journal (its first line is no journal record); "
                       "it was left untouched", "pass a new path for the study, or the journal a tuner wrote")


def open_storage(url: str, create: bool = True) -> Any:
    """A storage object for ``url``: a path (or ``journal://PATH``) is a journal file, else an RDB URL.

    Readers pass ``create=False``: a mistyped path is then an error, not a new empty journal.
    """
    path = journal_path(url)
    if path is None and not create and url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        db = Path(url.removeprefix("sqlite:///"))
        if not db.is_file():  # SQLAlchemy would create an empty database file there
            raise BadInput(f"no SQLite study database at {db}", "check the path after sqlite:/// (three slashes, "
                           "then the file; four for an absolute path)")
    if path is None:
        cb = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        kwargs: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
        if cb is not None:  # Optuna >= 4.9 names it heartbeat_stale_trial_callback
            key = ("heartbeat_stale_trial_callback"
                   if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                   else "failed_trial_callback")
            with warnings.catch_warnings():  # "experimental" since Optuna 2.8, and the documented way
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                kwargs[key] = cb(max_retry=1)
        for attempt in range(SCHEMA_RACE_TRIES):
            try:
                with warnings.catch_warnings():  # heartbeat arguments are "experimental" since Optuna 2.8
                    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, **kwargs)
            except ImportError as exc:
                raise StudyError(f"storage {url}: driver missing ({exc})", "pip install 'wanctl[postgres]'") from None
            except Exception as exc:  # sqlalchemy raises many types for a bad URL or an unreachable server
                # Tuners started together on an empty database race to create Optuna's tables; the loser
                # sees a unique violation (SQLite: on alembic_version, or the file still locked by the
                # winner), and the tables exist by the time it retries.
                raced = any(k in str(exc) for k in ("already exists", "duplicate key", "UniqueViolation",
                                                    "UNIQUE constraint failed", "database is locked"))
                if raced and attempt + 1 < SCHEMA_RACE_TRIES:
                    log.info("storage %s: schema created concurrently by another tuner; retrying", url)
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise StudyError(f"cannot open storage {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                                 "check the URL, the server and the credentials") from None
    check_journal(path)
    if not create and not path.is_file():
        raise BadInput(f"no study journal at {path}", "pass the --storage (or --out) the tuner wrote to")
    with user_path(path.parent, "create the folder for the study journal"):
        path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as exc:  # a torn or foreign file surfaces as JSON/Key errors from the replay
        raise StudyError(f"study journal {path} is unreadable: {type(exc).__name__}: {exc}",
                         "move it aside and start a new study, or restore it from a backup") from None


OUT_MARKER = ".wanctl-study"
"""File in a tune's output folder naming the study whose trials, references and recipe are there."""


def claim_output_dir(out: Path, study: str) -> None:
    """Make ``out`` this study's, or refuse: two studies in one folder share ``trials/NNNN-*`` and the
    baseline's reference frames, so one study's trials would be judged against the other's baseline."""
    marker = out / OUT_MARKER
    held = _study_holding(marker)
    if held and held != study:
        raise BadInput(f"{out} holds the outputs of study {held!r} (its trials, references and recipe); study "
                       f"{study!r} would overwrite them", "pass another --out for this study")
    if not held:
        theirs = [name for name in TUNE_OUTPUTS.values() if (out / name).exists()]
        if theirs:  # not a study's folder, yet it has files a tune writes: the user's own, never replaced
            raise BadInput(f"{out} already holds {', '.join(theirs)} that no wanctl study wrote (it has no "
                           f"{OUT_MARKER}); this tune would replace them", "pass another --out, or move those files")
        if not create_exclusive_text(marker, study + "\n"):  # another study claimed it since the read
            held = _study_holding(marker)
            if held != study:
                raise BadInput(f"{out} was just claimed by study {held!r} (another tune started there at the same "
                               f"time); study {study!r} would overwrite its outputs", "pass another --out for this study")


def _study_holding(marker: Path) -> str:
    """The study named in an output folder's marker: "" when there is none, "?" when it cannot be read."""
    try:
        return marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError):
        return "?"


@contextmanager
def ask_lock(url: str) -> Iterator[None]:
    """Hold while taking a trial from a SQLite study shared by several tuners on this host.

    SQLite has no row locks (Optuna's SELECT ... FOR UPDATE is a no-op there), so two tuners could both
    pop the same queued trial, measure it twice, and the second would die telling a finished trial
    (measured: two tuners on one file, 1 run in 8). A lock file next to the database makes taking a trial
    one step at a time; PostgreSQL locks the row itself, and a journal study takes one tuner at a time.
    """
    if not url.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(url.removeprefix("sqlite:///"))
    with open(db.with_name(db.name + ".ask.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def repair_torn_tail(path: Path) -> str:
    """Cut a torn last record (a tuner killed mid-append, a full disk) off a journal file; keep a backup.

    Optuna's reader skips a partial last line, but its next append lands right after it, on the same line,
    and that record is then lost too. Under the journal's own lock (a writer mid-append holds it), the
    tail after the last complete, parseable line is cut, after copying the file to ``PATH.torn-N``.
    Called by the tuner (the only writer) before it opens the study; readers such as ``wanctl report``
    leave the file alone (Optuna's reader skips the torn line). Returns a note ("" when the file was whole).
    """
    if not path.is_file() or path.stat().st_size == 0:
        return ""
    check_journal(path)
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    if not lock.acquire():
        return ""
    try:
        data = path.read_bytes()
        keep = len(data)
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        while keep > 0:  # the last complete line must parse, or it is torn too (a crash mid-write)
            start = data.rfind(b"\n", 0, keep - 1) + 1
            try:
                json.loads(data[start:keep])
                break
            except ValueError:
                keep = start
        if keep == len(data):
            return ""
        n = 1
        while path.with_name(f"{path.name}.torn-{n}").exists():
            n += 1
        backup = path.with_name(f"{path.name}.torn-{n}")
        try:
            shutil.copy2(path, backup)
        except OSError as exc:  # e.g. the disk that tore the record is still full: cut nothing unbacked
            backup.unlink(missing_ok=True)
            note = (f"study journal {path} ends in a torn record, left as is: no room for a backup "
                    f"({exc.strerror}); free space before resuming")
            log.warning("%s", note)
            return note
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
        note = (f"study journal {path}: cut a torn last record ({len(data) - keep} bytes: a writer was killed "
                f"mid-append); the file as found is kept as {backup.name}")
        log.warning("%s", note)
        return note
    finally:
        lock.release()


def load_or_create(storage: Any, name: str, directions: list[str], sampler: Any, resume: bool
                   ) -> tuple[optuna.Study, bool]:
    """The study ``name`` and whether this call created it.

    Without ``resume`` an existing study is an error (nothing is mixed by accident). With it, tuners on
    several hosts may start together: the storage's unique name decides which one creates the study (and
    enqueues the plan); the others join it.
    """
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if name in names and not resume:
        raise BadInput(f"study {name!r} already exists in this storage",
                       "pass --resume to continue it, or --study NEW_NAME to start another")
    if name not in names:
        try:
            return optuna.create_study(study_name=name, storage=storage, directions=directions,
                                       sampler=sampler), True
        except optuna.exceptions.DuplicatedStudyError:
            if not resume:
                raise BadInput(f"study {name!r} was just created by another tuner",
                               "pass --resume to join it, or --study NEW_NAME to start another") from None
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def requeue_once(study: optuna.Study, number: int, params: dict[str, Any], user_attrs: dict[str, Any]) -> bool:
    """Queue a failed trial's parameters again, unless it was itself a re-queue (so a stack that kills its
    tuner every time is tried twice, not forever). True when queued."""
    if not params or REQUEUED_KEY in user_attrs:
        return False
    study.enqueue_trial(params, user_attrs={REQUEUED_KEY: number}, skip_if_exists=False)
    return True


def recover_stale(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a killed tuner as FAIL; re-queue each one's parameters once.

    Only safe when no other tuner works on this study right now (journal storage has no heartbeat to tell
    a live trial from a dead one); the CLI says so in --resume's help.
    """
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    requeued = []
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, "wanctl_stale", "killed tuner; marked failed on resume")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # noqa: SLF001 - no public API
        if requeue_once(study, t.number, t.params, t.user_attrs):
            requeued.append(t.number)
        log.warning("trial %d was left running by a killed tuner: marked failed%s", t.number,
                    ", re-queued" if t.number in requeued else "")
    return requeued


def has_heartbeat(study: optuna.Study) -> bool:
    """RDB storages (PostgreSQL across hosts, SQLite) carry heartbeats; a journal file does not."""
    storage = study._storage  # noqa: SLF001 - the study's own storage
    get = getattr(storage, "get_heartbeat_interval", None)  # BaseHeartbeat's public method
    return get is not None and get() is not None


def recover(study: optuna.Study) -> list[int]:
    """Resume-time recovery of trials a dead tuner left RUNNING; returns the re-queued trial numbers.

    With heartbeats, only trials whose heartbeat went stale are failed (and re-queued once by the
    storage's RetryHeartbeatStaleTrialCallback): another live tuner's running trial is left alone. Without
    (journal), every RUNNING trial is presumed dead, which is why a journal study takes one tuner at a time.
    """
    if has_heartbeat(study):
        optuna.storages.fail_stale_trials(study)
        return []
    return recover_stale(study)


@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat while it runs (ask/tell gets none from Optuna; optimize() would)."""
    storage = study._storage  # noqa: SLF001
    if not has_heartbeat(study):
        yield
        return
    stop = threading.Event()
    interval = storage.get_heartbeat_interval()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial._trial_id)  # noqa: SLF001
            except Exception as exc:  # a storage hiccup must not kill the trial; the next beat retries
                log.warning("heartbeat of trial %d not recorded: %s", trial.number, exc)
            if stop.wait(interval):
                return

    t = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=30)


def finished_trials(study: optuna.Study) -> int:
    """Trials that ended (complete, failed, pruned): what a trial budget counts.

    A failed trial whose parameters were re-queued (interrupted, left running by a killed tuner, stale
    heartbeat) is not counted: its copy is, once it ends; counting both spent the budget twice on one stack.
    """
    trials = study.get_trials(deepcopy=False)
    replaced = {t.user_attrs.get(REQUEUED_KEY) for t in trials}
    replaced |= {getattr(t, "system_attrs", {}).get("failed_trial") for t in trials}  # Optuna's retry callbacks
    return sum(1 for t in trials if t.state.is_finished()
               and not (t.state == TrialState.FAIL and t.number in replaced))
