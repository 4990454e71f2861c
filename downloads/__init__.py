"""``wanctl download``: the right Wan2.2 checkpoints from the Hugging Face hub or ModelScope, resumable and verified.

Layering: imports huggingface_hub (and modelscope lazily), never torch/diffusers/transformers; the
manifest it writes is read by ``recipes.manifest.verify_checkpoint_dir`` before ``wan_runtime`` loads.

    plan(task, ...) -> DownloadPlan        what would be fetched (--dry-run); fetches nothing
    download(task, ...) -> DownloadReport  fetch, verify, write wanctl-manifest.json; no-op when complete
"""

from downloads.catalogue import CATALOGUE, Artifact, Component, artifact
from downloads.fetch import DownloadReport, download
from downloads.plan import SOURCES, DownloadPlan, PlannedFile, default_target_dir, plan
from downloads.progress import ProgressCallback, ProgressEvent
from downloads.select import HardwareAdvice, Machine, MachineFacts, hardware_advice

__all__ = [
    "CATALOGUE", "SOURCES", "Artifact", "Component", "DownloadPlan", "DownloadReport", "HardwareAdvice", "Machine",
    "MachineFacts", "PlannedFile", "ProgressCallback", "ProgressEvent", "artifact", "default_target_dir", "download",
    "hardware_advice", "plan",
]
