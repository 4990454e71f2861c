"""Which values of each recipe knob are worth a trial on this machine, and why the others are not.

Computed from a ProbeResult alone (no torch, no GPU): hardware rules (fp8 needs sm89+, FA3 needs Hopper,
TF32 needs a GPU), the kernel checks (a backend is searched only if it ran and matched the reference
here), parallelism arithmetic (Ulysses degrees divide both the GPU count and the head count; ring degrees
need a kernel diffusers can ring) and a rough memory estimate (offload only when the model does not fit). Every value left out is recorded in
``excluded`` with the reason, so nothing is pruned silently and a report can say "fp8 not tried: sm80".

The space lists allowed values per knob; whether a *combination* is valid (no offload with several GPUs,
Ulysses only with a context-parallel attention backend, ...) stays ``recipes.validate``'s job, checked
per trial. The parallel knobs are the exception: ulysses x ring x cfg_parallel x fsdp x gpus only make sense
together, so the space lists whole *layouts* (``parallel``), each a valid set of the four, and a trial
picks one of them rather than four values that mostly do not fit. What a layout then offers of the other
knobs (``SearchSpace.offers``: the space's values but those validation refuses on it, e.g. int8wo or SeaCache
with FSDP) is ``layout_refusals``' one table, which the sampler draws from too.

What a knob is (its fields, values, tiers, what is never searched) is the knob catalogue's (recipes.catalogue):
this module holds only the rules that depend on the machine, task and workload, each under the heading of the
catalogue entry it belongs to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from probes.families import sm_number
from probes.result import ProbeResult
from recipes.catalogue import (
    ATTENTION_BACKENDS,
    CACHES,
    CATALOGUE,
    COMPILE,
    COMPILE_MODES,
    LIGHTNING_STEPS,
    LOSSLESS,
    OFFLOAD,
    QUANT,
    RING_ATTENTION,
    entry,
    fsdp_shards,
    layout_fields,
    layout_label,
)
from recipes.errors import BadInput, HardwareUnsupported
from recipes.memory import attention_scores_gib, host_weights_gib, peak_gib, usable_gib
from recipes.models import TINY_NUM_HEADS, model_spec
from recipes.plain import from_plain, load_json_object
from recipes.recipe import FP8_QUANT, FSDP_REFUSED_CACHE, FSDP_REFUSED_QUANT, SEACACHE_TASKS, Recipe

KNOBS = tuple(f for e in CATALOGUE for f in e.fields)
"""Searched recipe fields the space lists values for, in the catalogue's order (a cache's own settings are
drawn from the catalogue's grids, not listed here)."""

EIGHT_BIT_QUANT = QUANT[1:]
"""Quant values that store block weights in 8 bits (halving the DiT's weight memory)."""


