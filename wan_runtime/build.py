"""Build a diffusers Wan2.2 pipeline for a Recipe: tiny, full-size random, or a checkpoint directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from recipes.errors import BadInput, CheckpointError
from recipes.models import model_spec
from recipes.recipe import Recipe

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pipeline_class(task: str, with_image: bool) -> Any:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if task == "i2v-A14B" or (task == "ti2v-5B" and with_image):
        return WanImageToVideoPipeline
    return WanPipeline


def build_pipeline(recipe: Recipe, device: torch.device) -> Any:
    """The pipeline for ``recipe`` on ``device`` (offload knobs may move parts back to the CPU later)."""
    spec = model_spec(recipe.task)
    dtype = DTYPES[recipe.dtype]
    cls = pipeline_class(recipe.task, bool(recipe.image))
    if recipe.model in ("tiny", "random"):
        from wan_runtime.tiny import TINY, build_components, full_width

        width = TINY if recipe.model == "tiny" else full_width(spec)
        # The full-size model is built straight on the GPU (random init on the host would take minutes).
        where = device if recipe.model == "random" else torch.device("cpu")
        comps = build_components(spec, width, seed=0, device=where, dtype=dtype, shift=recipe.shift)
        if cls.__name__ == "WanImageToVideoPipeline":
            comps.update(image_encoder=None, image_processor=None)
        pipe = cls(**comps)
    else:
        pipe = _from_checkpoint(recipe, cls, dtype)
    if recipe.shift and recipe.model not in ("tiny", "random"):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=recipe.shift)
    if recipe.offload == "none":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_checkpoint(recipe: Recipe, cls: Any, dtype: torch.dtype) -> Any:
    root = Path(recipe.model).expanduser()
    check_checkpoint_dir(root, recipe.task)
    vae_dtype = torch.float32
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype, use_safetensors=True)
    return cls.from_pretrained(root, vae=vae, torch_dtype=dtype, use_safetensors=True)


def check_checkpoint_dir(root: Path, task: str) -> None:
    """Refuse what must not be loaded: missing/partial dirs, another task's model, pickle weights.

    The download manifest (recipes.manifest) is checked when present; without it the directory is
    still checked for layout and pickles, because users also point wanctl at checkpoints they fetched
    themselves.
    """
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist",
                              f"run 'wanctl download --task {task} --dir {root}' or pass --model tiny|random")
    index = root / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{root} has no model_index.json: not a diffusers checkpoint (or a partial download)",
                              f"run 'wanctl download --task {task} --dir {root}'")
    pickles = [p for p in root.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{root} holds pickle weights ({pickles[0].relative_to(root)}); wanctl loads "
                              "safetensors only and never unpickles", "convert them to .safetensors or re-download")
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index} is unreadable: {exc}", "re-download the checkpoint") from None
    spec = model_spec(task)
    if spec.experts == 2 and not meta.get("transformer_2") or meta.get("transformer_2") in (None, [None, None]):
        if spec.experts == 2:
            raise CheckpointError(f"{root} has no transformer_2: it is not a Wan2.2 A14B checkpoint (task {task})",
                                  "point --model at the A14B checkpoint or pick --task ti2v-5B")
    try:
        from recipes import manifest as manifest_mod
    except ImportError:  # the downloader's manifest module is optional for this check
        return
    if (root / "wanctl-manifest.json").exists() or (root / ".incomplete").exists():
        manifest_mod.verify_checkpoint_dir(root, task=task)


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
