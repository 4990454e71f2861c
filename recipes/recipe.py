"""The Recipe: every knob of a Wan2.2 run, with defaults equal to plain diffusers.

A recipe is flat and frozen so it can be hashed, diffed, printed and round-tripped through TOML
without surprises. Filling defaults (``Recipe.for_task``) and validating (``validate``) are separate
steps: a recipe read from disk is validated exactly as written.

The searched knobs' values and tiers are the knob catalogue's (recipes.catalogue, imported here so that
``from recipes.recipe import QUANT`` keeps working); this module keeps the fields, the rules that join several
of them (``validate``) and the value groups the runtime and the probe read (CUDA-only, graph-breaking, TE).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.catalogue import (
    ATTENTION_BACKENDS,
    CACHES,
    COMPILE,
    COMPILE_MODES,
    LIGHTNING_STEPS,
    OFFLOAD,
    QUANT,
    RING_ATTENTION,
    lossy_settings,
)
from recipes.errors import RecipeError
from recipes.fields import PATH_MAX_CHARS, PROMPT_MAX_CHARS, Domain, check_fields
from recipes.models import MODELS, TINY_NUM_HEADS, model_spec, parse_size

CUDA_ONLY_ATTENTION = ("_native_cudnn", "_native_efficient", "flash", "_flash_3", "sage", "torch_fa4", "torch_fa3",
                       "fa3_fp8")
"""Attention values with no CPU kernel at all (torch's flash backend does have one)."""

GRAPH_BREAKING_ATTENTION = ("sage",)
"""Backends torch.compile cannot trace whole (SageAttention 2.2 on torch 2.11, measured on the H100):
compiled only with fullgraph=False, the blocks compiled around the attention call."""

TORCH_FLASH_IMPLS = {"torch_fa4": "FA4", "torch_fa3": "FA3"}
"""Recipe attention values that plug an implementation into torch (``activate_flash_attention_impl``)."""


COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
"""A full git commit id, as a pin must be (a branch or a short id can move or clash)."""


def is_commit_sha(text: str) -> bool:
    return COMMIT_SHA.fullmatch(text) is not None


def graph_break(r: Recipe) -> str:
    """Why torch.compile cannot trace this recipe's blocks whole, or "" when it can.

    Sage was seen on the H100, the caches on the tiny model (CPU), where a fullgraph compile of a cached
    transformer fails with "Skip calling torch.compiler.disable()d function"; TE is read from its source
    (``no_torch_dynamo`` on ``Linear.forward`` through TE 2.18), not yet run.
    """
    if r.attention in GRAPH_BREAKING_ATTENTION:
        return (f"{r.attention} attention (its kernels break the graph: torch.compile fullgraph=True fails with "
                "'torch.* op returned non-Tensor')")
    if r.quant in TE_QUANT:
        return (f"quant={r.quant} (Transformer Engine's Linear.forward is torch._dynamo.disable()d: each one is a "
                "graph break, which fullgraph=True refuses)")
    if r.cache != "none":
        return (f"cache={r.cache} (diffusers' cache hooks decide each step in torch.compiler.disable()d code, "
                "which fullgraph=True refuses)")
    return ""


def dispatch_backend(attention: str) -> str:
    """The diffusers backend a recipe's ``attention`` value runs through."""
    if attention == "fa3_fp8":
        return "_flash_3"
    return "_native_flash" if attention in TORCH_FLASH_IMPLS else attention


TE_QUANT = ("te_delayed", "te_current", "te_block")
TORCHAO_QUANT = ("int8wo", "fp8_rowwise", "fp8_tensorwise")
FP8_QUANT = ("fp8_rowwise", "fp8_tensorwise", *TE_QUANT)
"""Quant values that run fp8 GEMMs: they need fp8 tensor cores (sm89+)."""
FSDP_REFUSED_QUANT = {
    "int8wo": "torchao 0.18's Int8Tensor implements neither aten.split, which FSDP2's fully_shard splits a "
              "parameter with, nor fsdp_pre_all_gather; seen on the CPU with gloo",
}
"""Quant values FSDP2 cannot shard, and the library limit why. The fp8 ones shard: torchao's float8 linears
(torchao.float8, whose weights FSDP2 all-gathers) and Transformer Engine's Linear (plain weights, cast per
forward) under fully_shard (wan_runtime/knobs/quant.py)."""
FSDP_REFUSED_CACHE = {
    "seacache": "diffusers 0.42's SeaCache runs every step in full on blocks whose parameters FSDP shards, so it "
                "would skip nothing (its leader hook 'fails open' when _is_parameter_sharded, read from its source)",
}
"""Caches that do not skip under FSDP, and why."""
SEACACHE_TASKS = ("t2v-A14B", "ti2v-5B")
"""Tasks diffusers' SeaCache adapter takes: a Wan transformer whose input and output channels match (I2V's
36 -> 16 do not)."""
DTYPES = ("bfloat16", "float16", "float32")
LIGHTNING_TASKS = ("t2v-A14B", "i2v-A14B")
"""Tasks lightx2v publishes Lightning LoRAs for (downloads.catalogue lists them)."""
SYNTHETIC = ("tiny", "random")
"""Models built locally with random weights (no checkpoint directory)."""
TE_AMAX_ALGOS = ("max", "most_recent")

#: Fields that describe *what* is generated rather than *how fast*: excluded from the recipe hash so
#: that one tuned recipe serves any prompt, image and seed.
CONTENT_FIELDS = ("model", "model_revision", "prompt", "negative_prompt", "image", "seed", "lightning_lora")

DEFAULT_PROMPT = (
    "A red fox trots through fresh snow in a birch forest at golden hour, its breath visible in the cold "
    "air; the camera tracks it at ground level, shallow depth of field, soft rim light."
)



MAX_FRAMES = 4 * 1023 + 1
"""Most frames a run takes: the Wan transformers' rotary position table holds 1024 latent frames (diffusers'
``rope_max_seq_len``), and the VAE folds 4 frames into one after the first. Beyond it the model failed with a
shape error after loading (exit 1, a work folder left); well before it a real checkpoint runs out of memory."""


def _f(default: Any, doc: str, domain: Domain) -> Any:
    """A recipe field: its default, its one-line doc and its domain (recipes.fields), declared together."""
    return field(default=default, metadata={"doc": doc, "domain": domain})


_PATH = Domain(max_chars=PATH_MAX_CHARS, path=True)
_SWITCH = Domain()  # a bool: its annotation says all
_CFG = Domain(low=1, high=50, zero="the model card's value",
              hint="use 0 for the model card's value, 1 for no CFG, or more: diffusers runs CFG only for a scale "
                   "above 1, so one between 0 and 1 would silently run as 1")


@dataclass(frozen=True)
class Recipe:
    """Every knob of one run. Keys in ``recipe.toml`` are exactly these field names."""

    # --- what to generate ---
    task: str = _f("t2v-A14B", "Wan2.2 task: t2v-A14B, i2v-A14B or ti2v-5B", Domain(choices=tuple(MODELS)))
    model: str = _f("tiny", "tiny (embedded random model), random (full-size random weights) or a checkpoint dir",
                    Domain(max_chars=PATH_MAX_CHARS, path=True, required=True,
                           allowed="tiny, random or a checkpoint directory"))
    model_revision: str = _f("", "commit SHA (40 hex) the checkpoint must be at, from its wanctl-manifest.json; "
                                 "a checkpoint at another revision is refused; empty: not pinned",
                             Domain(max_chars=40, pattern="[0-9a-f]{40}", allowed="a full 40-hex commit SHA, lower case",
                                    hint="copy 'revision' from the checkpoint's wanctl-manifest.json, or leave it empty"))
    size: str = _f("", "WIDTH*HEIGHT; empty: the task's default (1280*720 for A14B)",
                   Domain(max_chars=16, pattern="[0-9]{1,5}[*xX][0-9]{1,5}",
                          allowed="WIDTH*HEIGHT (e.g. 1280*720), or empty for the task's default",
                          hint="write it like 1280*720"))
    frames: int = _f(0, "number of frames, 4n+1; 0: the task's default (81 for A14B)",
                     Domain(low=1, high=MAX_FRAMES, zero="the task's default",
                            allowed=f"4n+1 frames, 1..{MAX_FRAMES} (the transformer's position table holds 1024 latent "
                                    "frames); 0 for the task's default"))
    steps: int = _f(0, "denoising steps; 0: the task's default (40 for A14B)",
                    Domain(low=1, high=1000, zero="the task's default"))
    guidance: float = _f(0.0, "CFG scale (high-noise expert for A14B); 0: the model card's value", _CFG)
    guidance_2: float = _f(0.0, "CFG scale of the A14B low-noise expert; 0: the model card's value", _CFG)
    shift: float = _f(0.0, "flow-matching shift of the scheduler; 0: the checkpoint's scheduler config (the model card's for tiny/random)",
                      Domain(low=0, high=50, zero="the checkpoint's scheduler config"))
    seed: int = _f(42, "random seed of the initial noise", Domain(low=0, high=2**63 - 1, allowed="0 .. 2**63-1"))
    prompt: str = _f(DEFAULT_PROMPT, "text prompt",
                     Domain(max_chars=PROMPT_MAX_CHARS, multiline=True, required=True,
                            hint=f"pass a prompt of 1 to {PROMPT_MAX_CHARS:,} characters (the text encoder reads its first "
                                 "512 tokens, about 2,000 characters of English), or omit --prompt for the default one"))
    negative_prompt: str = _f("", "negative prompt; empty: the pipeline's default",
                              Domain(max_chars=PROMPT_MAX_CHARS, multiline=True,
                                     hint=f"pass at most {PROMPT_MAX_CHARS:,} characters (the text encoder reads its first "
                                          "512 tokens), or leave it empty for the pipeline's default"))
    image: str = _f("", "conditioning image path (required for i2v-A14B, optional for ti2v-5B)", _PATH)
    dtype: str = _f("bfloat16", "dtype of the transformer(s): bfloat16, float16 or float32", Domain(choices=DTYPES))
    # --- kernels ---
    attention: str = _f("native", "diffusers attention backend name", Domain(choices=ATTENTION_BACKENDS))
    tf32: bool = _f(False, "allow TF32 in cuBLAS/cuDNN fp32 math", _SWITCH)
    fuse_qkv: bool = _f(False, "fuse the Q/K/V projections of each transformer", _SWITCH)
    quant: str = _f("none", "linear-layer quantization of the DiT blocks", Domain(choices=QUANT))
    te_amax_history_len: int = _f(16, "Transformer Engine DelayedScaling amax history length", Domain(low=1, high=1024))
    te_amax_compute_algo: str = _f("max", "Transformer Engine DelayedScaling amax algorithm: max or most_recent",
                                   Domain(choices=TE_AMAX_ALGOS))
    compile: str = _f("off", "torch.compile: off, regional (repeated blocks) or full (whole transformer)",
                      Domain(choices=COMPILE))
    compile_mode: str = _f("default", "torch.compile mode", Domain(choices=COMPILE_MODES))
    compile_fullgraph: bool = _f(True, "torch.compile fullgraph=True (fail on graph breaks)", _SWITCH)
    # --- caches ---
    cache: str = _f("none", "step cache: none, magcache, fbcache (first-block cache), seacache or taylorseer",
                    Domain(choices=CACHES))
    cache_threshold: float = _f(0.12, "cache error threshold (MagCache E, TeaCache l1, FBCache residual diff, SeaCache relative-L1 budget; TaylorSeer has none)",
                                Domain(low=0, high=1, low_open=True, high_open=True))
    magcache_k: int = _f(2, "most consecutive skipped steps (MagCache K, SeaCache; TaylorSeer predicts at most this many between computes)",
                         Domain(low=1, high=10))
    cache_retention: float = _f(0.2, "fraction of each expert's first steps always computed (MagCache R, SeaCache, TaylorSeer warm-up)",
                                Domain(low=0, high=1, high_open=True))
    # --- memory ---
    offload: str = _f("none", "CPU offload: none, model, group_block or group_leaf", Domain(choices=OFFLOAD))
    vae_tiling: bool = _f(False, "decode the VAE in tiles (less memory, slower)", _SWITCH)
    vae_slicing: bool = _f(False, "decode the batch one video at a time", _SWITCH)
    # --- parallelism ---
    gpus: int = _f(1, "GPUs used by one run (torchrun --nproc_per_node)", Domain(low=1, high=64))
    ulysses: int = _f(1, "Ulysses sequence-parallel degree", Domain(low=1, high=64))
    ring: int = _f(1, "ring-attention degree (diffusers' ring: each rank's K/V go round the others); with ulysses, "
                      "ulysses x ring ranks split the sequence", Domain(low=1, high=64))
    cfg_parallel: bool = _f(False, "run the conditional and unconditional passes on two GPU groups", _SWITCH)
    fsdp: bool = _f(False, "shard the DiT and text encoder with FSDP2", _SWITCH)
    # --- distillation ---
    lightning: int = _f(0, "Lightning distilled LoRA steps: 0 (off) or 4", Domain(choices=LIGHTNING_STEPS))
    lightning_lora: str = _f("", "folder of the Lightning LoRA pair (wanctl download --task t2v-A14B-lightning); "
                                 "empty: the model's own random LoRA for tiny/random", _PATH)

    # ----------------------------------------------------------------- derived
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field_doc(cls, name: str) -> str:
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}[name]

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def workload(self) -> tuple[str, int, int]:
        """(size, frames, steps) this recipe runs at, the task's defaults filled in: what its timings and a
        speed-up measured with it belong to."""
        r = self.resolved()
        return r.size, r.frames, r.steps

    def resolved(self) -> Recipe:
        """The same recipe with every 'model default' (0 / empty) replaced by the task's value."""
        spec = model_spec(self.task)
        lightning = self.lightning > 0
        return self.replace(
            size=self.size or (spec.default_size if self.model != "tiny" else _tiny_size(self.task)),
            frames=self.frames or (spec.default_frames if self.model != "tiny" else 9),
            steps=self.steps or (self.lightning if lightning else (spec.default_steps if self.model != "tiny" else 6)),
            guidance=self.guidance or (1.0 if lightning else spec.guidance),
            guidance_2=self.guidance_2 or (1.0 if lightning else (spec.guidance_2 or 0.0)),
            lightning_lora=self.lightning_lora or (self.model if lightning and self.model in SYNTHETIC else ""),
        )

    def with_absolute_paths(self, cwd: Path | None = None) -> Recipe:
        """The path fields (a checkpoint folder, the I2V image, the Lightning LoRA folder) made absolute
        against ``cwd`` (the current directory when None): the runtime runs in a folder of its own, and
        launch.sh and the store are used from anywhere, where a relative path names nothing."""
        base = cwd or Path.cwd()

        def absolute(value: str) -> str:
            if not value or value in SYNTHETIC:
                return value
            return str((base / Path(value).expanduser()).resolve())

        return self.replace(model=absolute(self.model), image=absolute(self.image),
                            lightning_lora=absolute(self.lightning_lora))

    def knob_dict(self) -> dict[str, Any]:
        """Fields that define the optimization stack and workload (everything but the content)."""
        return {k: v for k, v in self.to_dict().items() if k not in CONTENT_FIELDS}

    def recipe_hash(self) -> str:
        """Stable hash of the knobs: names output folders, never a timestamp or a random number. Fields at their
        default are left out, so a field added later (its default: the behaviour before it existed) leaves every
        earlier recipe's hash, its stored studies and folders as they were."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        knobs = {k: v for k, v in self.resolved().knob_dict().items() if v != defaults.get(k, dataclasses.MISSING)}
        blob = json.dumps(knobs, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def lossy_knobs(self) -> list[str]:
        """Knobs that change the output beyond numerical noise (the gate's loose tier), e.g. 'cache=fbcache':
        each value's tier is the knob catalogue's (recipes.catalogue), the one rule the gate and --tier read."""
        return lossy_settings(self)

    def diff(self, other: Recipe) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: (self's, other's)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def stack_label(self, baseline: Recipe | None = None) -> str:
        """Short human label of the optimization stack, e.g. 'attention=_native_cudnn+compile=regional'."""
        base = baseline or Recipe(task=self.task, model=self.model)
        keep = ("attention", "tf32", "fuse_qkv", "quant", "compile", "compile_mode", "cache", "cache_threshold",
                "magcache_k", "offload", "vae_tiling", "ulysses", "ring", "cfg_parallel", "fsdp", "lightning")
        parts = [f"{k}={v[0]}" for k, v in self.diff(base).items() if k in keep]
        return "+".join(parts) or "baseline"

    @classmethod
    def for_task(cls, task: str, **changes: Any) -> Recipe:
        """A recipe with plain-diffusers defaults for ``task`` (model defaults resolved)."""
        return cls(task=task, **changes).resolved()


def _tiny_size(task: str) -> str:
    return "64*64" if task == "ti2v-5B" else "64*48"


def validate(recipe: Recipe) -> Recipe:
    """Raise a RecipeError naming the field, its value and what is allowed; return the recipe if valid.

    First every field against its own declared domain (recipes.fields: type, range, choices, text bounds),
    then the rules that join several fields.
    """
    r = recipe
    check_fields(r, RecipeError)
    spec = MODELS[r.task]
    if r.model_revision and r.model in SYNTHETIC:
        raise RecipeError("model_revision", r.model_revision, f"empty for the {r.model} model (it has no revision)",
                          hint="drop model_revision, or set model to a downloaded checkpoint directory")
    if r.size:
        w, h = parse_size(r.size)
        if r.model == "tiny":
            m = spec.size_multiple
            if w % m or h % m or not (16 <= w <= 512 and 16 <= h <= 512):
                raise RecipeError("size", r.size, f"for the tiny model: WIDTH and HEIGHT multiples of {m}, 16..512")
        elif r.size not in spec.sizes:
            raise RecipeError("size", r.size, f"for {r.task}: one of {', '.join(spec.sizes)}")
    t = spec.vae_temporal  # the VAE keeps the first frame and folds each further t frames into one latent frame
    if r.frames and (r.frames - 1) % t:
        below = (r.frames - 1) // t * t + 1
        raise RecipeError("frames", r.frames, f"{t}n+1 (e.g. {', '.join(str(t * n + 1) for n in (4, 8, 12, 20, 30))})",
                          hint=f"use {below} or {below + t}" if r.frames > 1
                          else "use 1 (an image), 17, 33, 49 or 81; 0 for the task's default")
    if r.guidance_2 and spec.experts == 1:
        raise RecipeError("guidance_2", r.guidance_2, f"0 for {r.task} (one transformer: there is no low-noise expert "
                          "to guide)", hint="drop guidance_2, or set guidance")
    if spec.needs_image and not r.image:
        raise RecipeError("image", r.image, f"a path: {r.task} needs a conditioning image", hint="pass --image IMG.png")
    if r.image and not (spec.needs_image or spec.image_optional):
        raise RecipeError("image", r.image, f"empty: {r.task} takes no image", hint="use i2v-A14B or ti2v-5B")
    if r.cache == "seacache" and r.task not in SEACACHE_TASKS:
        raise RecipeError("cache", r.cache, f"not seacache for {r.task}: diffusers' SeaCache adapter takes Wan "
                          "transformers whose input and output channels match", hint="use magcache or fbcache")
    # parallelism
    heads = TINY_NUM_HEADS if r.model == "tiny" else spec.num_heads
    if heads % r.ulysses:
        divs = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 64]
        raise RecipeError("ulysses", r.ulysses, f"a divisor of the {heads} attention heads: {divs}",
                          hint="ring attention splits the sequence without splitting heads: e.g. a smaller ulysses "
                               "degree times a ring degree")
    split = r.ulysses * r.ring  # each rank attends for its share of the tokens: found here, not after a model load
    if split > 1:
        rr = r.resolved()
        tokens = spec.tokens(rr.size, rr.frames)
        if tokens % split and r.ring == 1:
            divs = [d for d in range(2, heads + 1) if heads % d == 0 and tokens % d == 0]
            raise RecipeError("ulysses", r.ulysses, f"a divisor of the {tokens}-token sequence of {rr.size} x "
                              f"{rr.frames} frames", hint=f"use ulysses {' or '.join(map(str, divs))} here, or "
                              "another size or frame count" if divs else "use another size or frame count")
        if tokens % split:
            divs = [d for d in range(2, 65) if tokens % d == 0]
            raise RecipeError("ring", r.ring, f"a ring degree whose product with ulysses {r.ulysses} divides the "
                              f"{tokens}-token sequence of {rr.size} x {rr.frames} frames",
                              hint=f"ulysses x ring may be {', '.join(map(str, divs))} here, or use another size or "
                              "frame count" if divs else "use another size or frame count")
    if r.cfg_parallel and r.gpus < 2:
        raise RecipeError("cfg_parallel", r.cfg_parallel, "False on one GPU (needs two GPU groups)")
    if r.fsdp and r.gpus < 2:
        raise RecipeError("fsdp", r.fsdp, "False on one GPU")
    groups = split * (2 if r.cfg_parallel else 1)
    if r.gpus > 1 and groups == 1 and not r.fsdp:
        raise RecipeError("gpus", r.gpus, "1 unless ulysses > 1, ring > 1, cfg_parallel or fsdp uses the extra GPUs")
    if r.gpus != groups and groups > 1:
        # Spare GPUs would only repeat a group's work: one run is one set of groups.
        per_group = r.gpus // (2 if r.cfg_parallel else 1)
        raise RecipeError("gpus", r.gpus, f"ulysses x ring x cfg-parallel = {groups}",
                          hint=f"use --gpus {groups}, or ulysses x ring = {per_group}")
    if r.ring > 1 and r.attention not in RING_ATTENTION:
        # Ulysses runs any kernel (diffusers' all-to-all, or wanctl's around the kernels diffusers cannot split);
        # a ring needs each kernel's log-sum-exp to merge the partial results, and diffusers' ring to pass K/V.
        raise RecipeError("attention", r.attention, f"one of {', '.join(RING_ATTENTION)} with ring > 1 (diffusers "
                          "rings only these: its ring merges the partial results by their log-sum-exp)",
                          hint="use ring 1 (Ulysses runs every kernel), or one of these kernels")
    if r.fsdp and r.cfg_parallel and split == 1:
        raise RecipeError("fsdp", r.fsdp, "False with cfg_parallel and ulysses x ring 1 (FSDP shards within a CFG "
                          "group, one GPU each here)", hint="add ulysses 2 or more, or drop fsdp")
    if r.fsdp and r.quant in FSDP_REFUSED_QUANT:
        raise RecipeError("quant", r.quant, f"not {r.quant} with fsdp ({FSDP_REFUSED_QUANT[r.quant]})",
                          hint=f"use one of {', '.join(q for q in QUANT if q not in FSDP_REFUSED_QUANT)} with fsdp, "
                               "or drop fsdp")
    if r.fsdp and r.cache in FSDP_REFUSED_CACHE:
        raise RecipeError("cache", r.cache, f"not {r.cache} with fsdp ({FSDP_REFUSED_CACHE[r.cache]})",
                          hint="use magcache, fbcache or taylorseer with fsdp, or drop fsdp")
    if r.gpus > 1 and r.compile == "full":
        raise RecipeError("compile", r.compile, "off or regional with several GPUs (the parallel exchanges "
                          "sit in the whole model's forward)")
    # combinations
    if r.quant in TE_QUANT and r.compile == "full":
        raise RecipeError("compile", r.compile, "off or regional with Transformer Engine fp8 (TE modules do not trace whole)")
    if r.offload != "none" and (r.gpus > 1):
        raise RecipeError("offload", r.offload, "none with several GPUs (use fsdp to save memory instead)")
    if r.offload.startswith("group") and r.compile == "full":
        raise RecipeError("compile", r.compile, "off or regional with group offload")
    if r.compile != "off" and r.compile_fullgraph and graph_break(r):
        raise RecipeError("compile_fullgraph", True, f"False with {graph_break(r)}",
                          hint="set compile_fullgraph = false (--set compile_fullgraph=false)")
    _check_lightning(r)
    if r.lightning and r.cache != "none":
        raise RecipeError("cache", r.cache, "none with Lightning (4 steps leave nothing to skip)")
    if r.lightning and r.steps and r.steps != r.lightning:
        raise RecipeError("steps", r.steps, f"{r.lightning} (the Lightning LoRA's distilled step count) or 0")
    if r.cfg_parallel and (r.resolved().guidance <= 1.0 or r.lightning):
        # diffusers runs CFG only for guidance > 1: with one pass per step, a CFG group would wait for the other
        raise RecipeError("cfg_parallel", r.cfg_parallel, "False when CFG is off (guidance <= 1 or Lightning)",
                          hint="drop cfg_parallel, or use a guidance above 1")
    return r


def _check_lightning(r: Recipe) -> None:
    if r.lightning and r.task not in LIGHTNING_TASKS:
        raise RecipeError("lightning", r.lightning, f"0 for {r.task} (Lightning LoRAs exist for "
                          f"{', '.join(LIGHTNING_TASKS)})")
    if r.lightning_lora and not r.lightning:
        raise RecipeError("lightning_lora", r.lightning_lora, "empty unless lightning is on (it would not be loaded)",
                          hint="set lightning = 4, or drop lightning_lora")
    if not r.lightning:
        return
    if r.model in SYNTHETIC:
        if r.lightning_lora in SYNTHETIC and r.lightning_lora != r.model:
            raise RecipeError("lightning_lora", r.lightning_lora, f"empty, {r.model!r} or a LoRA folder saved for "
                              f"the {r.model} model")
    elif not r.lightning_lora or r.lightning_lora in SYNTHETIC:
        raise RecipeError("lightning_lora", r.lightning_lora, "the folder of the Lightning LoRA pair for a checkpoint",
                          hint=f"wanctl download --task {r.task}-lightning, then pass that folder")