@dataclass(frozen=True)
class SearchSpace:
    """Allowed values per recipe knob for one task and model on one machine (fields = Recipe fields)."""

    task: str = "t2v-A14B"
    """The task the space was computed for (head count and memory depend on it)."""
    model: str = "tiny"
    """tiny, random or a checkpoint dir (only the memory estimate depends on it)."""
    attention: tuple[str, ...] = ("native",)
    tf32: tuple[bool, ...] = (False,)
    fuse_qkv: tuple[bool, ...] = (False,)
    quant: tuple[str, ...] = ("none",)
    compile: tuple[str, ...] = ("off",)
    compile_mode: tuple[str, ...] = ("default",)
    cache: tuple[str, ...] = ("none",)
    offload: tuple[str, ...] = ("none",)
    ulysses: tuple[int, ...] = (1,)
    ring: tuple[int, ...] = (1,)
    """Ring-attention degrees the layouts use (diffusers' ring; only with a kernel it can ring)."""
    cfg_parallel: tuple[bool, ...] = (False,)
    fsdp: tuple[bool, ...] = (False,)
    lightning: tuple[int, ...] = (0,)
    gpus: tuple[int, ...] = (1,)
    parallel: tuple[str, ...] = ("single",)
    """Parallel layouts a trial may take (``layout_label``): one GPU, or Ulysses / ring / CFG / FSDP on several."""
    excluded: dict[str, str] = field(default_factory=dict)
    """'knob=value' -> why it is not searched here, e.g. 'quant=fp8_rowwise': 'fp8 needs sm89+, this GPU is sm80'."""
    notes: tuple[str, ...] = ()
    """Facts behind the choices (memory estimate, kernel checks not run, ...)."""

    def values(self) -> dict[str, tuple[Any, ...]]:
        """Knob -> allowed values, in KNOBS order."""
        return {k: getattr(self, k) for k in KNOBS}

    def size(self) -> int:
        """Number of knob combinations before combination rules (an upper bound on distinct trials)."""
        return math.prod(len(v) for v in self.values().values())

    def why_not(self, recipe: Recipe) -> list[str]:
        """Reasons ``recipe`` lies outside this space (empty when every searched knob value is allowed)."""
        out = []
        for knob, allowed in self.values().items():
            value = getattr(recipe, knob)
            if value not in allowed:
                key = f"{knob}={value}"
                why = self.excluded.get(key, f"not in the search space (allowed: {', '.join(map(str, allowed))})")
                out.append(f"{key}: {why}")
        label = layout_label(recipe)
        if not out and label not in self.parallel:
            out.append(f"parallel={label}: " + self.excluded.get(
                f"parallel={label}", f"not in the search space (allowed: {', '.join(self.parallel)})"))
        return out

    def offers(self, layout: str) -> dict[str, tuple[Any, ...]]:
        """Knob -> the values a trial on ``layout`` (one of ``parallel``) is drawn from: this space's, but those
        validation refuses on that layout (``layout_refusals``)."""
        return offered(self.values(), layout)

    def not_offered(self, layout: str) -> dict[str, str]:
        """'knob=value' -> why, for each value this space holds that a trial on ``layout`` does not draw."""
        refused = layout_refusals(layout)
        return {f"{k}={v}": refused[k][v] for k, values in self.values().items() if k in refused
                for v in values if v in refused[k]}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "search space") -> SearchSpace:
        return from_plain(cls, load_json_object(text, where, "regenerate it from a probe"), where,
                          "regenerate it from a probe")


# ------------------------------------------------------------------------------------------- layouts
def layout_refusals(layout: str) -> dict[str, dict[Any, str]]:
    """Knob -> {value: why} for the values ``recipes.validate`` refuses on ``layout`` whatever else the stack
    holds: what the sampler does not draw there, so that no drawn stack is an 'invalid' trial. A cache and an fp8
    quant are drawn on every layout (caches agree on each skip over a CFG group's ranks; fp8 linears shard under
    FSDP2); only the values below are not."""
    f = layout_fields(layout)
    out: dict[str, dict[Any, str]] = {}
    if f["ring"] > 1:
        out["attention"] = {a: "diffusers rings only the kernels whose context-parallel path returns a log-sum-exp "
                               f"({', '.join(RING_ATTENTION)})" for a in ATTENTION_BACKENDS if a not in RING_ATTENTION}
    if f["gpus"] > 1:
        out["compile"] = {"full": "the parallel exchanges sit in the whole model's forward: regional on several GPUs"}
        out["offload"] = {o: "CPU offload runs one GPU; with several GPUs FSDP shards the weights instead"
                          for o in OFFLOAD[1:]}
    if f["fsdp"]:
        out["quant"] = dict(FSDP_REFUSED_QUANT)
        out["cache"] = dict(FSDP_REFUSED_CACHE)
    if f["cfg_parallel"]:
        out["lightning"] = {s: "Lightning runs without CFG: a CFG group would have nothing to compute"
                            for s in LIGHTNING_STEPS[1:]}
    return out


def offered(values: dict[str, tuple[Any, ...]], layout: str) -> dict[str, tuple[Any, ...]]:
    """``values`` (a space's lists, or the choices a study stored) less what ``layout`` refuses, in their order."""
    refused = layout_refusals(layout)
    return {k: tuple(v for v in vals if v not in refused.get(k, {})) for k, vals in values.items()}


