"""A compiled recipe's persistent compile cache: the runtime writes it on a cold start and loads it for a warm
one, a damaged one costs a note and not the run, the tune's confirmation run writes it beside the emitted
recipe (only a compiled one), and `wanctl generate` / launch.sh hand it back to the runtime."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from autotune.config import TuneConfig
from probes.result import ProbeResult
from recipes.locations import compile_cache_beside
from recipes.recipe import Recipe
from recipes.serialize import read_recipe
from recipes.spec import RunResult, TrialSpec
from tests.test_tuner_logic import SimulatedRuntime, h100  # noqa: F401 - h100 is a fixture

COMPILED = Recipe(steps=3, compile="regional")


def _cache_notes(res: RunResult) -> list[str]:
    return [n for n in res.notes if n.startswith("compile cache:")]


# ------------------------------------------------------------------ the runtime, on the tiny model (CPU inductor)


@pytest.mark.slow
def test_a_second_run_loads_what_the_first_wrote_and_starts_warm(tmp_path: Path) -> None:
    """Both runs compile into an empty inductor cache of their own (compile_cold), as the tuner's confirmation
    run does: the first compiles everything and writes the file; the second finds every graph in it."""
    from wan_runtime.run import run_spec

    cache = tmp_path / "compile-cache.bin"
    cold = run_spec(TrialSpec(recipe=COMPILED, mode="measure", out_dir=str(tmp_path / "a"), compile_cache=str(cache),
                              compile_cold=True))
    assert cold.outcome == "ok", cold.error
    assert cold.compile_start == "cold" and cold.compile_cache_written == str(cache) and cache.is_file()
    assert any("wrote" in n for n in _cache_notes(cold)), cold.notes
    written = cache.read_bytes()
    assert not list((tmp_path / "a").glob("inductor-cold*"))  # the run's own inductor cache is gone with it

    warm = run_spec(TrialSpec(recipe=COMPILED, mode="measure", out_dir=str(tmp_path / "b"), compile_cache=str(cache),
                              compile_cold=True))
    assert warm.outcome == "ok", warm.error
    assert warm.compile_start == "warm" and warm.compile_cache_written == ""
    notes = _cache_notes(warm)
    assert any(n.startswith("compile cache: loaded") for n in notes) and any("warm start" in n for n in notes), notes
    assert cache.read_bytes() == written  # a cache that loaded is not written again
    # (no timing asserted: in one process inductor's in-memory module cache also serves the second run)

    # A damaged cache (another torch's, a torn copy) costs a note, not the run, and is written again. Here, in the
    # same test: a third compile of the same model in this process is cheap, a fresh test's was the file's dearest.
    import torch

    cache.write_bytes(b"not a cache at all" * 10)
    res = run_spec(TrialSpec(recipe=COMPILED, mode="measure", out_dir=str(tmp_path / "c"), compile_cache=str(cache)))
    assert res.outcome == "ok", res.error
    assert any("could not be loaded" in n for n in _cache_notes(res)), res.notes
    assert res.compile_cache_written == str(cache)
    assert torch.compiler.load_cache_artifacts(cache.read_bytes()) is not None  # this run's, whole


def test_no_cache_is_read_or_written_for_a_recipe_that_does_not_compile(tmp_path: Path) -> None:
    from wan_runtime.run import run_spec

    cache = tmp_path / "compile-cache.bin"
    res = run_spec(TrialSpec(recipe=Recipe(steps=2), mode="measure", out_dir=str(tmp_path / "run"),
                             compile_cache=str(cache), compile_cold=True))
    assert res.outcome == "ok" and res.compile_start == "" and not _cache_notes(res)
    assert not cache.exists() and not list((tmp_path / "run").glob("inductor-cold*"))


# ------------------------------------------------------------------ load and save helpers (plumbing: torch's
# functions replaced, to reach the failures a real cache from another torch would need)


def test_plumbing_a_load_that_raises_is_a_note_and_the_run_writes_its_own(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from wan_runtime.compile_cache import CompileCache

    def raising(data: bytes) -> None:
        raise AssertionError("write_local_impl returned None during PGO cache population")

    cache = tmp_path / "c.bin"
    cache.write_bytes(b"x")
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", raising)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"fresh", torch.compiler._cache.CacheInfo()))
    cc = CompileCache.open(str(cache))
    assert not cc.loaded and "AssertionError: write_local_impl" in cc.notes[0]
    assert cc.save() == str(cache) and cache.read_bytes() == b"fresh"


def test_plumbing_a_cache_that_cannot_be_written_is_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from wan_runtime.compile_cache import CompileCache

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"fresh", torch.compiler._cache.CacheInfo()))
    cc = CompileCache.open(str(tmp_path / "file" / "c.bin"))  # its folder is a file: neither read nor written
    assert cc.save() == "" and any("not written" in n for n in cc.notes), cc.notes


def test_the_runtime_generate_command_takes_a_compile_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`python -m wan_runtime generate --compile-cache FILE` (what launch.sh passes) reaches the run's spec."""
    import signal

    import wan_runtime.__main__ as main_mod

    seen: list[TrialSpec] = []
    monkeypatch.setattr(main_mod, "_run", lambda args, spec, result_path, own_work=False: seen.append(spec) or 0)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:  # main() installs its own TERM and HUP handlers: pytest's come back after
        assert main_mod.main(["generate", "--out", str(tmp_path / "v.mp4"), "--compile-cache", "/r/compile-cache.bin",
                              "--set", "compile=regional"]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen[0].compile_cache == "/r/compile-cache.bin" and not seen[0].compile_cold


def test_a_cache_sits_beside_its_recipe() -> None:
    assert compile_cache_beside("/runs/a/recipe.toml") == Path("/runs/a/compile-cache.bin")  # launch.sh's name
    assert compile_cache_beside("/store/tiny_cpu_abcd.toml") == Path("/store/tiny_cpu_abcd.compile-cache.bin")


# ------------------------------------------------------------------ the tuner and its outputs


class CachingRuntime(SimulatedRuntime):
    """The simulated runtime, writing the compile cache a spec names as the real one does (cold start)."""

    def __call__(self, spec: TrialSpec):  # type: ignore[no-untyped-def]
        out = super().__call__(spec)
        if spec.recipe.compile == "off" or out.result is None:
            return out
        written = ""
        if spec.compile_cache:
            Path(spec.compile_cache).parent.mkdir(parents=True, exist_ok=True)
            Path(spec.compile_cache).write_bytes(b"artifacts of " + spec.recipe.compile.encode())
            written = spec.compile_cache
        res = dataclasses.replace(out.result, compile_start="cold" if spec.compile_cold else "warm",
                                  compile_cache_written=written,
                                  timings=dataclasses.replace(out.result.timings, warmup_s=7.5 if spec.compile_cold
                                                              else out.result.timings.warmup_s))
        return dataclasses.replace(out, result=res)


def _tune(probe: ProbeResult, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    from autotune.tuner import Tuner

    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=12, out_dir=str(out),
                     **kw)  # type: ignore[arg-type]
    rt = CachingRuntime()
    return Tuner(cfg, probe, launch=rt).run(), cfg, rt


def test_the_tune_folder_holds_the_confirmation_runs_cache_only_for_a_compiled_recipe(
        h100: ProbeResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from commands.outputs import emit

    monkeypatch.setenv("WANCTL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result, cfg, rt = _tune(h100, out)
    assert result.best is not None and result.best.recipe_obj().compile != "off"  # compile wins on the cost model
    (confirm_spec,) = [s for s in rt.specs if s.out_dir.endswith("-a9")]
    assert confirm_spec.compile_cold and confirm_spec.compile_cache == str(Path(confirm_spec.out_dir) / "compile-cache.bin")
    assert not any(s.compile_cache or s.compile_cold for s in rt.specs if s is not confirm_spec)
    assert result.confirm is not None and result.confirm.compile_start == "cold"

    paths = emit(result, cfg, h100, ["wanctl", "tune"])
    assert paths.compile_cache == out / "compile-cache.bin"
    assert paths.compile_cache.read_bytes() == b"artifacts of " + result.best.recipe_obj().compile.encode()
    _, meta = read_recipe(paths.recipe)
    assert meta.cold_start_s == 7.5
    report = paths.report.read_text()
    assert "| confirmation run: warm-up, cold start (s, compile included) | | 7.5 |" in report
    assert "warm start: not measured" in report
    stored = tmp_path / "cache" / "recipes" / f"{meta.name}.toml"
    assert compile_cache_beside(stored).read_bytes() == paths.compile_cache.read_bytes()  # the store's copy

    # The same folder emitted again with a recipe that does not compile: the earlier cache goes with it
    plain = dataclasses.replace(result.best, recipe={**result.best.recipe, "compile": "off"})
    paths = emit(dataclasses.replace(result, best=plain, confirm=dataclasses.replace(result.confirm,
                                          recipe=plain.recipe, compile_start="", compile_cache="")),
                      cfg, h100, ["wanctl", "tune"])
    assert paths.compile_cache is None and not (out / "compile-cache.bin").exists()
    assert "cold start" not in paths.report.read_text()


def test_generate_hands_the_runtime_the_cache_beside_its_recipe(tmp_path: Path) -> None:
    from commands.run_recipe import compile_cache_for

    folder = tmp_path / "tuned"
    folder.mkdir()
    recipe = folder / "recipe.toml"
    assert compile_cache_for(recipe, COMPILED) == ""  # none there yet: nothing passed
    (folder / "compile-cache.bin").write_bytes(b"x")
    assert compile_cache_for(recipe, COMPILED) == str(folder / "compile-cache.bin")
    assert compile_cache_for(recipe, COMPILED.replace(compile="off")) == ""  # a --set compile=off run
    assert compile_cache_for(None, COMPILED) == ""  # plain settings: no recipe, no cache


def test_the_runtime_process_keeps_inductors_kernels_under_wanctls_cache(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """Set on entry, before anything imports torch (which fixes its folder the first time it is asked); a
    folder the user chose is kept."""
    from wan_runtime.__main__ import main

    monkeypatch.setenv("WANCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_an_unwritable_cache_leaves_inductor_its_default_folder(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """A $WANCTL_CACHE that cannot be made (here: under a file, which no user, root included, can write into)
    costs the kept kernels, not the run: torch fails its import on a cache folder it cannot make."""
    from wan_runtime.__main__ import main

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("WANCTL_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
