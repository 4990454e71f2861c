"""The hand-off between the tuner (or the CLI) and a ``wan_runtime`` process.

``TrialSpec`` goes in as a JSON file, ``RunResult`` comes back as a JSON file. Both are plain data so a
reader can print every hand-off, and the tuner never needs torch to write one or read the other.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.errors import SpecError
from recipes.files import atomic_write_text
from recipes.plain import check_schema, from_plain, load_json_object
from recipes.recipe import Recipe

SPEC_SCHEMA = 1

MODES = ("generate", "measure", "quality", "slice", "components")
"""generate: full run, video written. measure: time a few denoise steps at the target workload and one
VAE decode, no video. quality: full schedule (often at a proxy size), frames saved for the gate.
The tuner's cheaper rungs (autotune.ladder): slice: one forward of the expert cut to ``slice_blocks`` blocks
(random weights at the real width and the real token count), the recipe's kernel knobs applied, timed after
a warm-up that holds compile; components: one call per named component (``components``) at the real shape,
in milliseconds, each appended to ``components.jsonl`` in out_dir as it finishes."""

COMPONENTS_FILE = "components.jsonl"
"""Where a components run appends one JSON line per finished component: a worker that dies mid-list leaves
the ones before it, and the parent reruns the rest in a fresh worker with the culprit recorded."""

FAULTS = ("none", "oom", "oom_decode", "orphan", "hang", "crash", "segfault", "nan", "inf", "slow", "no_result", "bad_result",
          "illegal_memory", "ignore_sigterm", "oom_cuda", "illegal_memory_cuda", "device_error")
"""Fault injection of the runtime: how the tuner's failure paths are tested end to end, not mocked. The
``_cuda`` ones are the real failure on a GPU (an allocation larger than the card; a kernel's out-of-bounds
store), the others imitate how a failure reaches the tuner (exception, exit code, signal, stderr line)."""

PHASES = ("start", "load", "apply", "text_encode", "denoise", "vae_decode", "finish")

OUTCOMES = ("ok", "oom", "timeout", "crash", "nan", "unsupported", "bad_input", "quality_fail",
            "slower_than_baseline", "kernel_mismatch")
"""What a RunResult's ``outcome`` may say."""

COMPILE_STARTS = ("cold", "warm")
"""What a compiled run's ``compile_start`` may say: cold (inductor compiled graphs), warm (all from a cache)."""


KERNEL_CHECK_START = "wanctl-kernel-check: start "
"""Line the kernel-check child prints before each check: the parent names the one a crash or hang hit."""
PROGRESS_PREFIX = "WANCTL_PROGRESS"
"""Line a runtime child prints per denoise step (``WANCTL_PROGRESS <done> <total>``) for the progress bar."""
PROGRESS_ENV = "WANCTL_PROGRESS_LINES"
"""Set to 1 in a runtime child's environment by the parent that reads its PROGRESS_PREFIX lines; without it
the runtime prints none (launch.sh's stdout is the user's terminal, not a protocol channel)."""


def rank_result_path(result_path: Path, rank: int) -> Path:
    """Where one rank of a several-process trial leaves the result of its own failure: rank 0 alone writes
    the trial's result, and a rank that fails alone may be stopped (by torchrun) before it could."""
    return result_path.with_name(f"{result_path.name}.rank{rank}")


def rank_result_files(result_path: Path) -> dict[int, Path]:
    """Every rank's own failure result beside ``result_path``, by rank (``rank_result_path``'s names)."""
    found = {}
    for path in result_path.parent.glob(f"{result_path.name}.rank*"):
        rank = path.name.rsplit(".rank", 1)[1]
        if rank.isdigit():
            found[int(rank)] = path
    return found


