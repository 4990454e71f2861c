"""Peak GPU memory of a Wan2.2 run, phase by phase, from the model's shape and measured constants.

One model for the whole product: the search space (which offload values to try), the recipe adapter
(the least memory plan the baseline needs) and the download advice all ask it. It is an estimate, used
to avoid runs that cannot fit; the tuner still records a real OOM and falls back from it.

Why phases: the peak is not always in the denoise loop. With every component resident (plain diffusers),
720p VAE decode adds ~20 GiB on top of both A14B experts and the text encoder, and that is where an
80 GB card runs out (measured: BENCHMARKS.md, "VAE decode memory").
"""

from __future__ import annotations

from recipes.models import model_spec, parse_size

GIB = 1024**3

TEXT_ENCODER_PARAMS = 5.7e9
"""UMT5-XXL encoder (the Wan2.2 text encoder), parameters."""
VAE_WEIGHTS_GIB = {16: 0.47, 48: 2.63}
"""fp32 VAE weights by latent channels (z16: Wan2.1 VAE used by A14B; z48: Wan2.2 VAE), measured."""
DECODE_GIB_PER_MPX = {16: 21.0, 48: 22.0}
"""VAE decode working memory per million output pixels of one frame, above what is resident. Measured on
H100 (benchmarks/vae_decode_mem.py, 2026-11-24): z16 1280x720x81 20.2 GiB and 832x480x81 8.76 GiB,
z48 1280x704x121 21.0 GiB, each including the fp32 output video, which is added separately here.
Nearly independent of the frame count: the decoder runs causally, a few latent frames at a time."""
TILED_DECODE_FRACTION = 0.3
"""Tiled decode's working memory vs untiled: measured 0.19 (720p z16), 0.21 (480p z16), 0.27 (z48)."""
ACTIVATION_FACTOR = 8.0
"""Peak activations of one DiT forward ~ this many bf16 hidden states (tokens x dim): the H100 anchor
measured 34.6 GB peak for one A14B expert at 720p/81f, 28.6 GB of it weights, 6.0 GB over 0.77 GB states."""
OVERHEAD_GIB = 2.0
"""CUDA context, cuBLAS/cuDNN workspaces and allocator slack, per GPU."""
HEADROOM = 0.95
"""Plan to use at most this share of a GPU: the allocator fragments, and the estimate is an estimate."""
PHASES = ("text_encode", "denoise", "vae_decode")


def usable_gib(gpu_gib: float) -> float:
    """The memory a plan may fill on a GPU of ``gpu_gib``: the one margin the recipe adapter, the search
    space and the download advice all compare estimates against."""
    return gpu_gib * HEADROOM


def weights_gib(task: str, weight_bytes: float = 2.0) -> tuple[float, float]:
    """(one expert/DiT, text encoder) weights in GiB; ``weight_bytes`` 2 for bf16, 1 for 8-bit DiT weights."""
    spec = model_spec(task)
    return spec.params_per_expert * weight_bytes / GIB, TEXT_ENCODER_PARAMS * 2 / GIB


def decode_gib(task: str, size: str, frames: int, tiled: bool) -> float:
    """Working memory VAE decode adds at this size, plus the fp32 video it returns."""
    spec = model_spec(task)
    w, h = parse_size(size)
    work = DECODE_GIB_PER_MPX[spec.vae_z_dim] * w * h / 1e6
    if tiled:
        work *= TILED_DECODE_FRACTION
    return work + frames * 3 * w * h * 4 / GIB


def phase_peaks_gib(task: str, model: str, *, size: str = "", frames: int = 0, offload: str = "none",
                    vae_tiling: bool = False, weight_bytes: float = 2.0, shards: int = 1) -> dict[str, float]:
    """Estimated peak GPU memory (GiB, per GPU) in each phase of one run.

    ``offload``: none (every component resident, as plain diffusers), model (diffusers model offload:
    one component at a time, but the last expert stays until the VAE runs, which measurement shows),
    group_* (weights streamed block by block). ``shards``: FSDP ways over the DiT and text encoder.
    The tiny model is a few MB: only the overhead remains.
    """
    if model == "tiny":
        return {p: OVERHEAD_GIB for p in PHASES}
    spec = model_spec(task)
    size = size or spec.default_size
    frames = frames or spec.default_frames
    expert, text = weights_gib(task, weight_bytes)
    expert, text = expert / shards, text / shards  # FSDP shards the DiT and the text encoder
    vae = VAE_WEIGHTS_GIB[spec.vae_z_dim]
    acts = ACTIVATION_FACTOR * spec.tokens(size, frames) * spec.dim * 2 / GIB
    dec = decode_gib(task, size, frames, vae_tiling)
    if offload == "none":
        resident = spec.experts * expert + text + vae
        peaks = {"text_encode": resident, "denoise": resident + acts, "vae_decode": resident + dec}
    elif offload == "model":
        peaks = {"text_encode": text, "denoise": expert + acts, "vae_decode": expert + vae + dec}
    else:  # group offload: one block's weights at a time (plus its prefetched neighbour)
        block = 2 * expert / spec.num_layers
        peaks = {"text_encode": text / 12, "denoise": block + acts, "vae_decode": vae + dec}
    return {p: v + OVERHEAD_GIB for p, v in peaks.items()}


def peak_gib(task: str, model: str, **kw: object) -> float:
    """The largest of :func:`phase_peaks_gib` (same arguments)."""
    return max(phase_peaks_gib(task, model, **kw).values())  # type: ignore[arg-type]


def host_weights_gib(task: str) -> float:
    """Host RAM that offload parks the model in (all experts and the text encoder, bf16)."""
    expert, text = weights_gib(task)
    return model_spec(task).experts * expert + text


SCORE_MATERIALIZING = ("_native_math", "flex")
"""Attention backends that hold the whole fp32 score matrix (heads x tokens x tokens) at once when run
eagerly. Measured on H100 at A14B 1280*720x81 (75,600 tokens, 40 heads): both OOM asking for 851.66 GiB
in one allocation, exactly 40 x 75,600^2 x 4 bytes (tune at commit 6c90de2, trials 4 and 5)."""


def attention_scores_gib(task: str, backend: str, *, size: str = "", frames: int = 0) -> float:
    """The single allocation a score-materializing backend makes in each attention call (0 for the
    fused kernels, whose memory is linear in the sequence): prices such a trial before it is run."""
    if backend not in SCORE_MATERIALIZING:
        return 0.0
    spec = model_spec(task)
    n = spec.tokens(size or spec.default_size, frames or spec.default_frames)
    return spec.num_heads * n * n * 4 / GIB
