"""From a finished study to its files: recipe (with meta), launch script, report, and the recipe store's copy.

On the CLI side, not in autotune/ or reports/: it needs both, and only the commands import both (``tune`` writes
them at the end of a study, ``report`` again from a study alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from commands.console import err
from commands.version import wanctl_version
from recipes.errors import WanctlError

if TYPE_CHECKING:
    from autotune.config import TuneConfig
    from autotune.results import TuneResult
    from probes.result import ProbeResult
    from reports.outputs import OutputPaths


def emit(result: TuneResult, cfg: TuneConfig, probe: ProbeResult, argv: list[str]) -> OutputPaths:
    """Write the study's outputs into ``cfg.out_dir`` and save the recipe to the store; ``argv`` is the command
    recorded in the report when the study did not record its own."""
    from autotune.config import model_tag
    from autotune.quality_gate import parse_quality
    from autotune.recipe_store import save_to_store
    from recipes.serialize import RecipeMeta
    from reports.markdown import ReportInput
    from reports.outputs import write_outputs

    chosen = result.best or result.baseline
    recipe = chosen.recipe_obj()
    conf = result.confirm
    gate = parse_quality(cfg.quality).describe()
    fp = probe.fingerprint()
    # the fingerprint's readable head and its digest: machines with one GPU model but other drivers or
    # libraries (a shared WANCTL_CACHE) must not write over each other's store entries
    name = f"{model_tag(recipe.model)}_{fp.split('_')[0]}_{fp.rsplit('_', 1)[-1]}_{recipe.recipe_hash()[:8]}"
    versions = {"wanctl": cfg.wanctl_version or wanctl_version(),
                **{k: v for k, v in vars(probe.software).items() if isinstance(v, str)}}
    notes = list(result.notes) + [n for r in ([chosen] if chosen else []) for n in r.notes]
    # A compiled recipe carries the cache its confirmation run wrote (cold, into an empty inductor cache): its
    # warm-up is the cold start, and launch.sh / generate hand the file to the runtime for a warm one.
    compiled = recipe.compile != "off" and conf is not None
    cache = Path(conf.compile_cache) if compiled and conf.compile_cache else None
    if cache is not None and not cache.is_file():  # a study rebuilt elsewhere (wanctl report): its trials are gone
        notes.append(f"the confirmation run's compile cache {cache} is gone: the recipe goes without one")
        cache = None
    meta = RecipeMeta(
        name=name, fingerprint=fp, machine=probe.describe(), speedup=conf.speedup if conf else 1.0,
        baseline_s=result.baseline.denoise_pred_s, recipe_s=chosen.denoise_pred_s,
        confirmed_s=conf.denoise_pred_s if conf else result.baseline.denoise_pred_s,
        cold_start_s=conf.warmup_s if compiled and conf.compile_start == "cold" else 0.0,
        psnr_db=chosen.psnr_min_db, ssim=chosen.ssim_min, latent_rel_err=chosen.latent_rel_err,
        gate=f"{chosen.gate_tier}: {gate}", versions=versions, notes=notes, study=result.study_name,
    )
    inp = ReportInput(
        title=f"wanctl tune: {model_tag(cfg.model)} {cfg.task} {recipe.size} x{recipe.frames} frames, {recipe.steps} steps",
        machine=probe.describe(), fingerprint=fp, versions=versions, study=result.study_name, storage=result.storage,
        command=list(cfg.command) or ["wanctl", *argv[1:]], baseline=result.baseline, records=result.records, best=result.best,
        confirm=result.confirm, recipe=recipe, gate=gate, exclusions=result.exclusions,
        excluded_space=dict(result.space.excluded), notes=notes, runs=result.runs,
    )
    paths = write_outputs(Path(cfg.out_dir), inp, recipe, meta, probe.to_json(), cfg.to_dict(), wanctl_version(),
                          compile_cache=cache)
    try:
        save_to_store(recipe, meta, paths.compile_cache)
    except WanctlError as exc:  # the tune's own outputs are written: a store it cannot write costs only --best
        err.print(f"[yellow]warning:[/] the recipe was not saved to the recipe store: {escape(exc.message)}",
                  soft_wrap=True)
        err.print("[yellow]hint:[/] set WANCTL_CACHE to a folder you can write to, or pass --out-dir "
                  f"{escape(str(cfg.out_dir))} to wanctl generate --best", soft_wrap=True)
    return paths
