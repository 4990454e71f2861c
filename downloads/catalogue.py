"""What wanctl knows how to deploy: the Wan2.2 diffusers checkpoints and the Lightning LoRAs, as plain data.

Sizes are approximate (from the hubs' file listings, rounded) and only used where no listing is at hand:
hardware advice, and ``download --dry-run`` offline or with the source unreachable, which marks them
expected; a real download prices itself from the live listing. They follow from the repos storing weights
in fp32: a 14B expert is ~57.2 GB, the 5B transformer ~20 GB, the UMT5-XXL encoder ~22.7 GB, and a rank-64
Lightning LoRA (every linear of 40 blocks) ~1.23 GB. ``revision`` pins a
commit SHA when set; unpinned entries follow the default branch and the resolved commit is recorded in
the manifest, so a later run can pin it with ``--revision``.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.errors import BadInput
from recipes.models import MODELS, lightning_dirname

GB = 1_000_000_000
MB = 1_000_000

FETCHED_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
"""File types wanctl fetches: weights (safetensors), configs, tokenizer vocab (sentencepiece .model is
protobuf, not pickle). Everything else (.bin/.pt pickles, .py remote code, .md, .onnx, ...) is skipped."""


@dataclass(frozen=True)
class Component:
    """One part of an artifact: a diffusers subfolder, model_index.json, or one LoRA file."""

    name: str = ""
    """Component name: the diffusers subfolder ('transformer', 'vae', ...) or 'model_index', 'high_noise'."""
    patterns: tuple[str, ...] = ()
    """fnmatch patterns (repo-relative, '/'-separated) selecting its files, before the suffix filter."""
    approx_bytes: int = 0
    """Approximate download size, for advice when no listing is available."""
    weights: bool = False
    """True when it must contain at least one .safetensors file (a pickle-only component is refused)."""


@dataclass(frozen=True)
class Artifact:
    """Something ``wanctl download`` can fetch into one directory."""

    name: str = ""
    """Catalogue key, as users type it after --task."""
    kind: str = "pipeline"
    """'pipeline' (diffusers layout with model_index.json) or 'lora'."""
    task: str = ""
    """The Wan2.2 task it serves (recipes.models key)."""
    hf_repo: str = ""
    """Repository id on the Hugging Face hub."""
    ms_repo: str | None = None
    """Repository id on ModelScope; None when we know of no mirror."""
    revision: str | None = None
    """Pinned Hugging Face commit SHA (40 hex); None follows the default branch."""
    ms_revision: str | None = None
    """Pinned ModelScope revision; None follows its default branch ('master')."""
    components: tuple[Component, ...] = ()
    """What the task needs; nothing outside these is fetched."""
    description: str = ""

    @property
    def approx_bytes(self) -> int:
        return sum(c.approx_bytes for c in self.components)

    @property
    def dirname(self) -> str:
        """Default directory name: the repo's name ('Wan2.2-T2V-A14B-Diffusers')."""
        return self.hf_repo.rsplit("/", 1)[-1] if self.kind == "pipeline" else lightning_dirname(self.task)


def _pipeline(task: str, transformer_bytes: int, vae_bytes: int, description: str) -> Artifact:
    spec = MODELS[task]
    comps = [
        Component("model_index", ("model_index.json",), 1_000),
        Component("scheduler", ("scheduler/*",), 1_000),
        Component("text_encoder", ("text_encoder/*",), int(22.7 * GB), weights=True),  # UMT5-XXL encoder
        Component("tokenizer", ("tokenizer/*",), 21 * MB),
        Component("transformer", ("transformer/*",), transformer_bytes, weights=True),
        Component("vae", ("vae/*",), vae_bytes, weights=True),
    ]
    if spec.experts == 2:
        comps.insert(5, Component("transformer_2", ("transformer_2/*",), transformer_bytes, weights=True))
    return Artifact(name=task, kind="pipeline", task=task, hf_repo=spec.hf_repo, ms_repo=spec.ms_repo,
                    components=tuple(comps), description=description)


# The LoRA repo is not in diffusers layout and its folder names change between releases
# (V1, V1.1, dated re-releases). The file names below must be checked against the repo at
# download time: select.select_files refuses with the repo's actual .safetensors names when a
# pattern matches nothing, rather than guessing. lightx2v publishes no ModelScope mirror that
# we have checked, so ms_repo stays None (use --source hf).
LIGHTNING_REPO = "lightx2v/Wan2.2-Lightning"
_LORA_BYTES = int(1.23 * GB)


def _lightning(task: str, folder: str) -> Artifact:
    return Artifact(
        name=f"{task}-lightning", kind="lora", task=task, hf_repo=LIGHTNING_REPO, ms_repo=None,
        components=(
            Component("high_noise", (f"{folder}/high_noise_model.safetensors",), _LORA_BYTES, weights=True),
            Component("low_noise", (f"{folder}/low_noise_model.safetensors",), _LORA_BYTES, weights=True),
        ),
        description=f"Wan2.2 Lightning 4-step LoRAs for {task} (high-noise -> transformer, low-noise -> "
                    "transformer_2); lossy distillation",
    )


CATALOGUE: dict[str, Artifact] = {
    a.name: a
    for a in (
        _pipeline("t2v-A14B", int(57.2 * GB), 508 * MB, "Wan2.2 text-to-video, MoE of two 14B experts"),
        _pipeline("i2v-A14B", int(57.2 * GB), 508 * MB, "Wan2.2 image-to-video, MoE of two 14B experts"),
        _pipeline("ti2v-5B", int(20.0 * GB), int(2.82 * GB), "Wan2.2 text/image-to-video, dense 5B, 16x VAE"),
        _lightning("t2v-A14B", "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"),
        _lightning("i2v-A14B", "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"),
    )
}


def artifact(name: str) -> Artifact:
    """The catalogue entry ``name``; a BadInput naming every entry when it is unknown."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise BadInput(f"nothing named {name!r} in the download catalogue",
                       f"use one of: {', '.join(CATALOGUE)}") from None
