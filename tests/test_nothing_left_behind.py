"""Nothing left behind: a video run (wanctl generate, launch.sh, the runtime itself) that succeeds, fails or is
stopped leaves only the video (when it made one) in the user's folder, no work folder under $TMPDIR, no runtime
process, and says nothing on the user's terminal that was meant for a parent process.

Each runtime process costs seconds of CPU (torch's import), so one run serves several checks, each asserted in a
test of its own: the successful launch.sh run and the successful wanctl generate run are module fixtures, each
made with --force over a video of the user's (that --force replaces it: tests/test_no_overwrite.py's promise,
checked here), generate's with a recipe tuned on another machine (the note it prints: a check moved here from
tests/test_cli_bad_input.py, as is the refusal of a corrupt image, on the failed generate). The trial runner's
progress lines are checked on the finished trial of tests/test_trial_faults.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from recipes.files import move_into_place
from recipes.launch import render_launch_script
from recipes.recipe import Recipe
from recipes.spec import PROGRESS_ENV
from tests.conftest import ROOT, as_terminal_job, pids_naming

TINY = Recipe(model="tiny", size="64*48", frames=5, steps=2)
OLD_VIDEO = b"the user's earlier video"


def _dirs(root: Path) -> tuple[Path, Path]:
    cwd, tmp = root / "cwd", root / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    return cwd, tmp


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """The user's folder and a $TMPDIR of the test's own, to see what is left in each."""
    return _dirs(tmp_path)



def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp),
            "WANCTL_CACHE": str(tmp.parent / "cache"), **extra}


def _ours(tmp: Path) -> list[str]:
    """What wanctl left in $TMPDIR (torch's own inductor cache there is torch's, kept across runs on purpose)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("wanctl"))


def _files(cwd: Path) -> list[str]:
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))  # hidden ones too (.v.wanctl, .v.partial.mp4)


def _script(cwd: Path, recipe: Recipe = TINY) -> Path:
    sh = cwd / "launch.sh"
    sh.write_text(render_launch_script(recipe))
    return sh


