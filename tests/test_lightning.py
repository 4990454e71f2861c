"""Lightning 4-step LoRAs on the tiny A14B model: the distilled schedule, the LoRA really fused into each
expert, a LoRA folder checked like a checkpoint, a LoRA for another model refused, and the tuner's Lightning
trials (CFG off, four steps, no cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recipes.errors import RecipeError
from recipes.recipe import Recipe, validate
from recipes.spec import TrialSpec

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from wan_runtime.knobs import lightning as L  # noqa: E402
from wan_runtime.run import run_spec  # noqa: E402

SMALL = dict(size="64*48", frames=5)
RELEASE = "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"  # the pair sits in a subfolder in lightx2v's repo


def test_scheduler_lands_on_the_distilled_timesteps() -> None:
    sched = L.make_scheduler(L.LIGHTNING_SHIFT)
    sched.set_timesteps(4)  # all the Wan pipeline passes
    ran = [float(t) for t in sched.timesteps]
    assert ran == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=0.01)
    assert ran == pytest.approx(L.lightning_timesteps(4), abs=0.01)
    # The stock scheduler with the same shift does not (why the runtime brings its own).
    from diffusers import FlowMatchEulerDiscreteScheduler

    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=L.LIGHTNING_SHIFT)
    stock.set_timesteps(4)
    assert [float(t) for t in stock.timesteps] != pytest.approx(ran, abs=0.5)


def _pipe_with_lightning(recipe: Recipe) -> tuple[object, object]:
    from wan_runtime.build import build_pipeline
    from wan_runtime.knobs.base import KnobContext

    r = validate(recipe).resolved()
    pipe = build_pipeline(r, torch.device("cpu"))
    ctx = KnobContext(pipe=pipe, recipe=r, device=torch.device("cpu"))
    return pipe, ctx


def test_the_lora_is_fused_into_each_expert_and_each_runs_its_half(tmp_path: Path) -> None:
    pipe, ctx = _pipe_with_lightning(Recipe(lightning=4, dtype="float32", **SMALL))
    high, low = ctx.transformers
    expect = {}
    for name, t, seed in (("high", high, 1), ("low", low, 2)):
        sd = L.random_lora(t, seed=seed)
        key = "diffusion_model.blocks.0.self_attn.q"
        down, up = sd[f"{key}.lora_down.weight"].float(), sd[f"{key}.lora_up.weight"].float()
        scale = float(sd[f"{key}.alpha"]) / down.shape[0]
        expect[name] = (t.blocks[0].attn1.to_q.weight.detach().clone(), up @ down * scale)
        ffn_before = t.blocks[1].ffn.net[2].weight.detach().clone()
        expect[name + "_ffn"] = ffn_before
    L._check(ctx)
    L._apply(ctx)
    for name, t in (("high", high), ("low", low)):
        before, delta = expect[name]
        got = t.blocks[0].attn1.to_q.weight.detach() - before
        assert torch.allclose(got, delta, rtol=1e-4, atol=1e-6), f"{name}: fused delta is not up @ down x alpha/r"
        assert not torch.equal(t.blocks[1].ffn.net[2].weight, expect[name + "_ffn"])  # the FFN is adapted too
        assert L._wrapped(t) == 0  # fused and unwrapped: compile and quantization see plain Linear
    assert "LoRA fused into" in ctx.actual["lightning"]
    counts = {"high": 0, "low": 0}
    high.register_forward_hook(lambda *a: counts.__setitem__("high", counts["high"] + 1))
    low.register_forward_hook(lambda *a: counts.__setitem__("low", counts["low"] + 1))
    pipe(prompt="a fox", height=48, width=64, num_frames=5, num_inference_steps=4, guidance_scale=1.0,
         guidance_scale_2=1.0, output_type="latent", max_sequence_length=16)
    # Timesteps 1000 and 937.5 are above the 875 boundary (high-noise expert), 833 and 625 below; CFG off.
    assert counts == {"high": 2, "low": 2}
    for obs in ctx.observers:
        obs.finish(ctx)
    assert "lightning_mismatch" not in ctx.actual


def test_a_pipeline_that_ran_another_schedule_is_a_mismatch() -> None:
    pipe, ctx = _pipe_with_lightning(Recipe(lightning=4, **SMALL))
    L._apply(ctx)
    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.5, 0.25, 0.1])  # e.g. a pipeline that passed its own sigmas
    for obs in ctx.observers:
        obs.finish(ctx)
    assert ctx.actual["lightning_mismatch"].startswith("lightning: the scheduler ran timesteps")


def test_the_lightning_check_reads_the_schedule_the_last_job_ran() -> None:
    from types import SimpleNamespace

    from wan_runtime.knobs.base import KnobContext

    sched = L.make_scheduler(L.LIGHTNING_SHIFT)
    obs = L._TimestepObserver(SimpleNamespace(scheduler=sched), L.lightning_timesteps(4))
    ctx = KnobContext(pipe=SimpleNamespace(), recipe=Recipe(lightning=4), device=torch.device("cpu"))
    sched.set_timesteps(4)  # what the pipeline does at each job's start
    assert obs.check(ctx) == {}
    sched.set_timesteps(sigmas=[1.0, 0.5, 0.25, 0.1])  # a job that passed its own sigmas
    assert obs.check(ctx)["lightning_mismatch"].startswith("lightning: the scheduler ran timesteps")
    sched.set_timesteps(4)
    assert obs.check(ctx) == {} and ctx.actual == {}


@pytest.mark.slow
def test_tiny_lightning_run_is_four_steps_without_cfg(tmp_path: Path) -> None:
    res = run_spec(TrialSpec(recipe=Recipe(lightning=4, **SMALL), mode="quality", out_dir=str(tmp_path)))
    assert res.outcome == "ok", res.error
    assert res.steps_run == 4 and res.step_forwards == [1, 1, 1, 1]
    assert "1000.0, 937.5, 833.3, 625.0 (shift 5)" in res.actual["lightning"]


def _save_pair(folder: Path, seed_hi: int = 1, seed_lo: int = 2, extra_block: bool = False) -> dict[str, tuple]:
    from safetensors.torch import save_file

    from wan_runtime.build import build_pipeline

    pipe = build_pipeline(Recipe().resolved(), torch.device("cpu"))
    (folder / RELEASE).mkdir(parents=True)
    files = {}
    for name, t, seed in (("high_noise_model", pipe.transformer, seed_hi), ("low_noise_model", pipe.transformer_2, seed_lo)):
        sd = L.random_lora(t, seed=seed)
        if extra_block:  # a LoRA for a deeper model: its extra layers match nothing here
            n = len(t.blocks)
            for k in [k for k in sd if k.startswith("diffusion_model.blocks.0.")]:
                sd[k.replace("blocks.0.", f"blocks.{n + 5}.")] = sd[k].clone()
        rel = f"{RELEASE}/{name}.safetensors"
        save_file(sd, str(folder / rel))
        files[rel] = ((folder / rel).stat().st_size, None)
    return files


@pytest.mark.slow
def test_a_downloaded_pair_is_checked_then_gives_the_same_video_as_the_same_weights(tmp_path: Path) -> None:
    from recipes.manifest import write_manifest

    lora = tmp_path / "Wan2.2-Lightning-t2v-A14B"
    files = _save_pair(lora)
    spec = lambda d, **kw: TrialSpec(recipe=Recipe(lightning=4, lightning_lora=str(lora), **SMALL),  # noqa: E731
                                     mode="quality", out_dir=str(tmp_path / d), **kw)
    unverified = run_spec(spec("a"))
    assert unverified.outcome == "bad_input" and "wanctl-manifest.json" in unverified.error
    assert run_spec(spec("b", trust_checkpoint=True)).outcome == "ok"
    write_manifest(lora, files, artifact="t2v-A14B-lightning", kind="lora", task="t2v-A14B")
    from_files = run_spec(spec("c"))
    assert from_files.outcome == "ok", from_files.error
    built = run_spec(TrialSpec(recipe=Recipe(lightning=4, **SMALL), mode="quality", out_dir=str(tmp_path / "d")))
    assert np.array_equal(np.load(from_files.latent_path), np.load(built.latent_path))


def test_a_lora_for_another_model_is_refused_not_half_loaded(tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    _save_pair(lora, extra_block=True)
    res = run_spec(TrialSpec(recipe=Recipe(lightning=4, lightning_lora=str(lora), **SMALL), mode="quality",
                             out_dir=str(tmp_path / "o"), trust_checkpoint=True))
    assert res.outcome == "bad_input"
    assert "adapted" in res.error and "not a LoRA for this t2v-A14B model" in res.error


@pytest.mark.parametrize("changes, field", [
    (dict(task="ti2v-5B", lightning=4), "lightning"),
    (dict(lightning_lora="tiny"), "lightning_lora"),
    (dict(model="/ckpt/Wan2.2-T2V-A14B", lightning=4), "lightning_lora"),
    (dict(lightning=4, lightning_lora="random"), "lightning_lora"),
    (dict(lightning=4, cache="magcache"), "cache"),
])
def test_recipe_rules(changes: dict, field: str) -> None:
    with pytest.raises(RecipeError) as e:
        validate(Recipe(**changes))
    assert e.value.field == field


def test_lightning_resolves_to_four_steps_without_cfg() -> None:
    r = validate(Recipe(lightning=4)).resolved()
    assert (r.steps, r.guidance, r.guidance_2, r.lightning_lora) == (4, 1.0, 1.0, "tiny")
    assert validate(Recipe(model="/ckpt/x", lightning=4, lightning_lora="/ckpt/l")).lightning_lora == "/ckpt/l"


def test_tune_refuses_a_lightning_folder_that_is_not_there(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    p = run_cli("tune", "--model", "tiny", "--trials", "2", "--out", str(tmp_path / "o"),
                "--lightning-lora", str(tmp_path / "missing"), env={"WANCTL_CACHE": str(tmp_path / "c")})
    err = " ".join(p.stderr.split())  # Rich wraps long lines
    assert p.returncode == 2
    assert "is not a folder" in err and "wanctl download --task t2v-A14B-lightning" in err
    assert not (tmp_path / "o").exists()  # refused before probing or opening a study
