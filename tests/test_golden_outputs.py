"""Golden copies of what a tune hands the user: recipe.toml, launch.sh and report.md for fixed inputs.

A change to any of them shows up here as a diff to read, not as a surprise in a user's folder. After an
intended change, regenerate with ``WANCTL_UPDATE_GOLDEN=1 pytest tests/test_golden_outputs.py`` and commit the
files with the change that explains them.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from recipes.launch import LaunchOptions, render_launch_script
from recipes.recipe import Recipe, validate
from recipes.records import TrialRecord
from recipes.serialize import RecipeMeta, dumps_recipe
from reports.markdown import ReportInput, render

GOLDEN = Path(__file__).parent / "fixtures" / "golden"

RECIPE = validate(Recipe(model="random", task="t2v-A14B", attention="_flash_3", fuse_qkv=True, compile="regional",
                         compile_fullgraph=False,
                         cache="magcache", cache_threshold=0.06, magcache_k=2, cache_retention=0.4,
                         prompt='a fox "in" $snow', seed=42))
META = RecipeMeta(name="random_nvidia-h100-80gb-hbm3x1_0123abcd", fingerprint="nvidia-h100-80gb-hbm3x1_cu13_abcd",
                  machine="1x NVIDIA H100 80GB HBM3", speedup=1.83, baseline_s=501.2, recipe_s=271.9,
                  confirmed_s=274.0, cold_start_s=95.0, psnr_db=31.4, ssim=0.962, latent_rel_err=0.08,
                  gate="lossy: PSNR>=25 dB, SSIM>=0.9 (worst frame)", versions={"torch": "2.11.0", "wanctl": "0.1.0"},
                  notes=["vae_tiling added: 720p decode peaks ~21 GB"], study="random_t2v-A14B_1280x720_81f_40s_h100")


def _record(number: int, role: str, outcome: str, seconds: float, **kw: object) -> TrialRecord:
    return TrialRecord(number=number, role=role, label=kw.pop("label", role), outcome=outcome,  # type: ignore[arg-type]
                       denoise_pred_s=seconds, speedup=501.2 / seconds if seconds else 0.0, step_median_s=seconds / 40,
                       load_s=61.0, text_encode_s=1.2, vae_decode_s=38.5, peak_mem_gb=71.3, cost_s=seconds / 3,
                       **kw)  # type: ignore[arg-type]


def _report() -> str:
    base = _record(0, "baseline", "ok", 501.2, reason="the reference", gate_tier="reference")
    best = _record(3, "warm_start", "ok", 271.9, label="attention=_flash_3+fuse_qkv=True+compile=regional+cache=magcache",
                   psnr_min_db=31.4, ssim_min=0.962, gate_passed=True, gate_tier="lossy", warmup_s=48.0,
                   reason="PSNR 31.4 dB, SSIM 0.962 (lossy bar)", actual={"attention_kernel": "fa3"})
    records = [
        base,
        _record(1, "screen", "slower_than_baseline", 540.0, label="attention=flash",
                reason="540 s vs baseline 501 s (0.93x); attention=flash excluded from later trials"),
        _record(2, "warm_start", "ok", 470.0, label="attention=_flash_3", psnr_min_db=48.2, ssim_min=0.998,
                gate_passed=True, gate_tier="lossless", reason="PSNR 48.2 dB, SSIM 0.998 (lossless bar)",
                fallbacks=["oom in vae_decode -> vae_tiling=True (decode the VAE in tiles); evidence: CUDA out of memory"]),
        best,
    ]
    confirm = _record(9, "confirm", "ok", 274.0, label=best.label, warmup_s=95.0, compile_start="cold",
                      compile_cache="runs/a14b/trials/0003-a9/compile-cache.bin")
    return render(ReportInput(
        title="random t2v-A14B 1280*720 x81 frames, 40 steps", machine=META.machine, fingerprint=META.fingerprint,
        versions=META.versions, study=META.study, storage="runs/a14b/study.journal",
        command=["wanctl", "tune", "--model", "random", "--budget", "2h"], baseline=base, records=records, best=best,
        confirm=confirm, recipe=RECIPE, gate="lossless: PSNR>=35 dB, SSIM>=0.95, latent err<=0.05; lossy: PSNR>=25 dB, "
        "SSIM>=0.9 (worst frame)", exclusions={"attention": {"flash": "measured 0.93x vs baseline in trial 1"}},
        excluded_space={"quant=te_delayed": "absent: transformer_engine not installed"},
        notes=["--budget 2 h reached after 4 trial(s) in this run"], plot="pareto.png",
        runs=[{"command": ["wanctl", "tune", "--model", "random", "--budget", "2h"], "wanctl": "0.1.0"}]))


OUTPUTS = {
    "recipe.toml": lambda: dumps_recipe(RECIPE, META),
    "launch.sh": lambda: render_launch_script(RECIPE, LaunchOptions(name=META.name, version="0.1.0", out="video.mp4",
                                                                python="/opt/wanctl/.venv/bin/python")),
    "report.md": _report,
}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_output_matches_its_golden_copy(name: str) -> None:
    got = OUTPUTS[name]()
    path = GOLDEN / name
    if os.environ.get("WANCTL_UPDATE_GOLDEN") == "1":
        path.write_text(got, encoding="utf-8")
    want = path.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), f"golden/{name}", "now"))
    assert got == want, f"{name} changed (WANCTL_UPDATE_GOLDEN=1 to accept):\n{diff[:4000]}"
