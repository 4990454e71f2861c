"""Wan2.2-shaped pipelines built locally: the tiny random model and the full-size random model.

The tiny model has every component of the real one (two experts with a boundary for A14B, the Wan2.1
z16 VAE or the Wan2.2 z48 VAE, a UMT5 encoder, a tokenizer) at toy width, so the whole product runs on
a CPU in seconds with no download. The full-size random model builds the real architecture on the GPU:
speed does not depend on weight values, so a GPU host can be tuned before its checkpoint arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from recipes.models import TEXT_TOKENS, TINY_NUM_HEADS, ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Width:
    """The sizes that differ between the tiny and the full-size build."""

    heads: int
    head_dim: int
    ffn: int
    layers: int
    text_dim: int
    t5_layers: int
    t5_heads: int
    t5_ff: int
    t5_kv: int
    vae_base: int
    vae_mult: tuple[int, ...]
    vae_res_blocks: int


TINY = Width(heads=TINY_NUM_HEADS, head_dim=16, ffn=128, layers=3, text_dim=32, t5_layers=2, t5_heads=4, t5_ff=64, t5_kv=8,
             vae_base=8, vae_mult=(1, 1, 1, 1), vae_res_blocks=1)


def full_width(spec: ModelSpec) -> Width:
    """The real architecture (UMT5-XXL encoder, Wan VAEs at their released widths)."""
    return Width(heads=spec.num_heads, head_dim=spec.head_dim, ffn=spec.ffn_dim, layers=spec.num_layers,
                 text_dim=spec.text_dim, t5_layers=24, t5_heads=64, t5_ff=10240, t5_kv=64,
                 vae_base=160 if spec.vae_z_dim == 48 else 96,
                 vae_mult=(1, 2, 4, 4), vae_res_blocks=2)


def build_tokenizer(max_length: int = TEXT_TOKENS) -> Any:
    """A byte-level tokenizer made in memory: any prompt (unicode included) tokenizes, no hub access."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def build_components(spec: ModelSpec, width: Width, seed: int = 0, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, shift: float = 0.0, park: bool = False) -> dict[str, Any]:
    """All pipeline components with deterministic random weights (seeded per component).

    ``park``: build each component on ``device`` (fast random init) and move it to the CPU before the next
    is built, so a model that does not fit the GPU whole can still be built there for offloaded runs.
    """

    tokenizer = build_tokenizer()
    previous = torch.get_default_dtype()
    # Build in the target dtype: a 14B expert built in fp32 first would need 57 GB before the cast.
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        return _build(spec, width, seed, device, dtype, shift, tokenizer, park)
    finally:
        torch.set_default_dtype(previous)


def build_vae(spec: ModelSpec, width: Width, seed: int = 0, device: str | torch.device = "cpu") -> Any:
    """The task's VAE (Wan2.1 z16 or Wan2.2 z48) with seeded random weights, in fp32 as diffusers runs it."""
    from diffusers import AutoencoderKLWan

    vae_kw: dict[str, Any] = dict(base_dim=width.vae_base, z_dim=spec.vae_z_dim, dim_mult=list(width.vae_mult),
                                  num_res_blocks=width.vae_res_blocks, temperal_downsample=[False, True, True])
    if spec.vae_z_dim == 48:  # the Wan2.2 VAE: patchified, residual, 16x spatial compression
        vae_kw.update(in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                      scale_factor_spatial=spec.vae_spatial, scale_factor_temporal=spec.vae_temporal,
                      decoder_base_dim=256 if width is not TINY else None)
        # diffusers' defaults are the z16 VAE's statistics; random weights need only the right length.
        vae_kw.update(latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device(device):
            torch.manual_seed(seed + 1)
            return AutoencoderKLWan(**vae_kw).eval()
    finally:
        torch.set_default_dtype(previous)


def wan_transformer(spec: ModelSpec, width: Width, layers: int) -> Any:
    """One Wan expert of ``spec`` at ``width`` with ``layers`` blocks, its random weights drawn from torch's
    current seed, in the current default dtype and device context: the caller sets both, so a 14B expert is
    born where and as it will run (built in fp32 on the host first, it would need 57 GB before the cast).
    The slice rung builds the same expert cut to a few blocks."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=spec.patch_size, num_attention_heads=width.heads, attention_head_dim=width.head_dim,
        in_channels=spec.in_channels, out_channels=spec.out_channels, text_dim=width.text_dim,
        freq_dim=256, ffn_dim=width.ffn, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )


def _build(spec: ModelSpec, width: Width, seed: int, device: str | torch.device, dtype: torch.dtype,
           shift: float, tokenizer: Any, park: bool) -> dict[str, Any]:
    from diffusers import UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device(device):
        torch.manual_seed(seed)
        t5_cfg = UMT5Config(vocab_size=len(tokenizer), d_model=width.text_dim, d_kv=width.t5_kv,
                            d_ff=width.t5_ff, num_layers=width.t5_layers, num_heads=width.t5_heads,
                            feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", pad_token_id=0,
                            eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
        text_encoder = _parked(UMT5EncoderModel(t5_cfg).to(dtype).eval(), park)

    vae = _parked(build_vae(spec, width, seed, device), park)
    with torch.device(device):

        def transformer(k: int) -> Any:
            torch.manual_seed(seed + 10 + k)
            return wan_transformer(spec, width, width.layers).to(dtype).eval()

        transformer_1 = _parked(transformer(0), park)
        transformer_2 = _parked(transformer(1), park) if spec.experts == 2 else None
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift or spec.shift)
    comps: dict[str, Any] = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=transformer_1, transformer_2=transformer_2,
                                 boundary_ratio=spec.boundary_ratio)
    if spec.task == "ti2v-5B":
        comps["expand_timesteps"] = True
    return comps


def _parked(module: Any, park: bool) -> Any:
    if park:
        module = module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return module
