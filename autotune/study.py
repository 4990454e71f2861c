"""Optuna storage and study handling: journal file on one host, RDB (SQLite/PostgreSQL) across hosts.

The journal storage has no heartbeat, so a tuner killed mid-trial leaves a RUNNING trial behind: on
``--resume`` such trials are marked FAIL and their parameters re-queued once. That is only right when no
other tuner is running the study, so a journal study is held by one tuner at a time (``hold_study``). On
an RDB storage the heartbeat tells a dead tuner's trial from a live one (``RetryHeartbeatStaleTrialCallback``),
and several tuners share a study.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autotune.choice import CLIMB_ROLES
from recipes.errors import BadInput, StudyBusy, StudyError
from recipes.files import check_creatable, create_exclusive_text, file_mode, user_path
from recipes.locations import TUNE_OUTPUTS
from recipes.records import OUTCOME_KEY

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


def study_to_read(url: str, name: str = "") -> str:
    """``name``, else the one study ``url`` holds: ``wanctl report`` asked for --study even of a tune's own journal,
    which holds one. Several are listed by name for the user to pick."""
    if name:
        return name
    names = sorted(optuna.study.get_all_study_names(open_storage(url, create=False)))
    if len(names) == 1:
        return names[0]
    if not names:
        raise BadInput(f"{url} holds no study", "pass the --storage a wanctl tune wrote to (its --out folder's "
                       "study.journal, or its --storage URL)")
    raise BadInput(f"{url} holds {len(names)} studies: {', '.join(names)}", "name one with --study NAME")


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


def study_lock_path(journal: Path, study: str) -> Path:
    """The lock file of study ``study`` in ``journal``: beside it, one per study (several studies may share a
    journal file, each with its own tuner). A name that is not plain file-name text is made so, with a digest
    of the whole name to keep two such studies apart."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", study)
    if slug != study or len(slug) > 100:
        slug = f"{slug[:80]}-{hashlib.sha256(study.encode()).hexdigest()[:12]}"
    return journal.with_name(f"{journal.name}.{slug}.lock")


HOLDER_READ_S = 1.0
"""How long a refused tuner waits for the holder to write its pid and host (it locks, then writes)."""


@contextmanager
def hold_study(url: str, study: str) -> Iterator[None]:
    """Hold a journal study for this tuner's lifetime; refuse (StudyBusy, naming pid and host) if another has it.

    A journal has no heartbeat, so a resuming tuner takes every RUNNING trial for a killed tuner's
    (``recover_stale``): two ``tune --resume`` started together (two ``make demo``) both ran, the second
    failed the first's live baseline, measured a second one, ran more trials than asked and compared
    stacks with two baselines. So the tuner takes this lock before it repairs, recovers or asks anything.

    It is an ``flock`` on a file beside the journal (``study_lock_path``), held by an open descriptor that
    trial processes do not inherit: the kernel releases it when the tuner dies, however it dies, so a
    killed tuner never blocks ``--resume``. The file is never deleted (a deleted lock file lets a third
    tuner lock a new file while the second still holds the old one); it holds the last holder's pid, host
    and start time, which only mean something while the lock is held.

    On NFS, Linux emulates flock with POSIX record locks (since 2.6.12), which hold across clients; a mount
    with ``local_lock=flock`` or ``local_lock=all`` keeps them per client, and tuners on two hosts could then
    both hold one study (a journal is for one host; use PostgreSQL across hosts). A file system with no locks
    at all is refused. RDB storages are not locked here: several tuners share them by design.
    """
    path = journal_path(url)
    if path is None:
        yield
        return
    import fcntl

    lock = study_lock_path(path, study)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode(0o666))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the tuner's disk-full message says what to do
        raise BadInput(f"cannot create the study's lock file {lock}: {exc.strerror}",
                       "pass a --storage (or --out) in a folder you can write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            raise StudyBusy(f"study {study!r} in {path} is being tuned by {holder}; a journal study takes one "
                            "tuner at a time (a second one would take the first's running trial for a killed "
                            "tuner's)", "wait for that tuner to finish, then run this command again (--resume "
                            "continues the study); or pass another --out (or --study) to tune a separate study; "
                            "for several tuners on one study, use --storage postgresql://... (or sqlite:///... "
                            "on one host)", holder=holder) from None
        except OSError as exc:
            raise StudyError(f"cannot lock study {study!r} in {path}: {exc.strerror} (this file system has no "
                             "file locks)", "put the study's journal on a local disk (--storage PATH or --out), "
                             "or use --storage postgresql://...") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "study": study,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the holder's line stays until the next holder replaces it