# The parallel entry's layouts on this machine (its labels and their fields: recipes.catalogue.layout_label).
def _layouts(n: int, ulysses: tuple[int, ...], ring: tuple[int, ...], cfg: tuple[bool, ...], fsdp: tuple[bool, ...],
             split_ok: Any, need_gib: Any, gpu_gib: float, excluded: dict[str, str]) -> tuple[str, ...]:
    """Every valid layout on up to ``n`` GPUs from the allowed values; ``split_ok(k)`` says why the workloads'
    sequences do not split over k ranks ("" when they do); ``need_gib(k)`` is the per-GPU peak with the weights
    sharded over k GPUs (k=1: unsharded). Fewer GPUs than ``n`` are allowed: on 4 GPUs a 2-GPU Ulysses run can be
    the fastest per GPU, and a trial says what it used. A ring layout uses all ``n``: the ring is the alternative
    to a higher Ulysses degree, or the way past a head count Ulysses cannot split, at the size that needs one."""
    out = []
    for rg, u in [(rg, u) for rg in ring for u in ulysses]:  # ring-free layouts first, in the order they always had
        for c in cfg:
            split = u * rg
            groups = split * (2 if c else 1)
            if groups > n or (rg > 1 and groups != n):
                continue
            if rg > 1 and (why := split_ok(split)):
                excluded[f"parallel={layout_label(Recipe(gpus=groups, ulysses=u, ring=rg, cfg_parallel=c))}"] = why
                continue
            out += _fsdp_layouts(n, u, rg, c, fsdp, need_gib, gpu_gib, excluded)
    return tuple(out)


def _fsdp_layouts(n: int, u: int, rg: int, c: bool, fsdp: tuple[bool, ...], need_gib: Any, gpu_gib: float,
                  excluded: dict[str, str]) -> list[str]:
    """The layouts of one Ulysses x ring x CFG split, with and without FSDP, that fit."""
    out = []
    split = u * rg
    groups = split * (2 if c else 1)
    for f in fsdp:
        if f and groups == 1:
            gpus = n
        elif f and split == 1:
            continue  # FSDP shards inside a CFG group: one GPU each here
        else:
            gpus = groups
        if f and gpus == 1:
            continue
        fields = {"gpus": gpus, "ulysses": u, "ring": rg, "cfg_parallel": c, "fsdp": f}
        shards = fsdp_shards(Recipe(**fields))
        label = layout_label(Recipe(**fields))
        if f and groups == 1 and need_gib(1) <= gpu_gib:
            excluded[f"parallel={label}"] = ("FSDP alone computes the whole video on every GPU: only worth it "
                                             "when the model does not fit one GPU, and it fits here")
            continue
        need = need_gib(shards)
        if need > gpu_gib:
            whole = f"sharded over {shards} GPUs" if shards > 1 else "whole on each GPU"
            excluded[f"parallel={label}"] = (f"does not fit: ~{need:.0f} GiB per GPU with the weights {whole}, "
                                             f"{gpu_gib:.0f} GiB usable")
            continue
        out.append(label)
    return out


# ------------------------------------------------------------------------------------------- memory
def memory_estimate_gib(task: str, model: str, *, size: str = "", frames: int = 0, weight_bytes: float = 2.0,
                        offload: str = "none", shards: int = 1, vae_tiling: bool = True) -> float:
    """Peak GPU memory per GPU (GiB) over the run's phases (recipes.memory). VAE tiling is assumed by
    default: it is lossless and the adapter turns it on whenever untiled decode would not fit."""
    return peak_gib(task, model, size=size, frames=frames, weight_bytes=weight_bytes, offload=offload,
                    shards=shards, vae_tiling=vae_tiling)


# ------------------------------------------------------------------------------------------- rules
def _why_unusable(probe: ProbeResult) -> str:
    """The kernel child's own reason (the probe's note quoting torch), else where the checks ran."""
    for note in probe.notes:
        if "cannot use the GPU (" in note:
            return note.split("cannot use the GPU (", 1)[1].rsplit("): kernel checks", 1)[0]
    return f"kernel checks ran on {probe.kernel_device}"


