"""TuneConfig: everything ``wanctl tune`` was asked to do, frozen and JSON-able (saved beside the outputs)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.search_space import TIERS
from recipes.errors import BadInput, FieldError, RecipeError, WanctlError
from recipes.fields import NAME_MAX_CHARS, PATH_MAX_CHARS, PROMPT_MAX_CHARS, Domain, check_fields, domain
from recipes.manifest import MANIFEST_NAME, checkpoint_revision
from recipes.models import lightning_dirname, model_spec, parse_size
from recipes.recipe import DEFAULT_PROMPT, LIGHTNING_TASKS, MAX_FRAMES, SYNTHETIC, Recipe, validate
from recipes.spec import FAULTS

LADDER_MODES = ("auto", "on", "off")


def _d(default: Any, domain: Domain) -> Any:
    """A tuner setting with its domain (recipes.fields), checked like a recipe field wherever a TuneConfig is made:
    the command line, or a study's saved settings read back by --resume and wanctl report."""
    return field(default=default, metadata={"domain": domain})


def _as_recipe(name: str) -> Domain:
    """A recipe field's own domain: the setting becomes that field of the base recipe."""
    return domain(Recipe, name)


_SIZE = _as_recipe("size")
_FRAMES = _as_recipe("frames")
_STEPS = _as_recipe("steps")


