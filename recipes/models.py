"""What wanctl knows about each Wan2.2 task, as plain data.

The numbers come from the Wan2.2 model cards and the diffusers checkpoints' configs; they are used
to validate recipes (allowed sizes, Ulysses degrees that divide the head count), to price trials
(FLOPs, memory) and to build the full-size random-weights model, so they are kept in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.errors import BadInput

A14B_SIZES = ("1280*720", "720*1280", "832*480", "480*832", "1280*704", "704*1280", "1024*704", "704*1024")
TI2V_5B_SIZES = ("1280*704", "704*1280")


TEXT_TOKENS = 512
"""The Wan pipelines' max_sequence_length: the text encoder reads this many tokens (the rest is dropped), and
cross-attention attends over them."""
TINY_NUM_HEADS = 4
"""Attention heads of the tiny test model (wan_runtime.tiny builds it): what a Ulysses degree must divide."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and sampling defaults of one Wan2.2 task."""

    task: str
    """Task name as users type it."""
    pipeline: str
    """diffusers pipeline class used for this task."""
    experts: int
    """Transformers in the checkpoint: 2 for the A14B MoE (high-noise, low-noise), 1 for 5B."""
    boundary_ratio: float | None
    """Fraction of the timestep range run by the high-noise expert (A14B only)."""
    num_layers: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    vae_z_dim: int
    vae_spatial: int
    """Spatial down-sampling of the VAE: 8 for the Wan2.1 VAE (z16) the A14B tasks use, 16 for the Wan2.2 VAE
    (z48) of TI2V-5B (diffusers' ``scale_factor_spatial``)."""
    vae_temporal: int
    """Temporal down-sampling of the VAE, 4 for both: the first frame is kept, every further 4 frames become one
    latent frame, hence 4n+1 frames (diffusers' ``scale_factor_temporal``)."""
    patch_size: tuple[int, int, int]
    """(frames, height, width) the DiT's patch embedding folds into one token: (1, 2, 2) for every Wan2.2
    transformer (the checkpoints' ``patch_size``)."""
    needs_image: bool
    image_optional: bool
    sizes: tuple[str, ...]
    default_size: str
    default_frames: int
    default_steps: int
    guidance: float
    guidance_2: float | None
    shift: float
    fps: int
    hf_repo: str
    ms_repo: str
    params_per_expert: float
    """Parameter count of one transformer, for memory estimates."""

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def size_multiple(self) -> int:
        """WIDTH and HEIGHT must be multiples of this: one latent pixel is ``vae_spatial`` pixels and one token
        a patch of latent pixels (the patch is square), the rounding diffusers' Wan pipelines apply."""
        return self.vae_spatial * self.patch_size[2]

    def latent_shape(self, size: str, frames: int) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) for a video of ``size`` x ``frames``: the
        shape the VAE encodes to and decodes from, as diffusers' Wan pipelines compute it."""
        w, h = parse_size(size)
        return (
            self.vae_z_dim,
            (frames - 1) // self.vae_temporal + 1,
            h // self.vae_spatial,
            w // self.vae_spatial,
        )

    def tokens(self, size: str, frames: int) -> int:
        """Sequence length the DiT attends over: the latent cut into ``patch_size`` patches. Everything that
        prices a workload (FLOPs, activations, attention scores, the Ulysses split) counts these."""
        _, f, h, w = self.latent_shape(size, frames)
        pf, ph, pw = self.patch_size
        return (f // pf) * (h // ph) * (w // pw)

    def forward_flops(self, size: str, frames: int, text_len: int = TEXT_TOKENS) -> float:
        """FLOPs of one transformer forward (matmuls and attention), the basis of the FLOP floor."""
        n = self.tokens(size, frames)
        d = self.dim
        per_block = (
            2 * n * d * 3 * d  # self-attn qkv
            + attention_flops(n, n, d)  # self-attn scores and values
            + 2 * n * d * d  # self-attn out
            + 2 * n * d * d + 2 * text_len * d * 2 * d  # cross-attn q, kv
            + attention_flops(n, text_len, d)  # cross-attn scores and values
            + 2 * n * d * d  # cross-attn out
            + 2 * 2 * n * d * self.ffn_dim  # ffn
        )
        return float(per_block * self.num_layers)


def attention_flops(queries: int, keys: int, dim: int) -> int:
    """FLOPs of one attention's two matmuls (Q K^T, then the scores times V) over all heads, ``dim`` being
    heads x head_dim: 2 FLOPs per multiply-add, each matmul queries x keys x dim multiply-adds."""
    return 4 * queries * keys * dim


MODELS: dict[str, ModelSpec] = {
    "t2v-A14B": ModelSpec(
        task="t2v-A14B", pipeline="WanPipeline", experts=2, boundary_ratio=0.875,
        patch_size=(1, 2, 2), num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824, in_channels=16, out_channels=16,
        text_dim=4096, vae_z_dim=16, vae_spatial=8, vae_temporal=4, needs_image=False, image_optional=False,
        sizes=A14B_SIZES, default_size="1280*720", default_frames=81, default_steps=40,
        guidance=4.0, guidance_2=3.0, shift=12.0, fps=16,
        hf_repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers", ms_repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        params_per_expert=14.3e9,
    ),
    "i2v-A14B": ModelSpec(
        task="i2v-A14B", pipeline="WanImageToVideoPipeline", experts=2, boundary_ratio=0.9,
        patch_size=(1, 2, 2), num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824, in_channels=36, out_channels=16,
        text_dim=4096, vae_z_dim=16, vae_spatial=8, vae_temporal=4, needs_image=True, image_optional=False,
        sizes=A14B_SIZES, default_size="1280*720", default_frames=81, default_steps=40,
        guidance=3.5, guidance_2=3.5, shift=5.0, fps=16,
        hf_repo="Wan-AI/Wan2.2-I2V-A14B-Diffusers", ms_repo="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        params_per_expert=14.3e9,
    ),
    "ti2v-5B": ModelSpec(
        task="ti2v-5B", pipeline="WanPipeline", experts=1, boundary_ratio=None,
        patch_size=(1, 2, 2), num_layers=30, num_heads=24, head_dim=128, ffn_dim=14336, in_channels=48, out_channels=48,
        text_dim=4096, vae_z_dim=48, vae_spatial=16, vae_temporal=4, needs_image=False, image_optional=True,
        sizes=TI2V_5B_SIZES, default_size="1280*704", default_frames=121, default_steps=50,
        guidance=5.0, guidance_2=None, shift=5.0, fps=24,
        hf_repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers", ms_repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        params_per_expert=5.0e9,
    ),
}


def model_spec(task: str) -> ModelSpec:
    """The spec of ``task``; a clear BadInput naming the tasks when it is unknown."""
    try:
        return MODELS[task]
    except KeyError:
        raise BadInput(
            f"unknown task {task!r}", f"use one of: {', '.join(MODELS)}"
        ) from None


def lightning_dirname(task: str) -> str:
    """Folder name a Lightning LoRA download of ``task`` gets by default (next to the pipeline checkpoint),
    where the tuner looks for it."""
    return f"Wan2.2-Lightning-{task}"


def parse_size(size: str) -> tuple[int, int]:
    """'1280*720' -> (1280, 720): width first, as Wan2.2's own CLI writes it."""
    try:
        w, h = size.lower().replace("x", "*").split("*")
        return int(w), int(h)
    except ValueError:
        raise BadInput(f"size {size!r} is not WIDTH*HEIGHT", "write it like 1280*720") from None