def search_space_for(probe: ProbeResult, task: str, model: str, gpus: int | None = None, *,
                     allow_cpu_compile: bool = False, lightning_available: bool = False,
                     size: str = "", frames: int = 0, proxy: tuple[str, int] | None = None) -> SearchSpace:
    """The knob values worth trying for ``task``/``model`` on the probed machine.

    ``gpus``: GPUs one run may use (default: every visible GPU). ``allow_cpu_compile``: search
    torch.compile on a CPU-only host (slow on few cores). ``lightning_available``: the Lightning 4-step
    LoRA is on disk. ``size``/``frames``: the workload, for the memory estimate (default: the task's).
    ``proxy``: (size, frames) of the quality runs, which a Ulysses degree must split too.
    Raises BadInput for an impossible request and HardwareUnsupported when the machine cannot run it.
    """
    spec = model_spec(task)  # BadInput naming the tasks when unknown
    heads = TINY_NUM_HEADS if model == "tiny" else spec.num_heads
    r0 = Recipe(task=task, model=model, size=size, frames=frames).resolved()
    tokens = spec.tokens(r0.size, r0.frames)
    excluded: dict[str, str] = {}
    notes: list[str] = []
    fam = probe.family
    have = probe.gpu_count
    # GPUs are listed, yet the kernel checks' torch could not use them (a CPU build, a too-old driver): every
    # trial would run on the CPU, so the space is the CPU's, and the reason is said where a GPU is missed.
    unusable = have > 0 and bool(probe.kernels) and not probe.kernel_device.startswith("cuda")
    on_gpu = have > 0 and not unusable
    no_gpu = (f"torch cannot use this host's {have} GPU(s) ({_why_unusable(probe)})" if unusable
              else "this host has no GPU")

    # --- GPUs and parallelism (catalogue entry: parallel) -------------------------------------
    if gpus is not None and gpus < 1:
        raise BadInput(f"gpus={gpus} is not a GPU count", "pass --gpus 1 or more")
    if not on_gpu:
        if gpus is not None and gpus > 1:
            raise HardwareUnsupported(f"asked for {gpus} GPUs; {no_gpu}", "drop --gpus on a CPU-only host"
                                      + ("; run 'wanctl probe' for why torch cannot use the GPUs" if unusable else ""))
        if model != "tiny":
            raise HardwareUnsupported(f"the full-size {task} model needs a GPU; {no_gpu}",
                                      "install a CUDA build of torch that matches the driver (see 'wanctl probe')"
                                      if unusable else "use --model tiny here, or tune on a GPU machine")
        n = 1
    else:
        if gpus is not None and gpus > have:
            raise HardwareUnsupported(f"asked for {gpus} GPUs; this machine has {have} ({probe.describe()})",
                                      f"pass --gpus {have} or fewer")
        n = gpus or have
    # The quality runs (``proxy``: their size and frames) split their own sequence with the same degree.
    workloads = [(r0.size, r0.frames, tokens)] + ([(proxy[0], proxy[1], spec.tokens(*proxy))] if proxy else [])
    ulysses = tuple(d for d in range(1, n + 1)
                    if n % d == 0 and heads % d == 0 and all(t % d == 0 for _, _, t in workloads))
    for d in range(2, n + 1):
        if n % d == 0 and heads % d:
            excluded[f"ulysses={d}"] = f"{task} has {heads} attention heads, not divisible by {d}"
        elif n % d == 0 and (odd := next(((sz, fr, t) for sz, fr, t in workloads if t % d), None)):
            excluded[f"ulysses={d}"] = f"the {odd[2]}-token sequence of {odd[0]} x {odd[1]} frames is not divisible by {d}"
    multi = n >= 2
    why_single = "needs 2 or more GPUs" + ("" if on_gpu else f"; {no_gpu}") + (
        f"; this run uses {n}" if on_gpu else "")
    if not multi:
        excluded["cfg_parallel=True"] = why_single
        excluded["fsdp=True"] = why_single

    # --- attention (catalogue entry: attention): only backends that ran and matched the reference here
    attention: list[str] = []
    if not probe.kernels:
        attention = ["native"]
        notes.append("kernel checks were not run: only the default 'native' attention is searched")
    for backend in ATTENTION_BACKENDS:
        if backend in attention:
            continue
        if backend in ("_flash_3", "torch_fa3", "fa3_fp8") and on_gpu and not fam.fa3:
            excluded[f"attention={backend}"] = f"FA3 needs Hopper (sm90); this GPU is {fam.name} {fam.sm}"
            continue
        if backend == "torch_fa4" and on_gpu and not fam.fa4:
            excluded["attention=torch_fa4"] = f"torch's FA4 needs sm90 or sm100; this GPU is {fam.name} {fam.sm}"
            continue
        if probe.kernels and probe.kernel_ok(f"attention:{backend}"):
            attention.append(backend)
        elif probe.kernels:
            excluded[f"attention={backend}"] = probe.kernel_summary(f"attention:{backend}")
    if not attention:
        raise HardwareUnsupported("no attention backend passed the kernel check on this machine",
                                  "run 'wanctl probe' and read the kernel-check errors")
    if on_gpu and model != "tiny":
        attention = _drop_score_materializing(probe, task, model, size, frames, attention, excluded)
    if unusable:
        notes.append(f"{no_gpu}: the kernel checks ran on the CPU, and so will every trial")

    # --- precision (catalogue entries: tf32, quant) -------------------------------------------
    if on_gpu and fam.tf32:
        tf32: tuple[bool, ...] = (False, True)
    else:
        tf32 = (False,)
        excluded["tf32=True"] = (f"TF32 is a GPU tensor-core mode; {no_gpu}" if not on_gpu
                                 else f"TF32 needs sm80+; this GPU is {fam.sm}")
    quant = ["none"]
    for q in QUANT[1:]:
        is_fp8 = q in FP8_QUANT
        if is_fp8 and not on_gpu:
            excluded[f"quant={q}"] = f"fp8 needs a GPU with fp8 tensor cores (sm89+); {no_gpu}"
        elif is_fp8 and not fam.fp8:
            excluded[f"quant={q}"] = f"fp8 needs sm89+, this GPU is {fam.sm or 'unknown'}"
        elif q == "te_block" and sm_number(fam) < 90:
            excluded[f"quant={q}"] = f"Transformer Engine block scaling needs sm90+, this GPU is {fam.sm}"
        elif not probe.kernel_ok(f"quant:{q}"):
            excluded[f"quant={q}"] = probe.kernel_summary(f"quant:{q}")
        else:
            quant.append(q)

    # --- compile (catalogue entries: compile, compile_mode) -----------------------------------
    compile_modes: tuple[str, ...] = ("default",)
    if not on_gpu and not allow_cpu_compile:
        compile_values: tuple[str, ...] = ("off",)
        for c in COMPILE[1:]:
            excluded[f"compile={c}"] = "torch.compile on a CPU-only host: minutes per trial on few cores " \
                                       "(allow_cpu_compile=True to search it anyway)"
    elif not probe.kernel_ok("compile"):
        compile_values = ("off",)
        for c in COMPILE[1:]:
            excluded[f"compile={c}"] = f"compile check: {probe.kernel_summary('compile')}"
    else:
        compile_values = COMPILE
        if on_gpu:
            compile_modes = COMPILE_MODES
    for m in COMPILE_MODES:
        if m not in compile_modes:
            excluded.setdefault(f"compile_mode={m}", "compile is not searched here" if compile_values == ("off",)
                                else "autotuning modes need a GPU (they benchmark Triton kernels)")

    # --- caches (catalogue entry: cache) --------------------------------------------------------
    cache = CACHES
    for value, why in entry("cache").never:
        excluded[f"cache={value}"] = why
    if task not in SEACACHE_TASKS:
        cache = tuple(c for c in cache if c != "seacache")
        excluded["cache=seacache"] = f"diffusers' SeaCache adapter does not take {task} (input != output channels)"

    # --- memory (catalogue entries: offload, parallel's fsdp) -----------------------------------
    offload: tuple[str, ...] = ("none",)
    fsdp: tuple[bool, ...] = (False, True) if multi else (False,)
    if not on_gpu:
        for o in OFFLOAD[1:]:
            excluded[f"offload={o}"] = f"CPU offload moves weights to a GPU on use; {no_gpu}"
    else:
        offload, fsdp = _memory_rules(probe, task, model, n, size, frames, quant, fsdp, excluded, notes)

    # --- distillation (catalogue entry: lightning) -----------------------------------------------
    if lightning_available:
        lightning: tuple[int, ...] = (0, 4)
    else:
        lightning = (0,)
        excluded["lightning=4"] = "the Lightning 4-step LoRA is not available (download it to search it)"

    # --- parallel layouts (catalogue entry: parallel) -------------------------------------------
    cfg_values = (False, True) if multi else (False,)
    parallel: tuple[str, ...] = ("single",)
    ring: tuple[int, ...] = (1,)
    if multi:
        gpu_gib = usable_gib(probe.min_gpu_memory_mib / 1024)

        def need_gib(k: int) -> float:
            return memory_estimate_gib(task, model, size=size, frames=frames, shards=k)

        def split_ok(k: int) -> str:
            odd = next(((sz, fr, t) for sz, fr, t in workloads if t % k), None)
            return f"the {odd[2]}-token sequence of {odd[0]} x {odd[1]} frames is not divisible by ulysses x ring = " \
                   f"{k}" if odd else ""
        degrees = tuple(d for d in range(2, n + 1) if n % d == 0)
        ringable = [a for a in attention if a in RING_ATTENTION]
        if not ringable:
            for d in degrees:
                excluded[f"ring={d}"] = (f"ring attention needs a kernel diffusers can ring ({', '.join(RING_ATTENTION)});"
                                         f" none of this machine's searched ones ({', '.join(attention)}) is")
        parallel = _layouts(n, ulysses, (1, *degrees) if ringable else (1,), cfg_values, fsdp, split_ok, need_gib,
                            gpu_gib, excluded)
        ring = tuple(sorted({layout_fields(p)["ring"] for p in parallel})) or (1,)
        if not probe.all_nvlink:
            notes.append("the GPUs are not all joined by NVLink: Ulysses' all-to-all crosses PCIe in every layer "
                         "and may not pay off; CFG parallel exchanges one prediction per step")
    return SearchSpace(
        task=task, model=model, attention=tuple(attention), tf32=tf32, fuse_qkv=(False, True), quant=tuple(quant),
        compile=compile_values, compile_mode=compile_modes, cache=cache, offload=offload, ulysses=ulysses, ring=ring,
        cfg_parallel=cfg_values, fsdp=fsdp, lightning=lightning,
        gpus=tuple(sorted({layout_fields(p)["gpus"] for p in parallel})), parallel=parallel,
        excluded=excluded, notes=tuple(notes),
    )