@dataclass(frozen=True)
class TrialSpec:
    """What one runtime process must do."""

    recipe: Recipe = field(default_factory=Recipe)
    mode: str = "generate"
    """generate, measure or quality (see MODES)."""
    out_dir: str = "."
    """Folder for the result, video, latent and frames (created by the runtime)."""
    measure_steps: int = 0
    """measure mode: denoise steps to run (warm-up included); 0: min(steps, warmup_steps + 3)."""
    warmup_steps: int = 1
    """Steps excluded from the per-step median (compile, autotune and allocator warm-up land here)."""
    reference_frames: str = ""
    """quality mode: .npy of the baseline's decoded frames (uint8 T,H,W,C) to compare against."""
    reference_latent: str = ""
    """quality mode: .npy of the baseline's final latent."""
    write_video: bool = True
    video_path: str = ""
    """generate mode: where the mp4 goes (empty: out_dir/video.mp4)."""
    magcache_ratios: list[list[float]] = field(default_factory=list)
    """MagCache ratios per expert measured earlier (e.g. by the tuner's calibration trial); empty: shipped
    ratios for real checkpoints, else calibrated in-process."""
    trust_checkpoint: bool = False
    """Load a checkpoint directory that has no wanctl download manifest (the user vouches for it)."""
    step_hint_s: float = 0.0
    """A computed step's cost at this workload as measured before (the baseline's), 0 when unknown: under
    compile nothing counts a cache's forwards, and a step far cheaper than this one was skipped."""
    slice_blocks: int = 0
    """slice mode: blocks of the expert kept (0: 2, or all of a model with fewer)."""
    slice_iters: int = 3
    """slice mode: timed forwards after the warm-up ones (``warmup_steps`` of them); the median is reported."""
    components: list[str] = field(default_factory=list)
    """components mode: what to time, e.g. ``attention:_flash_3`` (one attention call at the workload's
    shape through that backend) or ``gemm:fp8_rowwise`` (one block's token GEMMs with that quant value)."""
    compile_cache: str = ""
    """A compiled recipe's persistent compile cache (torch's portable cache artifacts, the "mega-cache"): loaded
    before the model runs when the file is there; written after the denoise loop when it was not there or could
    not be loaded (another torch, a damaged file). Empty: none; ignored when the recipe does not compile."""
    compile_cold: bool = False
    """Compile into an empty inductor cache of the run's own (under out_dir, removed after): the warm-up is then
    what a machine with no compiled artifacts pays (the confirmation run's cold start), not what this host's
    cache, filled by the search's trials of the same stack, leaves of it. Ignored without compile."""
    fault: str = "none"
    """Fault to inject (see FAULTS); none in every real run."""
    fault_step: int = 0
    """Denoise step at which the fault fires (0: at the start of the run)."""
    fault_arg: float = 0.0
    """Fault parameter, e.g. the slowdown factor for 'slow'."""
    fault_rank: int = -1
    """Multi-process trials: the one rank the fault hits (-1: every rank), e.g. one rank that dies or hangs
    while the others wait for it in a collective."""
    trial_number: int = -1
    schema_version: int = SPEC_SCHEMA

    def __post_init__(self) -> None:
        _one_of("trial spec", "mode", self.mode, MODES)
        _one_of("trial spec", "fault", self.fault, FAULTS)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "spec") -> TrialSpec:
        data = load_json_object(text, where, "regenerate the spec")
        check_schema(data, SPEC_SCHEMA, where, "regenerate the spec")
        return from_plain(cls, data, where, "regenerate the spec with this wanctl")

    def write(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())


@dataclass(frozen=True)
class Timings:
    """Seconds, each inside one stated boundary; never summed across boundaries silently."""

    load_s: float = 0.0
    """Building the pipeline and moving it to the device (checkpoint read or random init)."""
    apply_s: float = 0.0
    """Applying the recipe's knobs (quantization, LoRA fuse, cache hooks) and loading a compile cache; compile
    itself is lazy (in the warm-up)."""
    text_encode_s: float = 0.0
    """UMT5 encoding of prompt and negative prompt."""
    step_s: list[float] = field(default_factory=list)
    """Each denoise step (both CFG passes and the scheduler step), in order, warm-up steps included."""
    warmup_s: float = 0.0
    """Sum of the warm-up steps (compile and autotune land here)."""
    step_median_s: float = 0.0
    """Median of the steady steps that computed every pass (a cache's skipped steps left out): a full
    step's cost, the figure speed-ups are computed from."""
    skipped_step_s: float = 0.0
    """Median of the steady steps a cache skipped entirely; 0 when none ran."""
    denoise_s: float = 0.0
    """Wall time of the denoise steps that ran."""
    denoise_pred_s: float = 0.0
    """Predicted full-schedule denoise time: median step x computed steps + skipped steps' cost."""
    vae_decode_s: float = 0.0
    """VAE decode of the final latent at the real size."""
    total_s: float = 0.0
    """Process wall time from start to result written."""


@dataclass(frozen=True)
class Quality:
    """Comparison of this run's output with the baseline's (same seed, prompt, size)."""

    psnr_min_db: float = 0.0
    """Worst frame's PSNR, computed in float64 (uint8 subtraction wraps)."""
    psnr_mean_db: float = 0.0
    ssim_min: float = 0.0
    ssim_mean: float = 0.0
    latent_rel_err: float = 0.0
    """||latent - ref|| / ||ref|| of the final latent."""
    nonfinite: bool = False
    black_frames: int = 0
    frozen_frames: int = 0
    ref_black_frames: int = 0
    """The reference's own defects: a frame the baseline also freezes is not this recipe's fault."""
    ref_frozen_frames: int = 0
    """Frames identical to their predecessor (a stuck decode)."""
    compared: bool = False