def _lock_holder(fd: int) -> str:
    """'pid N on host H (since T)' from a held lock file. The holder writes it just after locking, so an
    empty file, or the line of an earlier holder that is dead on this host, is read again for a moment."""
    deadline = time.monotonic() + HOLDER_READ_S
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            info = None
        if isinstance(info, dict) and isinstance(info.get("pid"), int):
            pid, host = info["pid"], str(info.get("host", "?"))
            if host != socket.gethostname() or _alive(pid) or time.monotonic() > deadline:
                return f"pid {pid} on host {host}" + (f" (since {info['since']})" if info.get("since") else "")
        elif time.monotonic() > deadline:
            return "another wanctl tune (its pid and host could not be read from the lock file)"
        time.sleep(0.05)  # the holder is writing its line


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    leave the file alone and say what Optuna's reader skipped (``open_for_reading``). Returns a note (""
    when the file was whole).
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
        keep = _intact_length(data)
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


def _intact_length(data: bytes) -> int:
    """Bytes of a journal up to the end of its last complete, parseable record."""
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
    return keep


TAIL_SETTLE_S = 0.2
"""A tail that does not parse is looked at again after this long: a live tuner may be mid-append."""


def unread_tail(path: Path) -> str:
    """A note on the torn tail Optuna's reader skips in ``path`` ("" when there is none); reads only.

    Optuna skips a torn last record without a word, so ``wanctl report`` on a journal a tuner was killed
    writing reported the surviving part as if it were the whole study. Readers leave the file as it is (the
    next ``tune --resume`` cuts the tail under the journal's lock, keeping a backup); they say what they left
    out. A tail that changes within TAIL_SETTLE_S was a live writer's append, not a torn one.
    """
    for _ in range(3):
        try:
            data = path.read_bytes()
            keep = _intact_length(data)
            if keep == len(data):
                return ""
            time.sleep(TAIL_SETTLE_S)
            if path.stat().st_size == len(data):
                return (f"study journal {path} ends in a torn record ({len(data) - keep} bytes: a tuner killed "
                        "mid-append, or a full disk), left out of what was read here; the file was not changed "
                        "(the next wanctl tune --resume cuts it, keeping a backup)")
        except FileNotFoundError:
            return ""
    return ""  # still growing: a live tuner's appends, not a torn tail


def open_for_reading(url: str) -> tuple[Any, list[str]]:
    """The storage at ``url`` for a reader (``wanctl report``) and notes on what reading it left out, each also
    logged as a warning (stderr). Never creates or changes anything."""
    storage = open_storage(url, create=False)
    notes = []
    path = journal_path(url)
    if path is not None and (note := unread_tail(path)):
        log.warning("%s", note)
        notes.append(note)
    return storage, notes


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


def is_requeued(trial: optuna.trial.FrozenTrial) -> bool:
    """A copy of a trial that did not finish: ours (killed or interrupted tuner) or Optuna's heartbeat retry."""
    return REQUEUED_KEY in trial.user_attrs or "failed_trial" in trial.system_attrs


def ask_requeued_first(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``, except that a re-queued copy, or a ladder's climb (a finalist, a rung-3 run), is taken
    before the rest of the queue (a climb is queued when the ladder's search ends, behind plan stacks that
    will not run now).

    Optuna hands out the oldest waiting trial, and a copy is queued behind the whole plan: after a kill
    and ``--resume`` the trial budget was spent on the plan's later stacks and the killed stack never ran
    (an uninterrupted study emitted cache=magcache at 1.98x, the killed and resumed one another stack at
    1.67x). Taken first, the copy runs where the original would have, and a resumed study measures the
    stacks an uninterrupted one does. The claim is the one ``ask()`` makes (Optuna has no public call to
    take a given waiting trial): it succeeds for one worker only, on every storage.
    """
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if not (is_requeued(t) or t.user_attrs.get("wanctl_role") in CLIMB_ROLES):
            continue
        try:
            claimed = study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)  # noqa: SLF001
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker took it and ended it since
            continue
        if claimed:
            return optuna.trial.Trial(study, t._trial_id)  # noqa: SLF001
    return study.ask()


def recover_stale(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a killed tuner as FAIL; re-queue each one's parameters once.

    Only safe when no other tuner works on this study right now (journal storage has no heartbeat to tell
    a live trial from a dead one): the tuner holds the study (``hold_study``) before it calls this.
    """
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    requeued = []
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, "wanctl_stale", "killed tuner; marked failed on resume")
        study._storage.set_trial_user_attr(t._trial_id, OUTCOME_KEY, "killed")  # noqa: SLF001
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