def _wait_for(what: Callable[[], object], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------ launch.sh
@pytest.fixture(scope="module")
def launch_sh_ok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """One successful launch.sh run, as a user starts it (no progress lines asked for), with --force over a video
    of the user's: (its folder, its $TMPDIR, the finished process)."""
    cwd, tmp = _dirs(tmp_path_factory.mktemp("launch-ok"))
    sh = _script(cwd)
    (cwd / "v.mp4").write_bytes(OLD_VIDEO)
    env = {k: v for k, v in _env(tmp, OUT="v.mp4").items() if k != PROGRESS_ENV}
    p = subprocess.run(["bash", str(sh), "--force"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return cwd, tmp, p


def test_launch_sh_prints_only_what_is_meant_for_the_user_and_leaves_only_the_video(
        launch_sh_ok: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    """Every line it prints is checked, not only the known offenders (WANCTL_PROGRESS, kineto's USDT lines):
    whatever a library or the runtime starts printing for a parent shows up here."""
    cwd, tmp, p = launch_sh_ok
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == ""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"video: {cwd / 'v.mp4'} (5 frames"), p.stderr
    assert _files(cwd) == ["launch.sh", "v.mp4"]
    assert _ours(tmp) == []


def test_launch_sh_force_replaces_the_output(launch_sh_ok: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    """``./launch.sh --force`` writes over the script's OUT (tests/test_no_overwrite.py: refused without it)."""
    cwd, _, p = launch_sh_ok
    assert p.returncode == 0, p.stderr[-3000:]
    video = (cwd / "v.mp4").read_bytes()
    assert video != OLD_VIDEO and len(video) > 100


def test_a_failed_launch_sh_run_leaves_nothing(dirs: tuple[Path, Path]) -> None:
    cwd, tmp = dirs
    empty = tmp.parent / "not-a-checkpoint"
    empty.mkdir()
    sh = _script(cwd)
    p = subprocess.run(["bash", str(sh), "--trust-checkpoint", "--set", "size=832*480"], cwd=cwd,
                       env=_env(tmp, OUT="sub/v.mp4", MODEL_DIR=str(empty)), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]  # the runtime's own refusal, after its work folder existed
    assert "not-a-checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert _files(cwd) == ["launch.sh"]  # not even the video's folder
    assert _ours(tmp) == []



def _stop(p: subprocess.Popen[str], sig: int) -> str:
    """Ctrl-C as a terminal sends it (INT to the whole foreground group), TERM or HUP to the process alone;
    the stderr it printed until it ended."""
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    return p.communicate(timeout=90)[1]

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)],
                         ids=["TERM", "HUP", "INT"])
def test_a_stopped_launch_sh_run_leaves_nothing_and_no_process(sig: int, code: int, dirs: tuple[Path, Path]) -> None:
    """TERM or HUP to the script alone (a supervisor, a closed ssh session), INT to the whole group (Ctrl-C),
    once denoising has started (synchronised on the progress line the runtime prints when asked for it): the
    run stops at once with one word (bash ran its trap only after the foreground run ended, holding the GPU for
    the whole video), no half video, no raw frames."""
    cwd, tmp = dirs
    sh = _script(cwd, Recipe(model="tiny", size="64*48", frames=5, steps=400))
    p = subprocess.Popen(["bash", str(sh)], cwd=cwd, env=_env(tmp, OUT="v.mp4", **{PROGRESS_ENV: "1"}),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=as_terminal_job)
    try:
        for line in p.stdout:  # type: ignore[union-attr]
            if line.startswith("WANCTL_PROGRESS"):
                break
        t0 = time.monotonic()
        err = _stop(p, sig)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, err[-2000:]
    assert took < 30, took  # 400 steps would take minutes
    assert "interrupted" in err and "Traceback" not in err
    assert subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split() == []
    assert _files(cwd) == ["launch.sh"]
    assert _ours(tmp) == []


# ------------------------------------------------------------------ the runtime alone
def test_the_runtime_prints_progress_lines_only_for_a_parent_that_asks(
        dirs: tuple[Path, Path], launch_sh_ok: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    """Not asked: the runtime under launch.sh, whose stdout and stderr are the script's (launch_sh_ok). Asked: the
    runtime alone, in a work folder of its own under $TMPDIR, removed after. (The trial runner asks, and gets them:
    tests/test_trial_faults.py.)"""
    quiet = launch_sh_ok[2]
    assert quiet.returncode == 0 and quiet.stdout == "" and "USDT" not in quiet.stderr, quiet.stderr[-2000:]
    cwd, tmp = dirs
    cmd = [sys.executable, "-m", "wan_runtime", "generate", "--set", "model=tiny", "--set", "size=64*48",
           "--set", "frames=5", "--set", "steps=2"]
    asked = subprocess.run([*cmd, "--out", "b.mp4"], cwd=cwd, env=_env(tmp, **{PROGRESS_ENV: "1"}),
                           capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0 and asked.stdout.splitlines() == ["WANCTL_PROGRESS 1 2", "WANCTL_PROGRESS 2 2"]
    assert _files(cwd) == ["b.mp4"]
    assert _ours(tmp) == []


# ------------------------------------------------------------------ wanctl generate
def _generate(cwd: Path, tmp: Path, *args: str, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "generate", *args], cwd=cwd,
                            env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)  # type: ignore[call-overload]


ELSEWHERE = "1xH100-80GB_drv580_x"
"""The fingerprint of the machine generate_ok's recipe was tuned on: not this one."""


@pytest.fixture(scope="module")
def generate_ok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """One successful wanctl generate, with --force over a video of the user's, running a recipe tuned on another
    machine (--recipe, a file outside the user's folder): (its folder, its $TMPDIR, the finished process)."""
    from recipes.serialize import RecipeMeta, write_recipe

    cwd, tmp = _dirs(tmp_path_factory.mktemp("generate-ok"))
    recipe = tmp.parent / "h100.toml"
    write_recipe(recipe, Recipe(model="tiny", size="64*48", frames=5, steps=1),
                 RecipeMeta(name="h100", fingerprint=ELSEWHERE, speedup=1.3))
    (cwd / "v.mp4").write_bytes(OLD_VIDEO)
    p = _generate(cwd, tmp, "--recipe", str(recipe), "--out", "v.mp4", "--force")
    out, err = p.communicate(timeout=300)
    return cwd, tmp, subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_generate_leaves_only_the_video(generate_ok: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    cwd, tmp, p = generate_ok
    assert p.returncode == 0, p.stderr[-3000:]
    assert _files(cwd) == ["v.mp4"]
    assert _ours(tmp) == []


def test_generate_force_replaces_the_output(generate_ok: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    """``generate --force`` writes over an existing --out (tests/test_no_overwrite.py: refused without it)."""
    cwd, _, p = generate_ok
    assert p.returncode == 0, p.stderr[-3000:]
    video = (cwd / "v.mp4").read_bytes()
    assert video != OLD_VIDEO and len(video) > 100


def test_a_recipe_from_another_machine_is_named_as_such(
        generate_ok: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    """--recipe with an H100 recipe on this host ran into one missing knob after another with no word that
    it was tuned elsewhere. It is a note, not a refusal: the run goes on (bad input through the CLI is
    tests/test_cli_bad_input.py's; this one needs a whole run)."""
    _, _, p = generate_ok
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"was tuned on {ELSEWHERE}; this machine is " in " ".join(p.stderr.split())


def test_a_failed_generate_leaves_nothing(dirs: tuple[Path, Path]) -> None:
    """The runtime refuses the input after the run's work folder exists (it was left beside the video): here an
    i2v image that is no image (a PNG signature, then garbage), which only the runtime reads: exit 2, a message
    naming it and the fix, no video (tests/test_cli_bad_input.py's bad input, on a run it needs anyway). The
    runtime's refusal of a folder that is no checkpoint: the failed launch.sh run above."""
    cwd, tmp = dirs
    bad = tmp.parent / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    p = _generate(cwd, tmp, "--model", "tiny", "--task", "i2v-A14B", "--image", str(bad), "--steps", "2",
                  "--out", "sub/v.mp4")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    err_text = " ".join(err.split())  # Rich wraps long lines
    assert "is not a readable image" in err_text and "PNG or JPEG" in err_text and "Traceback" not in err
    assert _files(cwd) == []  # no work folder, no partial video, not even the video's folder
    assert _ours(tmp) == []


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGHUP, 129, "terminated")], ids=["INT", "TERM", "HUP"])
def test_a_stopped_generate_leaves_nothing_and_no_process(sig: int, code: int, said: str,
                                                         dirs: tuple[Path, Path]) -> None:
    """Ctrl-C (SIGINT to the terminal's foreground group, which the runtime, in a session of its own, is not
    in), a supervisor's TERM or a closed terminal's HUP to wanctl alone, once the runtime is running: wanctl
    kills it, removes its work folder and says so. TERM killed wanctl silently (exit 143, the runtime and the
    work folder left behind)."""
    cwd, tmp = dirs
    p = _generate(cwd, tmp, "--model", "tiny", "--size", "64*48", "--frames", "5", "--steps", "400", "--out",
                  "v.mp4", start_new_session=True, preexec_fn=as_terminal_job)
    try:
        _wait_for(lambda: pids_naming(tmp))  # the runtime process, named by its spec under $TMPDIR
        err = _stop(p, sig)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, err[-2000:]
    assert said in err and "Traceback" not in err
    assert pids_naming(tmp) == []  # the runtime went with it
    assert _files(cwd) == []
    assert _ours(tmp) == []


def test_a_terminated_tune_stops_its_trial_and_queues_it_again(dirs: tuple[Path, Path]) -> None:
    """TERM to a tuner mid-trial: no trial process left (a GPU held by an orphan), the trial marked failed and
    queued for --resume, as on Ctrl-C (it was left RUNNING)."""
    import optuna

    from autotune.study import open_storage

    cwd, tmp = dirs
    p = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "tune", "--model", "tiny", "--size", "64*48",
                          "--frames", "5", "--steps", "400", "--trials", "3", "--out", "o"], cwd=cwd, env=_env(tmp),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: pids_naming(cwd / "o" / "trials"), timeout=300)  # a trial process is running
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 143, err[-2000:]
    assert "terminated" in err and "Traceback" not in err
    assert pids_naming(cwd / "o") == []
    (study,) = optuna.get_all_study_summaries(open_storage(str(cwd / "o" / "study.journal"), create=False))
    trials = optuna.load_study(study_name=study.study_name, storage=open_storage(str(cwd / "o" / "study.journal"))).trials
    stopped = [t for t in trials if "wanctl_interrupted" in t.user_attrs]
    assert len(stopped) == 1 and stopped[0].state == optuna.trial.TrialState.FAIL
    assert "SIGTERM" in stopped[0].user_attrs["wanctl_interrupted"]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_term_inside_a_command_says_terminated_and_json_gets_an_error(monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str],
                                                                        json_flag: list[str]) -> None:
    """A real SIGTERM to this process, delivered inside a command: exit 143 with a word and, under --json, an
    error document; the handler is this command's only (the process's own is back afterwards)."""
    import json

    import cli
    import commands.generate

    def terminated(*a: object, **k: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(commands.generate, "build_recipe", terminated)
    monkeypatch.setattr(sys, "argv", ["wanctl", "generate", "--model", "tiny", *json_flag])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    captured = capsys.readouterr()
    assert "terminated (SIGTERM)" in captured.err
    if json_flag:
        assert json.loads(captured.out)["error"]["exit_code"] == 143
    else:
        assert captured.out == ""


# ------------------------------------------------------------------ the video's last step
def test_move_into_place_across_file_systems_leaves_no_temp_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A work folder under $TMPDIR is often another file system than the output's: a copy, then a rename."""
    import errno

    src, dst = tmp_path / "work" / "video.mp4", tmp_path / "out" / "v.mp4"
    src.parent.mkdir()
    dst.parent.mkdir()
    src.write_bytes(b"video" * 1000)
    real_replace = os.replace

    def cross_device(a: object, b: object) -> None:
        if Path(str(a)) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", cross_device)
    assert move_into_place(src, dst) == dst
    assert dst.read_bytes() == b"video" * 1000 and not src.exists()
    assert [p.name for p in dst.parent.iterdir()] == ["v.mp4"]

    def stopped(*a: object, **k: object) -> None:  # Ctrl-C (or a handled TERM) in the middle of the copy
        raise KeyboardInterrupt

    src.write_bytes(b"second video")
    (dst.parent / "w.mp4").unlink(missing_ok=True)
    monkeypatch.setattr("shutil.copyfileobj", stopped)
    with pytest.raises(KeyboardInterrupt):
        move_into_place(src, dst.parent / "w.mp4")
    assert [p.name for p in dst.parent.iterdir()] == ["v.mp4"]  # no half w.mp4, no temp file beside it