@dataclass(frozen=True)
class RunResult:
    """What one runtime process did, written by rank 0."""

    outcome: str = "ok"
    """ok, or how it failed: oom, nan, crash, unsupported, bad_input, kernel_mismatch (see OUTCOMES)."""
    error: str = ""
    error_type: str = ""
    phase: str = ""
    """Where the run was when it ended (see PHASES): an OOM in VAE decode wants tiling, one in denoise offload."""
    rank: int = 0
    """Rank that reported the failure (multi-GPU)."""
    device: str = ""
    gpus: int = 1
    versions: dict[str, str] = field(default_factory=dict)
    actual: dict[str, str] = field(default_factory=dict)
    """What really ran, as observed (attention backend per call, quant kernel, compile, cache)."""
    timings: Timings = field(default_factory=Timings)
    steps_total: int = 0
    steps_run: int = 0
    steps_computed: int = 0
    """Transformer forwards that were computed (not skipped by a cache) among the steps that ran."""
    step_forwards: list[int] = field(default_factory=list)
    """Transformer forwards computed in each step that ran (2 with CFG, fewer when a cache skipped)."""
    computed_steps: list[bool] = field(default_factory=list)
    """With a cache: whether each step that ran computed, from the counts, else the cache's own schedule,
    else the step's time (under compile, ``step_forwards`` is empty); empty without a cache."""
    cache_ratios: list[list[float]] = field(default_factory=list)
    """MagCache ratios per expert used by this run (calibrated ones are reused by later trials)."""
    expert_steps: list[int] = field(default_factory=list)
    """Denoise steps each expert runs under this recipe's scheduler: what a cache's schedule is priced on."""
    peak_mem_bytes: int = 0
    """Peak GPU memory allocated during denoise and decode (host RSS on CPU)."""
    quality: Quality = field(default_factory=Quality)
    video_path: str = ""
    latent_path: str = ""
    frames_path: str = ""
    frames: int = 0
    video_frames: int = 0
    """Frames decoded back from the written mp4 (0 when no video was written)."""
    forward_s: float = 0.0
    """slice mode: median seconds of one forward of the slice (knobs applied; warm-up in timings.warmup_s)."""
    blocks: int = 0
    """slice mode: blocks in the slice."""
    model_blocks: int = 0
    """slice mode: blocks in the model's expert (what the slice stands for)."""
    rel_err: float = 0.0
    """slice mode: ||out - ref|| / ||ref|| of the slice's output against the same slice before any knob
    (the model's dtype, diffusers' default attention): a lossless knob keeps it at bf16 rounding."""
    component_ms: dict[str, float] = field(default_factory=dict)
    """components mode: milliseconds per component that ran (median of a few calls after one warm-up)."""
    component_errors: dict[str, str] = field(default_factory=dict)
    """components mode: why a component did not run (its first error line)."""
    compile_start: str = ""
    """Under compile: "warm" when every graph the run compiled came from a compile cache (the spec's file, or
    this host's own inductor cache), "cold" when inductor compiled at least one itself (its cost is in the
    warm-up); empty without compile. See COMPILE_STARTS."""
    compile_cache_written: str = ""
    """Where this run wrote its compile cache (TrialSpec.compile_cache); empty when it wrote none."""
    notes: list[str] = field(default_factory=list)
    schema_version: int = SPEC_SCHEMA

    def __post_init__(self) -> None:
        _one_of("run result", "outcome", self.outcome, OUTCOMES)
        if self.compile_start:
            _one_of("run result", "compile_start", self.compile_start, COMPILE_STARTS)
        if self.phase:  # empty in a run that finished: a failure says where it was
            _one_of("run result", "phase", self.phase, PHASES)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "result") -> RunResult:
        data = load_json_object(text, where, "the trial died while writing it, or wrote garbage")
        check_schema(data, SPEC_SCHEMA, where, "run the trial")
        return from_plain(cls, data, where, "the trial process and the tuner are different wanctl versions?")

    def write(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def _one_of(document: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Checked when a spec or result is built, so also when one is read back: a word the other side does not
    know is an error naming the allowed ones, never a branch silently not taken."""
    if value not in allowed:
        raise SpecError(document, name, value, "one of " + ", ".join(allowed))


def summarize(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