@dataclass(frozen=True)
class TuneConfig:
    model: str = _d("tiny", _as_recipe("model"))
    """tiny, random or a checkpoint directory."""
    task: str = _d("t2v-A14B", _as_recipe("task"))
    size: str = _d("", _SIZE)
    frames: int = _d(0, _FRAMES)
    steps: int = _d(0, _STEPS)
    prompt: str = _d(DEFAULT_PROMPT, _as_recipe("prompt"))
    negative_prompt: str = _d("", _as_recipe("negative_prompt"))
    image: str = _d("", _as_recipe("image"))
    seed: int = _d(42, _as_recipe("seed"))
    gpus: int = _d(1, _as_recipe("gpus"))
    budget_s: float = _d(0.0, Domain(low=0, high=30 * 86400, allowed="0..2592000 seconds (30 days); 0: no budget",
                                     hint="pass --budget as e.g. 30m, 2h or 90s (at most 720h)"))
    """Wall-clock budget for the search; 0: none (then ``trials`` bounds it)."""
    trials: int = _d(0, Domain(low=0, high=10_000, allowed="0..10000 (0: 20 without --budget, no limit with one)"))
    """Total trials in the study (baseline included); 0 with no budget: 20."""
    quality: str = _d("", Domain(max_chars=NAME_MAX_CHARS))
    """Overrides of the quality bars, e.g. 'lossy_psnr=22,lossy_ssim=0.85'."""
    objective: str = _d("latency", Domain(choices=("latency", "pareto")))
    """latency (TPE on predicted denoise time) or pareto (NSGA-II on time and worst-frame PSNR)."""
    tier: str = _d("any", Domain(choices=TIERS))
    """Which knobs are searched: any (lossy ones too, each judged by the quality gate against the baseline's
    output), gated (the same: wanctl never emits a lossy stack its gate did not pass), or lossless (only knobs
    that keep the baseline's output, checked numerically: no 8-bit attention, quantization, cache or Lightning)."""
    ladder: str = _d("auto", Domain(choices=LADDER_MODES))
    """The fidelity ladder (autotune.ladder): on (stacks climb from kernel timings and a transformer slice
    to the whole workload, which only finalists run), off (every stack runs the whole workload), or auto:
    on, but off for the tiny model (one whole run there costs less than a slice's process start) and for
    several GPUs (a slice runs on one)."""
    storage: str = _d("", Domain(max_chars=PATH_MAX_CHARS))
    """Optuna storage: PATH.journal (default: OUT/study.journal), sqlite:///..., postgresql://..."""
    study: str = _d("", Domain(max_chars=NAME_MAX_CHARS))
    resume: bool = _d(False, Domain())
    out_dir: str = _d("wanctl-out", Domain(max_chars=PATH_MAX_CHARS, path=True, required=True,
                                           hint="pass another --out folder"))
    proxy_size: str = _d("", dataclasses.replace(_SIZE, allowed="WIDTH*HEIGHT (e.g. 832*480), or empty for the "
                                                 "task's smallest size", hint="pass --proxy-size like 832*480"))
    """Size of quality runs (lossy knobs run a full schedule there); empty: the task's smallest size."""
    proxy_frames: int = _d(17, dataclasses.replace(_FRAMES, zero="", allowed=f"4n+1 frames, 1..{MAX_FRAMES}"))
    measure_steps: int = _d(4, dataclasses.replace(_STEPS, zero=""))
    """Denoise steps run at the target workload to time a trial (warm-up included)."""
    warmup_steps: int = _d(1, Domain(low=0, high=999))
    lossless_steps: int = _d(2, dataclasses.replace(_STEPS, zero=""))
    """Steps of the short quality run that checks lossless knobs numerically."""
    trial_timeout_s: float = _d(0.0, Domain(low=0, high=7 * 86400, allowed="0..604800 seconds (a week); 0: derived "
                                            "from the baseline", hint="pass --trial-timeout SECONDS, or 0"))
    """Hard per-trial limit; 0: derived from the baseline (before it: 20 min on GPU, 5 min on CPU)."""
    trust_checkpoint: bool = _d(False, Domain())
    """Load a checkpoint directory without wanctl's download manifest."""
    lightning_lora: str = _d("", Domain(max_chars=PATH_MAX_CHARS, path=True))
    """Lightning LoRA folder to search the 4-step distilled stack with; 'none': never; empty: the tiny/random
    model's own random LoRA, or for a checkpoint the download folder beside it when there."""
    sampler_seed: int = _d(0, Domain(low=0, high=2**32 - 1, allowed="0 .. 2**32-1 (numpy's seed range: Optuna's "
                                     "samplers seed numpy with it)"))
    inject: tuple[str, ...] = _d((), Domain(max_chars=64, max_items=100))
    """Fault injection for testing the tuner: 'FAULT@TRIAL' (e.g. 'oom@2') or 'FAULT@TRIAL:RANK' (one rank of a
    multi-GPU trial, e.g. 'hang@3:1'); see recipes.spec.FAULTS. A trial that runs no process (a repeated stack)
    passes its fault to the next trial that runs one."""
    slower_tolerance: float = _d(0.0, Domain(low=0, high=1, high_open=True))
    """Relative margin under which a trial counts as not slower than the baseline; 0: 3% GPU, 10% CPU."""
    command: tuple[str, ...] = _d((), Domain(max_chars=2 * PROMPT_MAX_CHARS, multiline=True, max_items=1000))
    """The command line that started the study (the report's "Reproduce"; a rebuild keeps it). An argument holds
    at most a prompt with its flag, or a path."""
    wanctl_version: str = _d("", Domain(max_chars=NAME_MAX_CHARS))
    """wanctl's version when the study started."""

    def __post_init__(self) -> None:
        """Values a user typed are checked here, before the probe and before a study file exists: a negative
        trial count would otherwise create the study and then report that nothing was measured."""
        from autotune.quality_gate import parse_quality

        check_fields(self, _setting_error)
        if self.warmup_steps >= self.measure_steps:
            raise BadInput(f"warmup_steps ({self.warmup_steps}) leaves no timed step of measure_steps "
                           f"({self.measure_steps})", "measure more steps than the warm-up")
        parse_quality(self.quality)
        self.injections()
        self._check_proxy()

    def _check_proxy(self) -> None:
        """--proxy-size/--proxy-frames are used only once the baseline has been measured: a value no recipe
        takes ('832x480' spelt with an x, 16 frames) must fail here, not after the baseline's GPU time."""
        if self.single_run:
            return
        try:
            base = self.base_recipe()
        except WanctlError:
            return  # the base recipe's own error is raised where it is built, naming its flag
        try:
            validate(self.proxy_recipe(base, short=False))
        except RecipeError as exc:
            if exc.field not in ("size", "frames"):
                raise
            flag = "--proxy-size" if exc.field == "size" else "--proxy-frames"
            raise BadInput(f"{flag}: {exc.message}", f"pass another {flag} (the quality runs' "
                           f"{'size, WIDTH*HEIGHT' if exc.field == 'size' else 'frame count'})") from None

    def proxy_recipe(self, recipe: Recipe, short: bool) -> Recipe:
        """``recipe`` at the quality runs' workload: --proxy-size (default: the task's smallest size) and
        --proxy-frames; ``short``: the lossless check's few steps (--lossless-steps)."""
        spec = model_spec(recipe.task)
        size = self.proxy_size or min(spec.sizes, key=lambda s: parse_size(s)[0] * parse_size(s)[1])
        return recipe.replace(size=size, frames=self.proxy_frames, steps=self.lossless_steps if short else recipe.steps)

    def storage_url(self) -> str:
        """Where the study lives: --storage, else the journal file in the output folder."""
        return self.storage or str(Path(self.out_dir).expanduser().resolve() / "study.journal")

    def total_trials(self) -> int | None:
        """Trials in the study: --trials, else 20 without a budget, else as many as the budget holds (None)."""
        return self.trials or (None if self.budget_s else 20)

    def base_recipe(self) -> Recipe:
        return validate(Recipe(task=self.task, model=self.model, model_revision=checkpoint_revision(self.model),
                               size=self.size, frames=self.frames, steps=self.steps, prompt=self.prompt,
                               negative_prompt=self.negative_prompt, image=self.image, seed=self.seed))

    def lightning_source(self) -> str:
        """The recipe's ``lightning_lora`` value for Lightning trials; empty when Lightning is not searched."""
        if self.lightning_lora == "none" or self.task not in LIGHTNING_TASKS:
            return ""
        if self.lightning_lora:
            return self.lightning_lora
        if self.model in SYNTHETIC:
            return self.model
        beside = Path(self.model).expanduser().resolve().parent / lightning_dirname(self.task)
        return str(beside) if (beside / MANIFEST_NAME).is_file() else ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inject"] = list(self.inject)
        return d

    def ladder_on(self, space: Any) -> bool:
        """Whether this study climbs the ladder on ``space`` (a SearchSpace: its GPU counts)."""
        if self.ladder == "off":
            return False
        one_gpu = max(space.gpus) == 1
        return one_gpu if self.ladder == "on" else one_gpu and not self.single_run

    @property
    def single_run(self) -> bool:
        """One process per trial measures both speed and quality (full schedule at the target size): cheap
        only for the tiny model, where the proxy and the target workload are the same."""
        return self.model == "tiny"

    def injections(self) -> dict[int, tuple[str, int]]:
        """Trial number -> (fault, rank); rank -1 fires on every rank of a multi-GPU trial."""
        out = {}
        for item in self.inject:
            m = re.fullmatch(r"([a-z_]+)@(\d+)(?::(\d+))?", item)
            if not m:
                raise BadInput(f"--inject {item!r} is not FAULT@TRIAL or FAULT@TRIAL:RANK",
                               "write e.g. --inject oom@2, or --inject hang@3:1 for rank 1 only")
            if m.group(1) not in FAULTS or m.group(1) == "none":
                raise BadInput(f"--inject fault {m.group(1)!r} is unknown", "one of " + ", ".join(FAULTS[1:]))
            out[int(m.group(2))] = (m.group(1), int(m.group(3)) if m.group(3) else -1)
        return out


def _setting_error(name: str, value: Any, allowed: str, hint: str) -> FieldError:
    """The error for a setting out of its domain: a RecipeError for those that are recipe fields (the same message
    as on generate), else one naming the tuner's setting."""
    if name in Recipe.field_names():
        return RecipeError(name, value, allowed, hint)
    return FieldError("tune", name, value, allowed, hint)


def parse_budget(text: str) -> float:
    """'30m', '2h', '90s', '45' (minutes) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if not m:
        raise BadInput(f"--budget {text!r} is not a duration", "write e.g. 30m, 2h or 90s")
    value, unit = float(m.group(1)), m.group(2) or "m"
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


def model_tag(model: str) -> str:
    if model in SYNTHETIC:
        return model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).expanduser().resolve().name) or "checkpoint"
