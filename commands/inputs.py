"""What a command line gave, made into checked inputs: flags and ``--set`` over a base recipe, and the files it
named looked up."""

from __future__ import annotations

from recipes.errors import BadInput
from recipes.files import is_dir, is_file
from recipes.overrides import apply_overrides
from recipes.recipe import SYNTHETIC, Recipe, validate


def build_recipe(base: Recipe, *, model: str | None = None, task: str | None = None, size: str | None = None,
                 frames: int | None = None, steps: int | None = None, seed: int | None = None,
                 prompt: str | None = None, negative_prompt: str | None = None, image: str | None = None,
                 sets: list[str] | None = None) -> Recipe:
    """Command-line values over a base recipe; only values the user gave replace the recipe's."""
    changes = {k: v for k, v in dict(model=model, task=task, size=size, frames=frames, steps=steps, seed=seed,
                                     prompt=prompt, negative_prompt=negative_prompt, image=image).items()
               if v is not None}
    if changes.get("model") in SYNTHETIC:  # a random model has no revision for the recipe's pin to check
        changes["model_revision"] = ""
    for item in sets or []:  # one value per field: a --set after a flag silently won
        field = item.split("=", 1)[0].strip()
        if field in changes and field != "model_revision":
            raise BadInput(f"--{field.replace('_', '-')} and --set {item} both set {field}", "set it once")
    # One validation after every change, flags and --set alike (a --set may resolve what a flag conflicts
    # with; an empty prompt is refused however it came); paths absolute, as the runtime's own folder and a
    # launch script elsewhere need them, and checked again so made (a relative path can grow past PATH_MAX).
    r = validate(apply_overrides(base.replace(**changes), sets or []).with_absolute_paths())
    check_given_paths(task or base.task, "run", image=(image, r.image), model=(model, r.model))
    return r


def check_given_paths(task: str, verb: str, *, image: tuple[str | None, str] = (None, ""),
                      model: tuple[str | None, str] = (None, ""), lora: tuple[str | None, str] = (None, "")) -> None:
    """The files a command line named exist, each given as (as typed, as resolved): looked up only after their
    fields were checked, within their bounds (a path longer than the OS takes raised OSError in the lookup)."""
    (image_given, image_path), (model_given, model_path), (lora_given, lora_path) = image, model, lora
    if image_given and not is_file(image_path, "read the image"):
        raise BadInput(f"image {image_given} does not exist or is not a file", "pass an existing PNG/JPEG with --image")
    if lora_given and lora_given != "none" and not is_dir(lora_path, "read the Lightning LoRA folder"):
        raise BadInput(f"--lightning-lora {lora_given} is not a folder",
                       f"wanctl download --task {task}-lightning, then pass its folder (or 'none')")
    if model_given and model_given not in SYNTHETIC and not is_dir(model_path, "read the checkpoint folder"):
        raise BadInput(f"--model {model_given}: no such checkpoint folder",
                       f"wanctl download --task {task}, or --model tiny / random to {verb} without weights")
