"""TuneConfig: everything ``wanctl tune`` was asked to do, frozen and JSON-able (saved beside the outputs)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from recipes.errors import BadInput, RecipeError, WanctlError
from recipes.manifest import MANIFEST_NAME, checkpoint_revision
from recipes.models import lightning_dirname, model_spec, parse_size
from recipes.recipe import DEFAULT_PROMPT, LIGHTNING_TASKS, SYNTHETIC, Recipe, validate
from recipes.spec import FAULTS


@dataclass(frozen=True)
class TuneConfig:
    model: str = "tiny"
    """tiny, random or a checkpoint directory."""
    task: str = "t2v-A14B"
    size: str = ""
    frames: int = 0
    steps: int = 0
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    image: str = ""
    seed: int = 42
    gpus: int = 1
    budget_s: float = 0.0
    """Wall-clock budget for the search; 0: none (then ``trials`` bounds it)."""
    trials: int = 0
    """Total trials in the study (baseline included); 0 with no budget: 20."""
    quality: str = ""
    """Overrides of the quality bars, e.g. 'lossy_psnr=22,lossy_ssim=0.85'."""
    objective: str = "latency"
    """latency (TPE on predicted denoise time) or pareto (NSGA-II on time and worst-frame PSNR)."""
    storage: str = ""
    """Optuna storage: PATH.journal (default: OUT/study.journal), sqlite:///..., postgresql://..."""
    study: str = ""
    resume: bool = False
    out_dir: str = "wanctl-out"
    proxy_size: str = ""
    """Size of quality runs (lossy knobs run a full schedule there); empty: the task's smallest size."""
    proxy_frames: int = 17
    measure_steps: int = 4
    """Denoise steps run at the target workload to time a trial (warm-up included)."""
    warmup_steps: int = 1
    lossless_steps: int = 2
    """Steps of the short quality run that checks lossless knobs numerically."""
    trial_timeout_s: float = 0.0
    """Hard per-trial limit; 0: derived from the baseline (before it: 20 min on GPU, 5 min on CPU)."""
    trust_checkpoint: bool = False
    """Load a checkpoint directory without wanctl's download manifest."""
    lightning_lora: str = ""
    """Lightning LoRA folder to search the 4-step distilled stack with; 'none': never; empty: the tiny/random
    model's own random LoRA, or for a checkpoint the download folder beside it when there."""
    sampler_seed: int = 0
    inject: tuple[str, ...] = field(default_factory=tuple)
    """Fault injection for testing the tuner: 'FAULT@TRIAL' (e.g. 'oom@2') or 'FAULT@TRIAL:RANK' (one rank of a
    multi-GPU trial, e.g. 'hang@3:1'); see recipes.spec.FAULTS. A trial that runs no process (a repeated stack)
    passes its fault to the next trial that runs one."""
    slower_tolerance: float = 0.0
    """Relative margin under which a trial counts as not slower than the baseline; 0: 3% GPU, 10% CPU."""
    command: tuple[str, ...] = ()
    """The command line that started the study (the report's "Reproduce"; a rebuild keeps it)."""
    wanctl_version: str = ""
    """wanctl's version when the study started."""

    def __post_init__(self) -> None:
        """Numbers a user typed are checked here, before the probe and before a study file exists: a
        negative trial count would otherwise create the study and then report that nothing was measured."""
        import math

        from autotune.quality_gate import parse_quality

        for name, low in (("trials", 0), ("gpus", 1), ("measure_steps", 1), ("warmup_steps", 0),
                          ("lossless_steps", 1), ("proxy_frames", 1)):
            if getattr(self, name) < low:
                raise BadInput(f"{name} = {getattr(self, name)} is below {low}",
                               f"pass --{name.replace('_', '-')} {low} or more")
        for name in ("budget_s", "trial_timeout_s", "slower_tolerance"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise BadInput(f"{name} = {v} is not a finite number >= 0", "0 means: decide automatically")
        if self.warmup_steps >= self.measure_steps:
            raise BadInput(f"warmup_steps ({self.warmup_steps}) leaves no timed step of measure_steps "
                           f"({self.measure_steps})", "measure more steps than the warm-up")
        if self.objective not in ("latency", "pareto"):
            raise BadInput(f"objective {self.objective!r} is unknown", "latency or pareto")
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
