"""A job: one video a loaded recipe makes, as a batch line (``generate --prompts``) or a server request asks.

A job changes only content fields, the ones a recipe's hash leaves out (prompt, negative prompt, seed, image):
the stack was tuned, and compiled, at the recipe's workload (size, frames, steps), so a job may name those only
with the recipe's own values. Every value is checked against the recipe field's own domain (recipes.fields),
never a second copy of the rules: a prompt means the same in a recipe, on a command line, in a batch file and in
a request. Plain data, no torch: the server's HTTP side and the batch reader check a job before a model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from recipes.errors import BadInput, FieldError, SchemaError
from recipes.fields import PATH_MAX_CHARS, Domain, check_fields, domain, field_problem, field_types
from recipes.files import is_file, user_path
from recipes.models import model_spec
from recipes.recipe import Recipe

WORKLOAD_FIELDS = ("size", "frames", "steps")
"""Recipe fields a job may repeat, but not change: the stack was tuned and compiled at the recipe's values."""
BATCH_FIELDS = ("prompt", "negative_prompt", "seed", "image", "out")
"""Keys of one ``generate --prompts`` line."""
REQUEST_FIELDS = ("prompt", "negative_prompt", "seed", "image", *WORKLOAD_FIELDS)
"""Keys of a ``POST /v1/videos`` body (its image is base64 data, decoded by the server, not a path)."""
RESULTS_FILE = "results.jsonl"
"""A batch's record in its --out-dir: one JSON line per job, in the order they ended."""
BATCH_MAX_LINES = 100_000
"""Most jobs one prompts file holds: a wrong file (a log, a dataset) is refused before anything is checked."""


def _as_recipe(default: Any, name: str) -> Any:
    """A job field that is the recipe field ``name``: its doc and domain are the recipe's."""
    return field(default=default, metadata={"doc": Recipe.field_doc(name), "domain": domain(Recipe, name)})


@dataclass(frozen=True)
class Job:
    """What one video needs beyond the loaded recipe."""

    prompt: str = _as_recipe("", "prompt")
    negative_prompt: str = _as_recipe("", "negative_prompt")
    seed: int = _as_recipe(42, "seed")
    image: str = _as_recipe("", "image")
    out: str = field(default="", metadata={
        "doc": "batch: the video's file name inside --out-dir (default: the line number, e.g. 0007.mp4)",
        "domain": Domain(max_chars=PATH_MAX_CHARS, path=True, pattern=r"(?s).*\.mp4",
                         allowed="a relative file name ending in .mp4, inside --out-dir",
                         hint="write e.g. \"out\": \"fox.mp4\", or leave it out for the line number")})

    @classmethod
    def of(cls, recipe: Recipe) -> Job:
        """The recipe's own content: the one-shot run's job, and the server's warm-up."""
        return cls(prompt=recipe.prompt, negative_prompt=recipe.negative_prompt, seed=recipe.seed, image=recipe.image)


def takes_image(recipe: Recipe) -> bool:
    """Whether jobs of ``recipe`` must bring an image: the pipeline is built once, and a ti2v-5B recipe with an
    image builds the image-to-video one (which needs an image), without one the text-to-video one (which takes
    none)."""
    return model_spec(recipe.task).needs_image or bool(recipe.image)


def job_from_plain(data: Any, recipe: Recipe, document: str, allowed: tuple[str, ...],
                   image_given: bool = False) -> Job:
    """The job ``data`` (parsed JSON) asks for, or a FieldError naming ``document``, the field and what is allowed.

    ``image_given``: an image came beside ``data`` (the server's upload, decoded apart from the other fields).
    """
    if not isinstance(data, dict):
        raise SchemaError(f"{document}: expected a JSON object, got {type(data).__name__}",
                          'write one object, e.g. {"prompt": "a fox in the snow"}')
    for key, value in data.items():
        if key not in allowed:
            raise FieldError(document, str(key), value, f"no such field (known: {', '.join(allowed)})",
                             hint=f"remove '{key}'")
    r = recipe.resolved()
    for name in WORKLOAD_FIELDS:
        if name not in data:
            continue
        value, want = data[name], getattr(r, name)
        problem = field_problem(name, value, field_types(Recipe)[name], domain(Recipe, name))
        if problem is None and value != want:
            problem = (f"{want!r}, this recipe's own (its stack was tuned and compiled at {r.size}, {r.frames} frames, "
                       f"{r.steps} steps)", f"drop '{name}' or send {want!r}; another workload needs a recipe tuned "
                       "for it (wanctl tune)")
        if problem is not None:
            raise FieldError(document, name, value, *problem)
    values = {k: data[k] for k in ("prompt", "negative_prompt", "seed", "image", "out") if k in data}
    values.setdefault("seed", recipe.seed)  # a field a job leaves out is the recipe's
    values.setdefault("negative_prompt", recipe.negative_prompt)
    job = Job(**values)
    check_fields(job, lambda name, value, what, hint="": FieldError(document, name, value, what, hint))
    has_image = bool(job.image) or image_given
    if takes_image(recipe) and not has_image:
        raise FieldError(document, "image", "", f"an image: this recipe's {r.task} pipeline conditions every video "
                         "on one", hint="send the first frame as 'image'")
    if has_image and not takes_image(recipe):
        why = (" (a ti2v-5B recipe without an image builds the text-to-video pipeline)"
               if model_spec(r.task).image_optional else "")
        raise FieldError(document, "image", "(given)", f"none: this recipe's {r.task} pipeline takes no image{why}",
                         hint="drop 'image', or use a recipe that conditions on one")
    return job


def read_jobs(path: str | Path, recipe: Recipe) -> list[tuple[int, Job]]:
    """Every job of a prompts file (JSON Lines, one object a line; blank lines skipped), each checked before any
    model loads: a bad line is a FieldError naming the file, the line number and the field. Each job comes with
    its line number, its ``out`` filled (the line number when not given); two lines may not name the same video."""
    p = Path(path).expanduser()
    with user_path(p, "read the prompts file"):
        if not p.is_file():
            raise BadInput(f"prompts file {p} does not exist or is not a file",
                           'write one JSON object a line, e.g. {"prompt": "a fox in the snow"}')
        text = p.read_bytes()
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise BadInput(f"{p} is not UTF-8 text (byte {exc.start})", "save the prompts file as UTF-8") from None
    if len(lines) > BATCH_MAX_LINES:
        raise BadInput(f"{p} has {len(lines):,} lines; at most {BATCH_MAX_LINES:,} jobs a file",
                       "split it into several files")
    jobs: list[tuple[int, Job]] = []
    taken: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p.name} line {n}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})",
                              'write one JSON object a line, e.g. {"prompt": "a fox in the snow"}') from None
        job = job_from_plain(data, recipe, where, BATCH_FIELDS)
        out = job.out or f"{n:04d}.mp4"
        if PurePath(out).is_absolute() or ".." in PurePath(out).parts:
            raise FieldError(where, "out", out, "a relative file name inside --out-dir",
                             hint="write a name like fox.mp4 or clips/fox.mp4")
        if out in taken:
            raise FieldError(where, "out", out, f"a file name no other line uses (line {taken[out]} has it)",
                             hint="give each line its own 'out', or leave it out for the line number")
        taken[out] = n
        if job.image and not is_file(job.image, "read the image"):
            raise FieldError(where, "image", job.image, "an existing image file", hint="check the path")
        jobs.append((n, Job(prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, image=job.image,
                            out=out)))
    if not jobs:
        raise BadInput(f"{p} holds no job", 'write one JSON object a line, e.g. {"prompt": "a fox in the snow"}')
    return jobs
