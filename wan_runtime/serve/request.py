"""A ``POST /v1/videos`` body as a job, every field checked before anything is stored.

The fields are a job's (recipes.jobs: the recipe fields' own domains, the recipe's own workload). The image comes
as base64 text (a ``data:`` URL too) and is decoded and opened with Pillow here, on the HTTP side, so a corrupt
one is a 422 naming ``image`` now, not a failed job minutes later. No torch here: the handlers never touch it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

from recipes.errors import FieldError, SchemaError
from recipes.jobs import REQUEST_FIELDS, Job, job_from_plain
from recipes.recipe import Recipe

DOCUMENT = "request"
MAX_BODY_BYTES = 64 << 20
"""Largest body read: a 4K PNG in base64 is about 30 MB; more is refused (413) before it is held in memory."""
MAX_IMAGE_PIXELS = 64_000_000
"""Largest image accepted (it is resized to the recipe's size anyway): a small PNG can claim a huge canvas."""


@dataclass(frozen=True)
class Submission:
    """A checked request: the job (its image still to be stored) and the decoded image, if one came."""

    job: Job
    image: Any = None
    """A PIL image in RGB, or None."""


def parse_body(raw: bytes, recipe: Recipe) -> Submission:
    """The job ``raw`` (the body's bytes) asks for, or a FieldError / SchemaError (a 422) saying why not."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{DOCUMENT}: the body is not JSON ({exc})"[:300],
                          'send a JSON object, e.g. {"prompt": "a fox in the snow"}') from None
    if not isinstance(data, dict):
        raise SchemaError(f"{DOCUMENT}: expected a JSON object, got {type(data).__name__}",
                          'send a JSON object, e.g. {"prompt": "a fox in the snow"}')
    given = "image" in data and data["image"] not in (None, "")
    fields = {k: v for k, v in data.items() if k != "image"}
    job = job_from_plain(fields, recipe, DOCUMENT, REQUEST_FIELDS, image_given=given)
    return Submission(job=job, image=decode_image(data["image"]) if given else None)


def decode_image(value: Any) -> Any:
    """A base64 PNG / JPEG / WebP (or any image Pillow reads) as an RGB PIL image; a FieldError naming ``image``."""
    from PIL import Image, UnidentifiedImageError

    what = "base64 text of a PNG or JPEG image (a data: URL too)"
    if not isinstance(value, str):
        raise FieldError(DOCUMENT, "image", f"(a {type(value).__name__})", what)
    shown = f"({len(value):,} characters of base64)"
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(DOCUMENT, "image", shown, f"{what}; this is not valid base64",
                         hint="encode the file's bytes with base64 (e.g. base64 -w0 frame.png)") from None
    try:
        im = Image.open(io.BytesIO(raw))
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise FieldError(DOCUMENT, "image", shown, f"an image of at most {MAX_IMAGE_PIXELS:,} pixels; this one "
                             f"is {w}x{h}", hint="scale it down: it is resized to the recipe's size anyway")
        im.load()
        return im.convert("RGB")
    except UnidentifiedImageError:
        raise FieldError(DOCUMENT, "image", shown, f"{what}; these bytes are no image format Pillow knows",
                         hint="send a PNG or JPEG file's bytes") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # a damaged or truncated file
        raise FieldError(DOCUMENT, "image", shown, f"{what}; Pillow cannot read this one ({str(exc)[:120]})",
                         hint="send an intact PNG or JPEG file") from None
