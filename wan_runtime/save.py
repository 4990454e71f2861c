"""Save the tiny model as a real diffusers checkpoint directory (safetensors), e.g. as a test hub repo."""

from __future__ import annotations

from pathlib import Path

from recipes.models import model_spec


def save_tiny(task: str, root: Path) -> Path:
    from wan_runtime.build import pipeline_class
    from wan_runtime.tiny import TINY, build_components

    spec = model_spec(task)
    comps = build_components(spec, TINY, seed=0)
    cls = pipeline_class(task, with_image=spec.needs_image)
    if cls.__name__ == "WanImageToVideoPipeline":
        comps.update(image_encoder=None, image_processor=None)
    pipe = cls(**comps)
    pipe.save_pretrained(root, safe_serialization=True)
    return root
