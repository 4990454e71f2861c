"""``python -m wan_runtime generate --prompts FILE.jsonl --out-dir DIR``: one model load, one video per line, a
results line per job as it ends; a bad line refused (its number and field named) before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SETS = ["--set", "steps=2", "--set", "frames=5"]


def _prompts(path: Path, *lines: object) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_a_batch_makes_one_video_per_line_and_records_each(tmp_path: Path) -> None:
    from wan_runtime.video import count_frames

    prompts = _prompts(tmp_path / "prompts.jsonl",
                       {"prompt": "a fox in the snow", "seed": 1, "out": "fox.mp4"},
                       "",  # blank lines are skipped, and still count as lines
                       {"prompt": "a cat on a roof", "negative_prompt": "blurry"},
                       {"prompt": "a boat at sea", "seed": 3, "out": "sea/boat.mp4"})
    out = tmp_path / "videos"
    p = subprocess.run([sys.executable, "-m", "wan_runtime", "generate", "--prompts", str(prompts), "--out-dir",
                        str(out), *SETS], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert not p.stdout  # stdout is a parent's channel (progress lines only when asked)
    assert "3 of 3 videos made" in p.stderr
    records = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4]
    assert [r["out"] for r in records] == ["fox.mp4", "0003.mp4", "sea/boat.mp4"]
    for r in records:
        assert r["status"] == "done" and r["outcome"] == "ok" and not r["error"], r
        assert Path(r["video"]) == (out / r["out"]).resolve() and count_frames(r["video"]) == r["frames"] == 5
        assert set(r["timings"]) >= {"text_encode_s", "denoise_s", "vae_decode_s", "write_s", "total_s"}
        assert r["timings"]["steps"] == 2 and r["timings"]["denoise_s"] > 0
    assert records[1]["seed"] == 42  # a line without a seed takes the recipe's
    assert sorted(p.name for p in out.rglob("*")) == ["0003.mp4", "boat.mp4", "fox.mp4", "results.jsonl", "sea"]


@pytest.mark.parametrize("line, says", [
    ({"prompt": "a fox", "seed": "seven"}, "line 2 field 'seed'"),
    ({"prompt": "a fox", "colour": "red"}, "line 2 field 'colour'"),
    ({"prompt": "x" * 10_001}, "line 2 field 'prompt'"),
    ({"prompt": ""}, "line 2 field 'prompt'"),
    ({"prompt": "a fox", "out": "/etc/fox.mp4"}, "line 2 field 'out'"),
    ({"prompt": "a fox", "out": "fox.avi"}, "line 2 field 'out'"),
    ({"prompt": "a fox", "out": "one.mp4"}, "line 2 field 'out' = 'one.mp4' is not allowed: a file name no other line"),
    ({"prompt": "a fox", "image": "in.png"}, "line 2 field 'image'"),
    ({"prompt": "a fox", "frames": 9}, "line 2 field 'frames'"),
    ("{not json", "line 2: malformed JSON"),
    ([1, 2], "line 2: expected a JSON object"),
])
def test_a_bad_line_is_refused_before_anything_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     line: object, says: str) -> None:
    from wan_runtime.__main__ import main

    prompts = _prompts(tmp_path / "prompts.jsonl", {"prompt": "fine", "out": "one.mp4"}, line)
    out = tmp_path / "videos"
    assert main(["generate", "--prompts", str(prompts), "--out-dir", str(out), *SETS]) == 2
    err = capsys.readouterr().err
    assert says in err and "prompts.jsonl" in err, err
    assert not out.exists()


def test_a_batch_takes_no_out_and_needs_an_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wan_runtime.__main__ import main

    prompts = _prompts(tmp_path / "p.jsonl", {"prompt": "a fox"})
    assert main(["generate", "--prompts", str(prompts), "--out", "v.mp4", "--out-dir", str(tmp_path)]) == 2
    assert "--out and --result" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(prompts)]) == 2
    assert "needs --out-dir" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "0001.mp4").write_bytes(b"mine")
    assert main(["generate", "--prompts", str(prompts), "--out-dir", str(tmp_path / "o")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "o" / "0001.mp4").read_bytes() == b"mine"


def test_after_an_error_that_leaves_the_gpu_unusable_the_rest_are_recorded_not_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sticky CUDA error fails every later kernel launch in the process: the lines after it are recorded as not
    run, with the line to start again from, instead of each failing with the same error."""
    import torch

    from recipes.jobs import Job
    from recipes.recipe import Recipe
    from wan_runtime.batch import run_batch
    from wan_runtime.engine import Engine

    real = Engine.run_job
    calls = []

    def run_job(self: Engine, job: Job, **kw: object) -> object:
        calls.append(job.seed)
        if len(calls) == 2:  # what torch raises after a kernel's illegal access
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return real(self, job, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "run_job", run_job)
    jobs = [(n, Job(prompt="a fox", seed=n, out=f"{n}.mp4")) for n in (1, 2, 3)]
    (tmp_path / "out").mkdir()
    failed = run_batch(Recipe(steps=2, frames=5), jobs, tmp_path / "out")
    records = [json.loads(ln) for ln in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert failed == 2 and calls == [1, 2]  # line 3 never reached the GPU
    assert [r["status"] for r in records] == ["done", "failed", "failed"]
    assert "illegal memory access" in records[1]["error"]
    assert records[2]["error"].startswith("not run: the GPU was unusable after line 2's error")


def test_a_job_whose_attention_was_not_the_recipes_is_a_failed_line_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recipes.jobs import Job
    from recipes.recipe import Recipe
    from tests.conftest import attention_swapped_mid_job
    from wan_runtime.batch import run_batch

    attention_swapped_mid_job(monkeypatch, seed=1)
    jobs = [(n, Job(prompt="a fox", seed=n, out=f"{n}.mp4")) for n in (1, 2)]
    (tmp_path / "out").mkdir()
    failed = run_batch(Recipe(steps=2, frames=5, attention="_native_flash"), jobs, tmp_path / "out")
    records = [json.loads(ln) for ln in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert failed == 1 and [r["status"] for r in records] == ["failed", "done"]  # the batch went on
    assert records[0]["outcome"] == "kernel_mismatch" and records[0]["phase"] == "finish"
    assert records[0]["error"].startswith("attention_mismatch: requested _native_flash but this job's attention "
                                          "processors dispatch to _native_math (hint: ")
    assert not (tmp_path / "out" / "1.mp4").exists() and (tmp_path / "out" / "2.mp4").is_file()
