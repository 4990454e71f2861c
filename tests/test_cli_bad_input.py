"""Bad input through the real CLI: exit code 2, a message naming the problem and the fix, nothing written.

Most cases run ``cli.main`` in this process (the ``cli_here`` fixture: the same entry, the same mapping of errors
to exit codes and streams, ~0.5 CPU-s less a case); a fresh process (``run_cli``) where the process is the point:
a failure and a usage error as a script sees them (exit status, JSON on stdout, the message on stderr), and Rich's
width taken from the terminal's COLUMNS. What needs a whole runtime run (an i2v image that is no image; a recipe
tuned on another machine, a note and not a refusal) is checked on the runs tests/test_nothing_left_behind.py makes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.recipe import Recipe
from recipes.serialize import RecipeMeta, write_recipe
from tests.conftest import CliHere, run_cli


def _err(p: object) -> str:
    return " ".join(p.stderr.split())  # type: ignore[attr-defined]  # Rich wraps long lines


def test_unknown_flag_and_out_of_range_value_exit_2(tmp_path: Path, cli_here: CliHere) -> None:
    env = {"WANCTL_CACHE": str(tmp_path / "c")}
    p = cli_here("tune", "--no-such-flag", env=env)
    assert p.returncode == 2 and "No such option" in _err(p)
    p = cli_here("generate", "--frames", "80", "--out", str(tmp_path / "v.mp4"), env=env)
    assert p.returncode == 2 and "frames" in _err(p) and "4n+1" in _err(p)
    assert not (tmp_path / "v.mp4").exists()


def test_empty_prompt_is_refused_before_anything_runs(tmp_path: Path, cli_here: CliHere) -> None:
    p = cli_here("tune", "--prompt", "  ", "--out", str(tmp_path / "o"), env={"WANCTL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 2 and "prompt is empty" in _err(p)
    assert not (tmp_path / "o").exists()


def test_generate_best_with_only_another_machines_recipe_names_it(tmp_path: Path, cli_here: CliHere) -> None:
    store = tmp_path / "tuned"
    write_recipe(store / "recipe.toml", Recipe(attention="_native_cudnn"),
                 RecipeMeta(name="tiny_h100x8_abcd1234", fingerprint="nvidia-h100-80gb-hbm3x8", speedup=1.3))
    p = cli_here("generate", "--best", "--model", "tiny", "--out-dir", str(store), "--out", str(tmp_path / "v.mp4"),
                env={"WANCTL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 2
    assert "recipes exist for other machines: nvidia-h100-80gb-hbm3x8" in _err(p) and "wanctl tune" in _err(p)
    assert not (tmp_path / "v.mp4").exists()


# An i2v image that is no image is refused by the runtime (exit 2, "is not a readable image", "PNG or JPEG", no
# video): tests/test_nothing_left_behind.py (test_a_failed_generate_leaves_nothing), on the run it fails anyway.


# ------------------------------------------------------------------ files and storages the user names
def test_a_file_that_is_not_a_journal_is_refused_and_left_untouched(tmp_path: Path, cli_here: CliHere) -> None:
    env = {"WANCTL_CACHE": str(tmp_path / "c")}
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nmore\n")
    db = tmp_path / "study.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(4080))
    for path, fragment in ((notes, "not an Optuna journal"), (db, f"pass sqlite:///{db}")):
        before = path.read_bytes()
        p = cli_here("tune", "--storage", str(path), "--out", str(tmp_path / "o"), env=env)
        assert p.returncode == 2 and fragment in _err(p), p.stderr
        assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))


def test_an_unknown_storage_scheme_is_refused_not_made_a_local_file(tmp_path: Path, cli_here: CliHere) -> None:
    p = cli_here("tune", "--storage", "postgres://me@dbhost/wan", "--resume", "--out", str(tmp_path / "o"),
                 cwd=tmp_path, env={"WANCTL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 2 and "unknown scheme postgres://" in _err(p) and "use postgresql://" in _err(p)
    assert not (tmp_path / "postgres:").exists()


def test_report_on_a_missing_or_unfinished_study_says_so_and_creates_nothing(tmp_path: Path,
                                                                            cli_here: CliHere) -> None:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    missing = tmp_path / "typo" / "study.journal"
    p = cli_here("report", "--study", "s", "--storage", str(missing), "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and "no study journal at" in _err(p)
    assert not missing.exists() and not missing.parent.exists()
    started = tmp_path / "started.journal"  # a tuner killed right after creating its study
    optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(started))))
    p = cli_here("report", "--study", "s", "--storage", str(started), "--out", str(tmp_path / "r"))
    assert p.returncode == 3 and "holds no tuner setup yet" in _err(p) and "Traceback" not in p.stderr


def test_outputs_that_cannot_be_written_fail_before_any_work(tmp_path: Path, cli_here: CliHere) -> None:
    env = {"WANCTL_CACHE": str(tmp_path / "c")}
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for args, fragment in ((("generate", "--out", str(a_file / "v.mp4")), "cannot create the output folder"),
                           (("generate", "--out", str(tmp_path)), "is a folder"),
                           (("tune", "--out", str(a_file)), "a file of that name is there"),
                           (("probe", "--no-kernels", "--save", str(tmp_path)), "is a folder"),
                           (("download", "--offline", "--dir", str(a_file / "ckpt")), "cannot create the download folder")):
        p = cli_here(*args, env=env)
        assert p.returncode == 2 and fragment in _err(p) and "Traceback" not in p.stderr, (args, p.stderr)
    assert a_file.read_text() == "keep me"


def test_messages_keep_their_brackets_and_markup_like_input_cannot_crash_them(tmp_path: Path,
                                                                             cli_here: CliHere) -> None:
    no_table = tmp_path / "r.toml"
    no_table.write_text("schema_version = 1\n")
    p = cli_here("recipe", str(no_table))
    assert p.returncode == 2 and "[recipe]" in _err(p), p.stderr
    p = cli_here("generate", "--set", "attention=[/red]", "--out", str(tmp_path / "v.mp4"))
    assert p.returncode == 2 and "[/red]" in _err(p) and "Traceback" not in p.stderr, p.stderr


def test_a_recipe_that_is_not_text_is_bad_input(tmp_path: Path, cli_here: CliHere) -> None:
    binary = tmp_path / "r.toml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    p = cli_here("recipe", str(binary))
    assert p.returncode == 2 and "is not UTF-8 text" in _err(p) and "Traceback" not in p.stderr


def test_tune_numbers_are_checked_before_a_study_exists(tmp_path: Path, cli_here: CliHere) -> None:
    env = {"WANCTL_CACHE": str(tmp_path / "c")}
    for args, fragment in ((("--trials", "-1"), "tune field 'trials' = -1 is not allowed: 0..10000"),
                           (("--trial-timeout", "-5"), "'trial_timeout_s' = -5.0"),
                           (("--quality", "lossless_ssim=7"), "lossless_ssim is 0..1")):
        p = cli_here("tune", *args, "--out", str(tmp_path / "o"), env=env)
        assert p.returncode == 2 and fragment in _err(p), (args, p.stderr)
        assert not (tmp_path / "o").exists()


def test_a_journal_torn_in_its_first_record_is_repaired_not_refused(tmp_path: Path) -> None:
    from autotune.study import check_journal

    for torn in (b'{"op_c', b'{"op_code":0,"worker'):
        path = tmp_path / "s.journal"
        path.write_bytes(torn)
        check_journal(path)  # a tuner killed during its first append: the repair handles it


def test_json_output_carries_the_failure_as_json(tmp_path: Path, cli_here: CliHere) -> None:
    """In a fresh process, as a script reading stdout sees it; without --json, in this one."""
    import json

    r = run_cli("recipe", str(tmp_path / "missing.toml"), "--json")
    assert r.returncode == 2, r.stderr
    doc = json.loads(r.stdout)["error"]
    assert "missing.toml" in doc["message"] and doc["exit_code"] == 2 and doc["type"]
    assert "error:" in r.stderr  # people still read the message on stderr
    plain = cli_here("recipe", str(tmp_path / "missing.toml"))
    assert plain.returncode == 2 and plain.stdout == ""


@pytest.mark.parametrize(("args", "kind", "named"), [
    (("probe", "--json", "--bogus"), "NoSuchOption", "--bogus"),
    (("tune", "--json", "--trials", "many"), "BadParameter", "--trials"),
    (("recipe", "--json"), "MissingParameter", "path"),
])
def test_json_output_carries_a_usage_error_as_json(args: tuple[str, ...], kind: str, named: str,
                                                   cli_here: CliHere) -> None:
    import json

    r = cli_here(*args)
    assert r.returncode == 2, r.stderr
    doc = json.loads(r.stdout)["error"]
    # named as the usage line shows it: 'path', or 'PATH' with older typer (0.18)
    assert doc["type"] == kind and named.lower() in doc["message"].lower() and doc["exit_code"] == 2
    assert doc["hint"].endswith(f"{args[0]} --help")
    assert named.lower() in r.stderr.lower()  # click's own usage text stays on stderr
    assert cli_here(*(a for a in args if a != "--json")).stdout == ""  # without --json: nothing on stdout


def test_a_usage_error_in_a_fresh_process_is_json_on_stdout_and_usage_on_stderr() -> None:
    """The usage errors above, end to end in a process of its own: the exit status, the streams a script reads."""
    import json

    r = run_cli("probe", "--json", "--bogus")
    assert r.returncode == 2, r.stderr
    doc = json.loads(r.stdout)["error"]
    assert doc["type"] == "NoSuchOption" and "--bogus" in doc["message"] and doc["exit_code"] == 2
    assert "--bogus" in r.stderr
    plain = run_cli("probe", "--bogus")
    assert plain.returncode == 2 and plain.stdout == "" and "--bogus" in plain.stderr


def test_help_under_json_still_exits_zero(cli_here: CliHere) -> None:
    r = cli_here("probe", "--json", "--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "error" not in r.stdout


def test_a_long_path_in_an_error_is_never_broken_across_lines(tmp_path: Path) -> None:
    deep = tmp_path / ("a-folder-with-a-rather-long-name-" * 4) / "missing.toml"
    r = run_cli("recipe", str(deep), env={"COLUMNS": "80"})  # narrower than the path: Rich would wrap it
    assert r.returncode == 2 and str(deep) in r.stderr, r.stderr  # raw stderr: copyable as printed


def _nvml_answers() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:  # not installed, no driver, no GPU: NVML is out of the way
        return False


def test_probe_json_on_a_host_whose_gpus_cannot_be_read_is_one_document(tmp_path: Path, cli_here: CliHere) -> None:
    import json
    import os

    from tests.probe_fakes import write_script

    if _nvml_answers():  # the probe asks NVML first: on a GPU host the faked nvidia-smi is never read
        pytest.skip("NVML answers here: this test fakes a host whose driver cannot read its GPUs")
    (tmp_path / "bin").mkdir()
    write_script(tmp_path / "bin" / "nvidia-smi", 'echo "Failed to initialize NVML: Driver/library version mismatch"\n'
                 "exit 18\n")
    saved = tmp_path / "probe.json"
    r = cli_here("probe", "--no-kernels", "--json", "--save", str(saved),
                env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert r.returncode == 3, r.stderr
    doc = json.loads(r.stdout)  # one document, not the probe and then the error
    assert "no GPU could be read" in doc["error"]["message"] and doc["error"]["exit_code"] == 3
    assert json.loads(saved.read_text())["gpu_unreadable"]  # --save keeps the probe's own document


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_ctrl_c_inside_a_command_says_interrupted_and_json_gets_an_error(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         json_flag: list[str]) -> None:
    """Typer turns a KeyboardInterrupt inside a command into a silent Exit(130): the user saw nothing and a
    script reading --json got an empty stdout."""
    import json
    import sys

    import cli
    import commands.generate

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.generate, "build_recipe", interrupted)
    monkeypatch.setattr(sys, "argv", ["wanctl", "generate", "--model", "tiny", *json_flag])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130
    captured = capsys.readouterr()
    assert "interrupted" in captured.err
    if json_flag:
        assert json.loads(captured.out)["error"]["exit_code"] == 130
    else:
        assert captured.out == ""


# A recipe tuned on another machine is named as such, and still runs: tests/test_nothing_left_behind.py
# (test_a_recipe_from_another_machine_is_named_as_such), on the successful generate it makes anyway.


def test_a_set_that_repeats_a_flag_or_empties_the_prompt_is_bad_input() -> None:
    """`--steps 3 --set steps=5` ran 5 steps without a word; `--set prompt=` ran with no prompt."""
    from commands.inputs import build_recipe
    from recipes.errors import BadInput

    with pytest.raises(BadInput, match="--steps and --set steps=5 both set steps"):
        build_recipe(Recipe(), steps=3, sets=["steps=5"])
    with pytest.raises(BadInput, match="recipe field 'prompt' = '' is not allowed: non-empty text"):
        build_recipe(Recipe(), sets=["prompt="])
    assert build_recipe(Recipe(), steps=3, sets=["seed=5"]).steps == 3  # different fields: both taken


def test_tune_beside_a_live_tuner_of_its_study_exits_2_naming_that_tuner(tmp_path: Path,
                                                                         cli_here: CliHere) -> None:
    import socket

    from autotune.study import OUT_MARKER
    from tests.conftest import study_held_elsewhere

    out = tmp_path / "o"
    with study_held_elsewhere(str(out / "study.journal"), "demo") as (holder, _):
        p = cli_here("tune", "--model", "tiny", "--study", "demo", "--out", str(out), "--resume",
                    env={"WANCTL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"is being tuned by pid {holder.pid} on host {socket.gethostname()}" in _err(p)
    assert "hint: wait for that tuner to finish" in _err(p)
    assert not (out / "study.journal").exists() and not (out / OUT_MARKER).exists()
