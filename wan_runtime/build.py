"""Build a diffusers Wan2.2 pipeline for a Recipe: tiny, full-size random, or a checkpoint directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from recipes.errors import BadInput
from recipes.models import model_spec
from recipes.recipe import SYNTHETIC, Recipe

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pipeline_class(task: str, with_image: bool) -> Any:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if task == "i2v-A14B" or (task == "ti2v-5B" and with_image):
        return WanImageToVideoPipeline
    return WanPipeline


def build_pipeline(recipe: Recipe, device: torch.device, trust_checkpoint: bool = False) -> Any:
    """The pipeline for ``recipe`` on ``device`` (offload knobs may move parts back to the CPU later)."""
    spec = model_spec(recipe.task)
    dtype = DTYPES[recipe.dtype]
    cls = pipeline_class(recipe.task, bool(recipe.image))
    if recipe.model in SYNTHETIC:
        from wan_runtime.tiny import TINY, build_components, full_width

        width = TINY if recipe.model == "tiny" else full_width(spec)
        # The full-size model is built straight on the GPU (random init on the host would take minutes).
        where = device if recipe.model == "random" else torch.device("cpu")
        comps = build_components(spec, width, seed=0, device=where, dtype=dtype, shift=recipe.shift,
                                 park=recipe.model == "random" and recipe.offload != "none")
        if cls.__name__ == "WanImageToVideoPipeline":
            comps.update(image_encoder=None, image_processor=None)
        pipe = cls(**comps)
    else:
        pipe = _from_checkpoint(recipe, cls, dtype, trust_checkpoint)
    if recipe.shift and recipe.model not in SYNTHETIC:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=recipe.shift)
    if recipe.offload == "none" and recipe.fsdp:
        # FSDP shards the DiTs and the text encoder where they are and moves only the shards to the GPU.
        for name, part in pipe.components.items():
            if isinstance(part, torch.nn.Module) and name not in ("transformer", "transformer_2", "text_encoder"):
                part.to(device)
    elif recipe.offload == "none":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_checkpoint(recipe: Recipe, cls: Any, dtype: torch.dtype, trust: bool) -> Any:
    root = Path(recipe.model).expanduser()
    check_checkpoint_dir(root, recipe.task, trust, recipe.model_revision)
    vae_dtype = torch.float32
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype, use_safetensors=True)
    return cls.from_pretrained(root, vae=vae, torch_dtype=dtype, use_safetensors=True)


def check_checkpoint_dir(root: Path, task: str, trust: bool = False, revision: str = "") -> None:
    """Refuse what must not be loaded (recipes.manifest does the checking): missing or partial downloads,
    another task's model, pickle weights, another commit than the recipe pins; a directory without
    wanctl's manifest only with ``trust``."""
    from recipes.manifest import check_revision, verify_checkpoint_dir

    check_revision(root, verify_checkpoint_dir(root, task=task, allow_missing_manifest=trust), revision)


def load_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadInput(f"image {p} does not exist", "pass an existing PNG/JPEG with --image") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BadInput(f"image {p} is not a readable image ({exc})", "pass a PNG or JPEG file") from None