def _drop_score_materializing(probe: ProbeResult, task: str, model: str, size: str, frames: int,
                              attention: list[str], excluded: dict[str, str]) -> list[str]:
    """Backends whose score matrix alone cannot fit are priced out before a trial is spent finding the OOM
    (at 720p A14B one such trial costs about as long as the baseline and asks for 852 GiB)."""
    gpu_gib = usable_gib(probe.min_gpu_memory_mib / 1024)
    resident = memory_estimate_gib(task, model, size=size, frames=frames)
    spec = model_spec(task)
    where = f"{size or spec.default_size} x{frames or spec.default_frames} frames"
    keep = []
    for backend in attention:
        scores = attention_scores_gib(task, backend, size=size, frames=frames)
        if scores and resident + scores > gpu_gib:
            excluded[f"attention={backend}"] = (
                f"materializes the fp32 attention scores: ~{scores:.0f} GiB per call at {where} on top of "
                f"~{resident:.0f} GiB, the GPU has {gpu_gib:.0f} GiB usable")
        else:
            keep.append(backend)
    return keep or attention


def _memory_rules(probe: ProbeResult, task: str, model: str, n: int, size: str, frames: int, quant: list[str],
                  fsdp: tuple[bool, ...], excluded: dict[str, str],
                  notes: list[str]) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """Offload and FSDP values from the memory estimate against the smallest GPU's memory."""
    gpu_gib = usable_gib(probe.min_gpu_memory_mib / 1024)
    est = memory_estimate_gib(task, model, size=size, frames=frames)
    fits = est <= gpu_gib
    eight_bit = [q for q in quant if q in EIGHT_BIT_QUANT]
    fits_8bit = bool(eight_bit) and memory_estimate_gib(task, model, size=size, frames=frames, weight_bytes=1) <= gpu_gib
    notes.append(f"memory estimate: ~{est:.0f} GiB per GPU for {task} ({model}) without offload or sharding, "
                 f"VAE decode tiled; the smallest GPU has {gpu_gib:.0f} GiB usable")
    if model != "tiny" and probe.host.ram_total_mib:
        if probe.host.ram_total_mib / 1024 < host_weights_gib(task):
            notes.append(f"host RAM ({probe.host.ram_total_mib / 1024:.0f} GiB) may be too small to hold the weights "
                         "while loading or offloading (some hosts grow RAM on use: measured at probe time)")
    if n >= 2:
        for o in OFFLOAD[1:]:
            excluded[f"offload={o}"] = "CPU offload runs one GPU; with several GPUs FSDP shards the weights instead"
        if fits:
            return ("none",), fsdp
        sharded = memory_estimate_gib(task, model, size=size, frames=frames, shards=n)
        if sharded > gpu_gib:
            raise HardwareUnsupported(
                f"{task} needs ~{sharded:.0f} GiB per GPU even sharded over {n} GPUs; they have {gpu_gib:.0f} GiB usable",
                "use more GPUs, a smaller size or fewer frames")
        excluded["fsdp=False"] = f"does not fit without sharding: ~{est:.0f} GiB needed, {gpu_gib:.0f} GiB usable per GPU"
        notes.append(f"FSDP over {n} GPUs needed: ~{sharded:.0f} GiB per GPU sharded")
        return ("none",), (True,)
    if fits:
        for o in OFFLOAD[1:]:
            excluded[f"offload={o}"] = f"not needed: ~{est:.0f} GiB fits in {gpu_gib:.0f} GiB usable (offload only slows down)"
        return ("none",), fsdp
    offload = []
    if fits_8bit:
        offload.append("none")
        notes.append(f"offload=none fits only with 8-bit weights ({', '.join(eight_bit)}); other trials will OOM")
    else:
        excluded["offload=none"] = f"does not fit: ~{est:.0f} GiB needed, the GPU has {gpu_gib:.0f} GiB usable"
    one_expert = memory_estimate_gib(task, model, size=size, frames=frames, offload="model")
    if one_expert <= gpu_gib:
        offload.append("model")
    else:
        excluded["offload=model"] = (f"model offload keeps one whole expert on the GPU: ~{one_expert:.0f} GiB, "
                                     f"the GPU has {gpu_gib:.0f} GiB usable")
    streamed = memory_estimate_gib(task, model, size=size, frames=frames, offload="group_block")
    if streamed <= gpu_gib:
        offload += ["group_block", "group_leaf"]
    else:
        for o in ("group_block", "group_leaf"):
            excluded[f"offload={o}"] = (f"streamed weights still need ~{streamed:.0f} GiB (activations, decode); "
                                        f"the GPU has {gpu_gib:.0f} GiB usable")
    if not offload:
        raise HardwareUnsupported(f"{task} at this size does not fit on this GPU even with offload "
                                  f"(~{streamed:.0f} GiB of activations, {gpu_gib:.0f} GiB GPU)",
                                  "use a smaller size or fewer frames, or more GPUs")
    return tuple(offload), fsdp


TIERS = ("any", "gated", "lossless")
"""``wanctl tune --tier``: any and gated search every knob (lossy ones judged by the quality gate); lossless
only those whose output matches the baseline's within numerical noise."""

def for_tier(space: SearchSpace, tier: str) -> SearchSpace:
    """``space`` with the values ``tier`` does not search moved to ``excluded`` (saying why, as the report
    shows every exclusion). Lossy is what the gate calls lossy: one definition, the catalogue's tier per value
    (which Recipe.lossy_knobs reads too)."""
    if tier != "lossless":
        return space
    excluded = dict(space.excluded)
    kept: dict[str, tuple[Any, ...]] = {}
    for knob in (e for e in CATALOGUE if e.lossy):
        kept[knob.name] = tuple(v for v in getattr(space, knob.name) if knob.tier(v) == LOSSLESS)
        for v in getattr(space, knob.name):
            if v not in kept[knob.name]:
                excluded[f"{knob.name}={v}"] = ("lossy: --tier lossless searches only knobs that keep the baseline's "
                                                "output")
    return dataclasses.replace(space, excluded=excluded, **kept)
