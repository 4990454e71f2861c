"""Catalogue, hardware advice, file selection, name safety, disk check and rendering (no network at all)."""

from __future__ import annotations

import dataclasses
import json
import os
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from rich.console import Console

from downloads import CATALOGUE, Machine, artifact, hardware_advice
from downloads.fetch import DownloadReport
from downloads.listing import RemoteFile, RemoteListing
from downloads.plan import DownloadPlan, PlannedFile
from downloads.progress import ProgressEvent
from downloads.render import render_plan, render_report, rich_progress, to_json
from downloads.safety import check_inside, escape_glob, unsafe_reason
from downloads.select import GIB, HEADROOM_BYTES, check_disk, select_files
from recipes.errors import BadInput, DownloadError
from recipes.manifest import pipeline_components
from recipes.models import MODELS
from tests.fakehub import pipeline_files, sha256


def listing(files: dict[str, bytes], source: str = "hf", repo: str = "Wan-AI/x") -> RemoteListing:
    return RemoteListing(source=source, repo=repo, revision="c" * 40, files=tuple(
        RemoteFile(path=p, size=len(d), sha256=sha256(d) if p.endswith(".safetensors") else None)
        for p, d in files.items()))


# ------------------------------------------------------------------------------------------ catalogue
def test_pipeline_entries_match_the_model_specs() -> None:
    for task, spec in MODELS.items():
        art = artifact(task)
        assert art.kind == "pipeline" and art.hf_repo == spec.hf_repo and art.ms_repo == spec.ms_repo
        assert art.hf_repo == f"Wan-AI/Wan2.2-{task.split('-')[0].upper()}-{task.split('-')[1]}-Diffusers"
        names = {c.name for c in art.components}
        assert names == {*pipeline_components(task), "model_index"}
        assert art.revision is None or len(art.revision) == 40
    assert artifact("t2v-A14B").approx_bytes > 100e9 > artifact("ti2v-5B").approx_bytes > 30e9


def test_lightning_loras_are_listed_with_high_and_low_noise_files() -> None:
    for task in ("t2v-A14B", "i2v-A14B"):
        art = CATALOGUE[f"{task}-lightning"]
        assert art.kind == "lora" and art.task == task and art.hf_repo == "lightx2v/Wan2.2-Lightning"
        assert [c.name for c in art.components] == ["high_noise", "low_noise"]
        assert all(c.weights and c.patterns[0].endswith(".safetensors") for c in art.components)


def test_unknown_entry_names_the_choices() -> None:
    with pytest.raises(BadInput, match="t2v-A14B-lightning"):
        artifact("t2v-14B")


# ------------------------------------------------------------------------------------------ advice
def test_a14b_fits_an_80gb_card_resident() -> None:
    a = hardware_advice("t2v-A14B", 1, 79.6)
    assert a.runnable and a.mode == "resident" and 60 < a.need_gib < 79.6


def test_a14b_needs_offload_on_a_48gb_card_and_fsdp_on_two() -> None:
    one = hardware_advice("i2v-A14B", 1, 47.5, host_ram_gib=32)
    assert one.runnable and one.mode == "offload" and "offload" in one.notes[0]
    assert any("host RAM is 32 GiB" in n for n in one.notes)
    two = hardware_advice("i2v-A14B", 2, 47.5)
    assert two.runnable and two.mode == "fsdp" and "FSDP" in two.notes[0] and two.need_gib < 47.5


def test_a14b_on_one_24gb_card_suggests_5b_with_numbers_without_switching() -> None:
    a = hardware_advice("t2v-A14B", 1, 23.6)
    assert not a.runnable and a.mode == "none" and a.task == "t2v-A14B"
    assert a.suggestion == "ti2v-5B" and a.need_gib > 23.6
    text = " ".join(a.notes)
    assert "cannot run here" in text and "--task ti2v-5B" in text and "does not switch" in text
    assert hardware_advice("ti2v-5B", 1, 23.6).mode == "offload"
    assert hardware_advice("t2v-A14B", 1, 12).suggestion == ""  # 5B does not fit either: no suggestion


def test_no_gpu_is_advice_not_an_error() -> None:
    a = hardware_advice("ti2v-5B", 0, 0)
    assert not a.runnable and "no GPU" in a.notes[0]


# ------------------------------------------------------------------------------------------ selection
def test_selection_takes_only_what_the_task_needs() -> None:
    files = pipeline_files("ti2v-5B")
    chosen = select_files(artifact("ti2v-5B"), listing(files))
    paths = {s.file.path for s in chosen}
    assert "model_index.json" in paths and "transformer/diffusion_pytorch_model.safetensors" in paths
    assert not paths & {"README.md", ".gitattributes", "transformer/handler.py",
                        "transformer/diffusion_pytorch_model.bin"}
    assert {s.component for s in chosen} == {*pipeline_components("ti2v-5B"), "model_index"}


