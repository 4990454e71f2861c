"""ModelScope source, tested at the adapter's boundary with a fake ``modelscope`` package.

The real modelscope client does take an endpoint (``endpoint=`` / MODELSCOPE_ENDPOINT), but its protocol
(OpenAPI + legacy /api/v1 routes, acceleration probes, redirect probing) is large and changes between
releases; emulating it would test our emulation more than our code. So these tests replace the two entry
points wanctl calls (``HubApi.get_model_files`` and ``snapshot_download``) with fakes that write real
files, and check what wanctl asks for and what it does with the answer. The Hugging Face side of the
'auto' fallback is real: a refused loopback connection.
"""

from __future__ import annotations

import socket
import sys
import types
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from downloads import download, plan
from recipes.errors import BadInput, DownloadError
from recipes.manifest import MANIFEST_NAME, read_manifest, verify_checkpoint_dir
from tests.fakehub import SocketGuard, isolate_hf_client, pipeline_files, sha256

MS_REPO = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"


@pytest.fixture(autouse=True)
def guard(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    g = SocketGuard().install(monkeypatch.setattr)
    isolate_hf_client(monkeypatch.setattr, monkeypatch.delenv, tmp_path_factory.mktemp("hf"))
    yield g
    assert not g.violations, f"non-loopback network access: {g.violations}"


class FakeModelScope:
    """The slice of modelscope wanctl uses, serving ``files`` from memory."""

    def __init__(self, files: dict[str, bytes], with_sha: bool = True) -> None:
        self.files = files
        self.with_sha = with_sha
        self.calls: list[dict] = []
        self.corrupt: set[str] = set()
        self.fail_after: int | None = None
        """Files snapshot_download writes before it fails with OSError (None: it does not fail)."""

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeModelScope:
        fake = self

        class HubApi:
            def __init__(self, endpoint: str | None = None) -> None:
                self.endpoint = endpoint

            def get_model_files(self, model_id: str, revision: str = "master", recursive: bool = False) -> list:
                fake.calls.append({"call": "list", "model_id": model_id, "revision": revision,
                                   "recursive": recursive, "endpoint": self.endpoint})
                out = [{"Path": "transformer", "Type": "tree", "Size": 0}]
                for p, d in fake.files.items():
                    entry = {"Path": p, "Type": "blob", "Size": len(d)}
                    if fake.with_sha:
                        entry["Sha256"] = sha256(d)
                    out.append(entry)
                return out

        def snapshot_download(model_id: str, revision: str, local_dir: str, allow_patterns: list[str],
                              max_workers: int = 4, endpoint: str | None = None) -> str:
            fake.calls.append({"call": "download", "model_id": model_id, "revision": revision,
                               "allow_patterns": allow_patterns, "endpoint": endpoint})
            wanted = [p for p in fake.files if any(fnmatchcase(p, pat) for pat in allow_patterns)]
            for i, p in enumerate(wanted):
                if fake.fail_after is not None and i >= fake.fail_after:
                    raise OSError("connection reset by peer")
                dest = Path(local_dir, *p.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(bytes(len(fake.files[p])) if p in fake.corrupt else fake.files[p])
            return local_dir

        root = types.ModuleType("modelscope")
        hub = types.ModuleType("modelscope.hub")
        api = types.ModuleType("modelscope.hub.api")
        dl = types.ModuleType("modelscope.hub.snapshot_download")
        errors = types.ModuleType("modelscope.hub.errors")
        api.HubApi = HubApi
        dl.snapshot_download = snapshot_download
        errors.NotExistError = type("NotExistError", (Exception,), {})
        for name, mod in (("modelscope", root), ("modelscope.hub", hub), ("modelscope.hub.api", api),
                          ("modelscope.hub.snapshot_download", dl), ("modelscope.hub.errors", errors)):
            monkeypatch.setitem(sys.modules, name, mod)
        return self


def closed_port_endpoint() -> str:
    """A loopback URL nothing listens on: connecting is refused at once (an unreachable hub)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_modelscope_source_downloads_only_needed_files_and_verifies(tmp_path: Path, monkeypatch) -> None:
    files = pipeline_files("ti2v-5B")
    ms = FakeModelScope(files).install(monkeypatch)
    target = tmp_path / "ckpt"
    report = download("ti2v-5B", target_dir=target, source="modelscope", ms_endpoint="http://127.0.0.1:9")
    assert report.source == "modelscope" and report.revision == "master" and report.verified
    listing_call, dl_call = ms.calls
    assert listing_call == {"call": "list", "model_id": MS_REPO, "revision": "master", "recursive": True,
                            "endpoint": "http://127.0.0.1:9"}
    asked = {p for p in files if any(fnmatchcase(p, pat) for pat in dl_call["allow_patterns"])}
    assert "transformer/diffusion_pytorch_model.bin" not in asked and "README.md" not in asked
    assert "transformer/diffusion_pytorch_model.safetensors" in asked and "model_index.json" in asked
    m = verify_checkpoint_dir(target, task="ti2v-5B", deep=True)
    assert m.source == "modelscope" and m.repo == MS_REPO


def test_modelscope_corruption_is_caught_by_its_sha256(tmp_path: Path, monkeypatch) -> None:
    ms = FakeModelScope(pipeline_files("ti2v-5B")).install(monkeypatch)
    ms.corrupt.add("vae/diffusion_pytorch_model.safetensors")
    with pytest.raises(DownloadError, match="failed verification"):
        download("ti2v-5B", target_dir=tmp_path / "ckpt", source="modelscope")
    assert not (tmp_path / "ckpt" / MANIFEST_NAME).exists()


def test_listing_without_sha256_is_verified_by_size_and_says_so(tmp_path: Path, monkeypatch) -> None:
    FakeModelScope(pipeline_files("ti2v-5B"), with_sha=False).install(monkeypatch)
    report = download("ti2v-5B", target_dir=tmp_path / "ckpt", source="modelscope")
    assert any("no published checksum" in n for n in report.notes)
    assert all(f.sha256 for f in read_manifest(tmp_path / "ckpt").files)  # computed locally


def test_a_file_wanctl_did_not_download_is_refused_when_there_is_no_checksum_to_verify_it(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """Without a published sha256 a same-size file cannot be told from the source's: refused, never adopted (the
    fetch would replace it) -- the user's fine-tune under the hub's names, here."""
    files = pipeline_files("ti2v-5B")
    ms = FakeModelScope(files, with_sha=False).install(monkeypatch)
    user_file = "transformer/diffusion_pytorch_model.safetensors"
    mine = tmp_path / "mine"
    (mine / "transformer").mkdir(parents=True)
    tuned = bytes(b ^ 0x5A for b in files[user_file])
    (mine / user_file).write_bytes(tuned)
    with pytest.raises(BadInput, match="no checksum") as err:
        download("ti2v-5B", target_dir=mine, source="modelscope")
    assert user_file in str(err.value) and "--dir" in err.value.hint and "move" in err.value.hint
    assert (mine / user_file).read_bytes() == tuned  # untouched
    assert sorted(q.relative_to(mine).as_posix() for q in mine.rglob("*")) == ["transformer", user_file]
    assert [c["call"] for c in ms.calls] == ["list"]  # nothing was fetched
    p = plan("ti2v-5B", target_dir=mine, source="modelscope")  # --dry-run says so beforehand
    assert any("no published checksum" in n and "stops" in n for n in p.notes)


def test_a_failed_download_without_checksums_resumes_its_own_files(tmp_path: Path, monkeypatch) -> None:
    """The files a failed run wrote are wanctl's (its marker names them): the rerun keeps them, no refusal."""
    ms = FakeModelScope(pipeline_files("ti2v-5B"), with_sha=False).install(monkeypatch)
    ms.fail_after = 3
    target = tmp_path / "ckpt"
    with pytest.raises(DownloadError, match="ModelScope download"):
        download("ti2v-5B", target_dir=target, source="modelscope")
    ms.fail_after = None
    p = plan("ti2v-5B", target_dir=target, source="modelscope")
    assert sum(f.present for f in p.files) == 3 and not any("not downloaded by wanctl" in n for n in p.notes)
    assert download("ti2v-5B", target_dir=target, source="modelscope").verified


def test_auto_falls_back_to_modelscope_when_the_hub_is_unreachable_and_says_so(tmp_path: Path, monkeypatch,
                                                                               caplog) -> None:
    ms = FakeModelScope(pipeline_files("ti2v-5B")).install(monkeypatch)
    dead = closed_port_endpoint()
    p = plan("ti2v-5B", target_dir=tmp_path / "ckpt", source="auto", endpoint=dead)
    assert p.source == "modelscope" and any("falling back to ModelScope" in n for n in p.notes)
    assert "falling back to ModelScope" in caplog.text
    report = download("ti2v-5B", target_dir=tmp_path / "ckpt", source="auto", endpoint=dead)
    assert report.source == "modelscope" and report.verified and ms.calls[-1]["call"] == "download"


def test_hf_only_source_does_not_fall_back(tmp_path: Path, monkeypatch) -> None:
    ms = FakeModelScope(pipeline_files("ti2v-5B")).install(monkeypatch)
    with pytest.raises(DownloadError, match="cannot reach") as err:
        plan("ti2v-5B", target_dir=tmp_path / "ckpt", source="hf", endpoint=closed_port_endpoint())
    assert "--source modelscope" in err.value.hint and ms.calls == []


def test_missing_modelscope_extra_gives_the_install_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "modelscope.hub.api", None)  # import now raises ImportError
    with pytest.raises(DownloadError, match="ModelScope support is not installed") as err:
        plan("ti2v-5B", target_dir=tmp_path / "ckpt", source="modelscope")
    assert "pip install 'wanctl[modelscope]'" in err.value.hint


def test_lora_without_a_known_mirror_is_bad_input(tmp_path: Path) -> None:
    from recipes.errors import BadInput

    with pytest.raises(BadInput, match="no ModelScope mirror"):
        plan("t2v-A14B-lightning", target_dir=tmp_path / "l", source="modelscope")
