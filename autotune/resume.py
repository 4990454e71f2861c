"""What ``tune --resume`` continues: the study's own settings, not the new command line's defaults.

A study's trials are judged against references made with its prompt, seed, size and gate; a resumed run
that silently used other values compared new trials with the old references (a different prompt scored
32.7 dB against the old baseline, on the tiny model) and wrote the new gate beside old verdicts. So a
setting the resuming command leaves at its default is taken from the study, and one it sets to another
value is refused, by name. Per-run settings (budget, trial count, timeout, storage, output folder, fault
injection) stay the command's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from autotune.config import TuneConfig, model_tag
from autotune.study import journal_path, open_storage
from probes.result import ProbeResult
from recipes.errors import BadInput, WanctlError
from recipes.records import CONFIG_KEY

STUDY_FIELDS = ("model", "task", "size", "frames", "steps", "prompt", "negative_prompt", "image", "seed", "gpus",
                "quality", "objective", "tier", "proxy_size", "proxy_frames", "measure_steps", "warmup_steps",
                "lossless_steps", "lightning_lora", "slower_tolerance", "sampler_seed")
"""Settings that define what a study measures and how it judges: fixed for its life."""

HOST_PATHS = ("image", "lightning_lora")
"""Paths that may differ between hosts sharing a study (the same file, mounted elsewhere)."""


def default_study_name(cfg: TuneConfig, probe: ProbeResult) -> str:
    """The study a command names without --study: model, task, workload and this machine's fingerprint."""
    if cfg.study:
        return cfg.study
    size, frames, steps = cfg.base_recipe().workload()
    return f"{model_tag(cfg.model)}_{cfg.task}_{size.replace('*', 'x')}_{frames}f_{steps}s_{probe.fingerprint()}"


def _stored_config(cfg: TuneConfig, name: str) -> tuple[bool, dict[str, Any] | None, list[str]]:
    """Whether the study exists, its saved settings (None when it has none: not there, or its creator died
    before writing them) and the names of the other studies there."""
    import optuna

    url = cfg.storage_url()
    journal = journal_path(url)
    if journal is not None and not journal.is_file():
        return False, None, []
    storage = open_storage(url, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    others = [n for n in names if n != name]
    if name not in names:
        return False, None, others
    attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    return True, attrs.get(CONFIG_KEY), others


def _workload(d: dict[str, Any]) -> tuple[str, int, int] | None:
    """(size, frames, steps) a config resolves to: '' and 0 mean the task's defaults."""
    try:
        return TuneConfig(**{k: d[k] for k in ("model", "task", "size", "frames", "steps") if k in d}
                          ).base_recipe().workload()
    except WanctlError:  # an old or odd config: compare raw values instead
        return None


def settings_for_resume(cfg: TuneConfig, probe: ProbeResult,
                        given: frozenset[str] = frozenset()) -> tuple[TuneConfig, list[str]]:
    """``cfg`` with the study's settings where the command left them at their defaults, and notes saying so.

    ``given``: the settings the command line set explicitly (the CLI knows; a value equal to the default
    is then still the user's choice: ``--objective latency`` on a pareto study is refused, not replaced).

    Raises BadInput for a setting given another value than the study's, and for a default-named study that
    is not there while others are (a changed --size or --frames names another study: the user meant one of
    those, not a new one).
    """
    name = default_study_name(cfg, probe)
    exists, stored, others = _stored_config(cfg, name)
    if stored is None:
        if others and not cfg.study and not exists:
            raise BadInput(f"--resume: no study {name!r} (named from this command's model, task, size, frames, steps "
                           f"and this machine) in {cfg.storage or cfg.out_dir}; it holds: {', '.join(others)}",
                           f"pass --study {others[0]} to continue it (or the same --size/--frames/--steps it was "
                           "started with), or drop --resume to start a new study")
        return cfg, []
    defaults = TuneConfig()
    taken: dict[str, Any] = {}
    notes: list[str] = []
    same_workload = _workload(stored) is not None and _workload(stored) == _workload(cfg.to_dict())
    for f in STUDY_FIELDS:
        if f not in stored:
            continue
        new, old = getattr(cfg, f), stored[f]
        if new == old or (f in ("size", "frames", "steps") and same_workload):
            continue  # '64*48' given for a study started with the task's default 64*48 is the same study
        if new == getattr(defaults, f) and f not in given:
            taken[f] = old
            continue
        paths = all(v != "none" for v in (new, old))  # 'none' (Lightning not searched) is no path; '' is the default one
        if (f in HOST_PATHS and paths) or (f == "model" and model_tag(str(new)) == model_tag(str(old))):
            notes.append(f"--resume: {f} is {new!r} on this host ({old!r} where the study started)")
            continue
        flag = "--" + f.replace("_", "-")
        raise BadInput(f"--resume: {flag} {new!r} differs from study {name!r}, which was set up with {old!r}",
                       f"drop {flag} to continue the study as it was set up, or pass --study NEW_NAME to start "
                       "another with it")
    if taken:
        notes.append("--resume: the study's own " + ", ".join(f"{k}={v!r}"[:80] for k, v in taken.items()))
    return dataclasses.replace(cfg, **taken), notes
