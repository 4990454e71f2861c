"""recipes.manifest: write_manifest only after every file verifies; verify_checkpoint_dir refuses what must not load."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from recipes.errors import CheckpointError, SchemaError
from recipes.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    TRUST_FLAG,
    Manifest,
    ManifestMismatch,
    pipeline_components,
    verify_checkpoint_dir,
    write_manifest,
)
from tests.fakehub import pipeline_files

SKIP = (".gitattributes", "README.md", "transformer/handler.py", "transformer/diffusion_pytorch_model.bin")


def make_dir(root: Path, task: str = "t2v-A14B", manifest_task: str | None = None) -> dict[str, bytes]:
    files = {k: v for k, v in pipeline_files(task, big=4096).items() if k not in SKIP}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    expected = {rel: (len(data), hashlib.sha256(data).hexdigest() if rel.endswith(".safetensors") else None)
                for rel, data in files.items()}
    t = task if manifest_task is None else manifest_task
    write_manifest(root, expected, artifact=t, task=t, source="hf", repo="Wan-AI/x", revision="a" * 40)
    return files


def test_complete_dir_verifies_and_records_every_file(tmp_path: Path) -> None:
    files = make_dir(tmp_path)
    m = verify_checkpoint_dir(tmp_path, task="t2v-A14B", deep=True)
    assert {f.path for f in m.files} == set(files)
    assert m.by_path()["model_index.json"].sha256 == hashlib.sha256(files["model_index.json"]).hexdigest()
    assert m.total_bytes == sum(len(v) for v in files.values())
    assert Manifest.from_json((tmp_path / MANIFEST_NAME).read_text()) == m


def test_missing_manifest_is_refused_unless_trusted(tmp_path: Path) -> None:
    make_dir(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="no wanctl-manifest.json") as err:
        verify_checkpoint_dir(tmp_path, task="t2v-A14B")
    assert "wanctl download --task t2v-A14B" in err.value.hint and TRUST_FLAG in err.value.hint
    m = verify_checkpoint_dir(tmp_path, task="t2v-A14B", allow_missing_manifest=True)
    assert m.source == "unverified" and "transformer_2/config.json" in m.by_path()


def test_partial_dir_is_refused(tmp_path: Path) -> None:
    make_dir(tmp_path)
    weights = tmp_path / "transformer_2/diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(ManifestMismatch, match="size is") as err:
        verify_checkpoint_dir(tmp_path, task="t2v-A14B")
    assert [p.path for p in err.value.problems] == ["transformer_2/diffusion_pytorch_model.safetensors"]
    weights.unlink()
    with pytest.raises(ManifestMismatch, match="missing"):
        verify_checkpoint_dir(tmp_path, task="t2v-A14B")
    weights.write_bytes(data)
    (tmp_path / INCOMPLETE_MARKER).write_text("")
    with pytest.raises(CheckpointError, match="partial download"):
        verify_checkpoint_dir(tmp_path, task="t2v-A14B")


def test_deep_check_catches_same_size_corruption(tmp_path: Path) -> None:
    make_dir(tmp_path)
    weights = tmp_path / "vae/diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    verify_checkpoint_dir(tmp_path, task="t2v-A14B")  # size-only check passes
    with pytest.raises(ManifestMismatch, match="sha256"):
        verify_checkpoint_dir(tmp_path, task="t2v-A14B", deep=True)


def test_dir_of_another_task_is_refused(tmp_path: Path) -> None:
    a14b, five = tmp_path / "a14b", tmp_path / "5b"
    make_dir(a14b)
    make_dir(five, task="ti2v-5B")
    with pytest.raises(CheckpointError, match="holds a t2v-A14B checkpoint, not ti2v-5B"):
        verify_checkpoint_dir(a14b, task="ti2v-5B")
    with pytest.raises(CheckpointError, match="holds a ti2v-5B checkpoint, not t2v-A14B"):
        verify_checkpoint_dir(five, task="t2v-A14B")
    with pytest.raises(CheckpointError, match="not i2v-A14B"):
        verify_checkpoint_dir(a14b, task="i2v-A14B")
    verify_checkpoint_dir(five, task="ti2v-5B")
    # without a task in the manifest, model_index.json's pipeline class still tells them apart
    untagged = tmp_path / "untagged"
    make_dir(untagged, manifest_task="")
    with pytest.raises(CheckpointError, match="needs 'WanImageToVideoPipeline'"):
        verify_checkpoint_dir(untagged, task="i2v-A14B")


def test_a14b_index_without_transformer_2_is_refused(tmp_path: Path) -> None:
    # a manifest that does not name its task (e.g. written by hand) still gets the model_index check
    files = {k: v for k, v in pipeline_files("ti2v-5B", big=4096).items() if k not in SKIP}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    write_manifest(tmp_path, {rel: (len(d), None) for rel, d in files.items()})
    with pytest.raises(CheckpointError, match="no 'transformer_2' component"):
        verify_checkpoint_dir(tmp_path, task="t2v-A14B")


def test_pickle_weight_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    make_dir(tmp_path)
    canary = tmp_path / "canary"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (canary,))

    (tmp_path / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="pickle weights") as err:
        verify_checkpoint_dir(tmp_path, task="t2v-A14B", deep=True)
    assert "transformer/diffusion_pytorch_model.bin" in str(err.value)
    with pytest.raises(CheckpointError, match="pickle weights"):
        verify_checkpoint_dir(tmp_path, task="t2v-A14B", allow_missing_manifest=True)
    assert not canary.exists()


def test_write_manifest_refuses_bad_files_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"12345678")
    (tmp_path / "b.json").write_bytes(b"{}")
    expected = {"a.safetensors": (8, hashlib.sha256(b"87654321").hexdigest()), "b.json": (3, None),
                "c.json": (1, None)}
    with pytest.raises(ManifestMismatch) as err:
        write_manifest(tmp_path, expected)
    assert sorted((p.path, p.problem) for p in err.value.problems) == [
        ("a.safetensors", "sha256"), ("b.json", "size"), ("c.json", "missing")]
    assert not (tmp_path / MANIFEST_NAME).exists()
    with pytest.raises(CheckpointError, match="pickle"):
        write_manifest(tmp_path, {"x.pt": (1, None)})
    with pytest.raises(CheckpointError, match="outside"):
        write_manifest(tmp_path, {"../x.json": (1, None)})


def test_manifest_with_unknown_keys_or_newer_schema_is_rejected(tmp_path: Path) -> None:
    make_dir(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**data, "trust_me": True}))
    with pytest.raises(SchemaError, match="unknown keys"):
        verify_checkpoint_dir(tmp_path, task="t2v-A14B")
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**data, "schema": 99}))
    with pytest.raises(SchemaError, match="schema 99"):
        verify_checkpoint_dir(tmp_path, task="t2v-A14B")


def test_pipeline_components_follow_the_model_spec() -> None:
    assert "transformer_2" in pipeline_components("t2v-A14B") and "transformer_2" in pipeline_components("i2v-A14B")
    assert "transformer_2" not in pipeline_components("ti2v-5B")