def test_selection_refuses_pickle_only_and_missing_components() -> None:
    with pytest.raises(DownloadError, match="only pickle weights"):
        select_files(artifact("t2v-A14B"), listing(pipeline_files(pickle_only=True)))
    five = pipeline_files("ti2v-5B")
    with pytest.raises(DownloadError, match="no 'transformer_2' files"):
        select_files(artifact("t2v-A14B"), listing(five))


def test_lora_names_are_checked_against_the_listing() -> None:
    art = CATALOGUE["t2v-A14B-lightning"]
    good = {p: b"x" * 10 for c in art.components for p in c.patterns}
    assert len(select_files(art, listing(good, repo=art.hf_repo))) == 2
    renamed = {"Wan2.2-T2V-A14B-4steps-lora-250928/high_noise_model.safetensors": b"x",
               "Wan2.2-T2V-A14B-4steps-lora-250928/low_noise_model.safetensors": b"x"}
    with pytest.raises(DownloadError, match="no 'high_noise' files") as err:
        select_files(art, listing(renamed, repo=art.hf_repo))
    assert "lora-250928/high_noise_model.safetensors" in err.value.hint


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "C:\\x", "\\\\srv\\share\\x", "a/../../x", "C:x", "a//b",
                                  "./a", "a\x00b", ""])
def test_unsafe_names(name: str) -> None:
    assert unsafe_reason(name)


@pytest.mark.parametrize("name", ["model_index.json", "transformer/diffusion_pytorch_model-00001-of-00012.safetensors",
                                  "a..b/c.json", "weird[1]*?.json"])
def test_safe_names_and_exact_glob(name: str) -> None:
    assert unsafe_reason(name) is None
    assert fnmatchcase(name, escape_glob(name))
    assert not fnmatchcase(name + "x", escape_glob(name)) and not fnmatchcase("other", escape_glob(name))


def test_symlink_inside_target_pointing_out_is_refused(tmp_path: Path) -> None:
    target, outside = tmp_path / "ckpt", tmp_path / "elsewhere"
    target.mkdir()
    outside.mkdir()
    os.symlink(outside, target / "vae")
    with pytest.raises(DownloadError, match="outside"):
        check_inside(target, ["vae/config.json"])
    check_inside(target, ["transformer/config.json"])


def test_disk_check_names_need_and_free() -> None:
    check_disk(10 * GIB, 12 * GIB, Path("/data/ckpt"))
    with pytest.raises(DownloadError) as err:
        check_disk(126 * GIB, 80 * GIB, Path("/data/ckpt"))
    msg = str(err.value)
    assert "needs 127.0 GiB" in msg and "126.0 GiB to fetch" in msg and "80.0 GiB free" in msg
    assert "short by 47.0 GiB" in msg and HEADROOM_BYTES == GIB


# ------------------------------------------------------------------------------------------ render
def test_render_plan_and_report_show_the_numbers() -> None:
    p = DownloadPlan(artifact="t2v-A14B", task="t2v-A14B", source="hf", repo="Wan-AI/x", revision="c" * 40,
                     target_dir="/data/ckpt", files=(
                         PlannedFile("transformer/a.safetensors", "transformer", 5 * GIB, "ab" * 32),
                         PlannedFile("model_index.json", "model_index", 900, present=True)),
                     total_bytes=5 * GIB + 900, to_fetch_bytes=5 * GIB, free_bytes=2 * GIB, fits_disk=False,
                     advice=hardware_advice("t2v-A14B", 1, 23.6), notes=("does not fit: ...",))
    console = Console(record=True, width=200, force_terminal=False)
    render_plan(p, console)
    out = console.export_text()
    assert "transformer/a.safetensors" in out and "5.0 GiB" in out and "fetch" in out and "present" in out
    assert "does not fit" in out and "--task ti2v-5B" in out
    assert json.loads(to_json(p))["files"][0]["path"] == "transformer/a.safetensors"

    r = DownloadReport(artifact="t2v-A14B", source="hf", repo="Wan-AI/x", revision="c" * 40, path="/data/ckpt",
                       fetched=("a",), fetched_bytes=3 * GIB, total_bytes=5 * GIB, verified=True, seconds=12.5)
    console = Console(record=True, width=200, force_terminal=False)
    render_report(r, console)
    out = console.export_text()
    assert "1 file(s), 3.0 GiB" in out and "12.5 s" in out and "manifest written" in out
    assert dataclasses.asdict(r)["verified"] is True


def test_progress_callback_is_quiet_off_a_terminal() -> None:
    console = Console(record=True, force_terminal=False)
    with rich_progress(console) as cb:
        cb(ProgressEvent("download", 10, 100))
        cb(ProgressEvent("verify", 100, 100, "a"))
    assert console.export_text() == ""


def test_machine_is_a_plain_value() -> None:
    m = Machine(gpu_count=8, gpu_mem_gib=139.8)
    assert hardware_advice("t2v-A14B", m.gpu_count, m.gpu_mem_gib).mode == "resident"
