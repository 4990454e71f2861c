"""wanctl download end to end: the real huggingface_hub client against a loopback fake hub (tests/fakehub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from downloads import download, plan
from recipes.errors import BadInput, DownloadError
from recipes.manifest import INCOMPLETE_MARKER, MANIFEST_NAME, read_manifest, verify_checkpoint_dir
from tests.fakehub import FakeHub, FakeRepo, Hold, SocketGuard, isolate_hf_client, pipeline_files, tensor_file

REPO = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
BIG = "transformer_2/diffusion_pytorch_model.safetensors"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def guard(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    g = SocketGuard().install(monkeypatch.setattr)
    isolate_hf_client(monkeypatch.setattr, monkeypatch.delenv, tmp_path_factory.mktemp("hf"))
    yield g
    assert not g.violations, f"non-loopback network access: {g.violations}"


def serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes] | None = None, repo_id: str = REPO,
          more: tuple[FakeRepo, ...] = (), **kw) -> FakeHub:
    """Start a fake hub (serving ``more`` repos too) and make it huggingface_hub's default endpoint, as
    HF_ENDPOINT would at import.

    Both constants derived from HF_ENDPOINT at import are patched: hf_hub_url only swaps in an explicit
    ``endpoint`` when the URL template starts with ``constants.ENDPOINT``.
    """
    from huggingface_hub import constants

    hub = FakeHub([FakeRepo(repo_id, files if files is not None else pipeline_files(), **kw), *more]).start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    return hub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    h = serve(monkeypatch)
    yield h
    h.stop()


def fetch(hub: FakeHub, target: Path, task: str = "t2v-A14B", **kw):
    kw.setdefault("cache_dir", target.parent / "hf-cache")
    return download(task, target_dir=target, endpoint=hub.endpoint, **kw)


def fetched_names(target: Path) -> set[str]:
    return {p.relative_to(target).as_posix() for p in target.rglob("*")
            if p.is_file() and not p.relative_to(target).as_posix().startswith(".cache/")}


EXPECTED = {
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/spiece.model", "tokenizer/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "transformer_2/config.json",
    BIG, "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}


def test_download_writes_verified_manifest_and_second_run_is_a_noop(hub: FakeHub, tmp_path: Path,
                                                                    guard: SocketGuard) -> None:
    target = tmp_path / "ckpt"
    report = fetch(hub, target)
    files = pipeline_files()
    assert report.verified and not report.already_complete and report.source == "hf"
    assert report.revision == hub.repos[REPO].commit
    assert set(report.fetched) == EXPECTED
    assert report.fetched_bytes == sum(len(files[p]) for p in EXPECTED)
    # only what the task needs: no README, .gitattributes, remote code or pickle copy
    assert fetched_names(target) == EXPECTED | {MANIFEST_NAME}
    for p in EXPECTED:
        assert (target / p).read_bytes() == files[p]
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["repo"] == REPO and manifest["task"] == "t2v-A14B" and manifest["source"] == "hf"
    assert manifest["files"][BIG]["size"] == len(files[BIG])
    assert manifest["files"][BIG]["sha256"] == hashlib.sha256(files[BIG]).hexdigest()
    assert not (target / INCOMPLETE_MARKER).exists()
    assert verify_checkpoint_dir(target, task="t2v-A14B", deep=True).revision == report.revision
    # the auth header (none here) and the CDN origin: LFS bytes came from the CDN server
    assert {r.server for r in hub.file_requests(BIG)} == {"hub", "cdn"}

    hub.clear()
    connects_before = len(guard.connects)
    again = fetch(hub, target)
    assert again.already_complete and again.verified and again.fetched == ()
    assert hub.requests == [] and len(guard.connects) == connects_before


def test_dropped_connection_is_resumed_with_a_range_request(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    # huggingface_hub counts resumable bytes per chunk (10 MB against multi-GB shards); scale it to the tiny file
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    size = len(hub.repos[REPO].files[BIG])
    hub.drop_once[BIG] = size // 2
    report = fetch(hub, tmp_path / "ckpt")
    assert report.verified
    ranges = [r.range for r in hub.file_requests(BIG) if r.server == "cdn" and r.method == "GET"]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None
    resumed = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed <= size // 2  # huggingface_hub resumed from the bytes it had, not from zero
    assert (tmp_path / "ckpt" / BIG).read_bytes() == hub.repos[REPO].files[BIG]


def _no_partials_in_final_layout(target: Path) -> None:
    """Only complete, verified files outside .cache: every byte of a broken transfer stays in a temp file."""
    for p in target.rglob("*"):
        rel = p.relative_to(target).as_posix()
        if p.is_file() and not rel.startswith(".cache/") and rel != INCOMPLETE_MARKER:
            assert not rel.endswith(".incomplete"), rel


def test_server_that_ignores_range_restarts_the_file_from_zero(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    """A CDN that answers a Range request with 200 and the whole file: the resumed bytes must not be appended."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    good = hub.repos[REPO].files[BIG]
    hub.ignore_range.add(BIG)
    hub.drop_once[BIG] = len(good) // 2
    report = fetch(hub, tmp_path / "ckpt")
    gets = [r for r in hub.file_requests(BIG) if r.server == "cdn" and r.method == "GET"]
    assert len(gets) == 2 and gets[1].range is not None and gets[1].status == [200]  # asked to resume, got it all
    assert report.verified and (tmp_path / "ckpt" / BIG).read_bytes() == good
    _no_partials_in_final_layout(tmp_path / "ckpt")


def test_server_without_content_length_is_read_to_the_end_and_resumed(hub: FakeHub, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """Chunked bodies (no Content-Length), one of them cut in the middle: the size comes from the listing."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    files = hub.repos[REPO].files
    hub.no_length.update({BIG, "vae/config.json"})
    hub.drop_once[BIG] = len(files[BIG]) // 2
    report = fetch(hub, tmp_path / "ckpt")
    assert report.verified
    gets = [r for r in hub.file_requests(BIG) if r.server == "cdn" and r.method == "GET"]
    assert [g.status for g in gets] == [[200], [206]]
    for path in (BIG, "vae/config.json"):
        assert (tmp_path / "ckpt" / path).read_bytes() == files[path]


@pytest.mark.parametrize("path", [BIG, "vae/config.json"], ids=["lfs", "small"])
@pytest.mark.parametrize("change", ["same-size", "longer"])
def test_file_changing_between_head_and_get_is_never_accepted(hub: FakeHub, tmp_path: Path, path: str,
                                                              change: str) -> None:
    """The hub's HEAD describes one file, the GET returns another with another ETag (a push mid-download)."""
    good = hub.repos[REPO].files[path]
    hub.changed_after_head[path] = (bytes(b ^ 0x55 for b in good[:16]) + good[16:] if change == "same-size"
                                    else good + b"appended by a new commit")
    target = tmp_path / "ckpt"
    with pytest.raises(DownloadError) as err:
        fetch(hub, target)
    assert "rerun" in err.value.hint
    assert not (target / path).exists()
    assert not (target / MANIFEST_NAME).exists() and (target / INCOMPLETE_MARKER).exists()
    with pytest.raises(Exception, match="partial download"):
        verify_checkpoint_dir(target, task="t2v-A14B")
    _no_partials_in_final_layout(target)

    del hub.changed_after_head[path]
    report = fetch(hub, target)
    assert report.verified and (target / path).read_bytes() == good
    assert verify_checkpoint_dir(target, task="t2v-A14B", deep=True).revision == hub.repos[REPO].commit


def test_killed_download_reruns_to_completion_without_refetching_finished_files(tmp_path: Path, monkeypatch) -> None:
    files = pipeline_files()
    big = files.pop(BIG)
    files[BIG] = big  # listed last: with one worker every other file is finished before it starts
    hub = serve(monkeypatch, files)
    hold = hub.holds[BIG] = Hold(after=len(big) // 2)
    target = tmp_path / "ckpt"
    driver = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}]
        from tests.fakehub import SocketGuard
        SocketGuard().install()
        from downloads import download
        download("t2v-A14B", target_dir={str(target)!r}, max_workers=1, cache_dir={str(tmp_path / 'hf-cache')!r})
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    child = subprocess.Popen([sys.executable, "-c", driver], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        assert hold.reached.wait(20), child.communicate(timeout=5)[0].decode()[-2000:]
        child.send_signal(signal.SIGKILL)  # as a second Ctrl-C, a crash or a power cut would
        child.wait(timeout=10)
        assert (target / INCOMPLETE_MARKER).exists() and not (target / MANIFEST_NAME).exists()
        with pytest.raises(Exception, match="partial download"):
            verify_checkpoint_dir(target, task="t2v-A14B")
        done_first = {p for p in EXPECTED - {BIG} if (target / p).is_file()}
        assert done_first == EXPECTED - {BIG}

        hub.clear()
        report = download("t2v-A14B", target_dir=target, endpoint=hub.endpoint, cache_dir=tmp_path / "hf-cache")
        assert report.verified and (target / MANIFEST_NAME).exists() and not (target / INCOMPLETE_MARKER).exists()
        refetched = {p for p in EXPECTED if hub.file_requests(p)}
        assert refetched == {BIG}  # finished files were kept, not fetched again
        # huggingface_hub 2.x does not reuse the killed process's partial bytes: the file restarts at 0
        assert [r.range for r in hub.file_requests(BIG) if r.server == "cdn"] == [None]
        assert any("partial file(s)" in n for n in report.notes)
        assert not list((target / ".cache").rglob("*.incomplete"))
    finally:
        hold.release.set()
        if child.poll() is None:
            child.kill()
        hub.stop()


@pytest.mark.parametrize("path", [BIG, "vae/config.json"], ids=["lfs-sha256", "git-blob-id"])
def test_corrupted_bytes_of_the_right_size_are_caught_and_no_manifest_written(hub: FakeHub, tmp_path: Path,
                                                                              path: str) -> None:
    good = hub.repos[REPO].files[path]
    hub.override[path] = bytes(b ^ 0xFF for b in good[:8]) + good[8:]
    target = tmp_path / "ckpt"
    with pytest.raises(DownloadError, match="failed verification") as err:
        fetch(hub, target)
    assert path in str(err.value) and "rerun" in err.value.hint
    assert not (target / MANIFEST_NAME).exists() and (target / INCOMPLETE_MARKER).exists()
    assert not (target / path).exists()  # deleted so the rerun fetches it again

    del hub.override[path]
    hub.clear()
    report = fetch(hub, target)
    assert report.verified and (target / path).read_bytes() == good
    assert {p for p in EXPECTED if hub.file_requests(p)} == {path}


def test_repo_with_only_pickle_weights_is_refused_before_fetching(tmp_path: Path, monkeypatch) -> None:
    hub = serve(monkeypatch, pipeline_files(pickle_only=True))
    try:
        with pytest.raises(DownloadError, match="only pickle weights") as err:
            fetch(hub, tmp_path / "ckpt")
        assert "diffusion_pytorch_model.bin" in str(err.value)
        assert hub.file_requests() == [] and not (tmp_path / "ckpt").exists()
    finally:
        hub.stop()


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "C:\\x", "\\\\srv\\share\\x", "transformer/../../x",
                                 "C:x"])
def test_traversal_names_in_the_listing_are_refused_with_nothing_written(tmp_path: Path, bad: str,
                                                                         monkeypatch) -> None:
    hub = serve(monkeypatch, extra_names=[bad])
    work = tmp_path / "work"
    work.mkdir()
    target = work / "ckpt"
    try:
        with pytest.raises(DownloadError, match="outside the target directory") as err:
            fetch(hub, target)
        assert repr(bad) in str(err.value)
        assert hub.file_requests() == []
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["work"]
    finally:
        hub.stop()


@pytest.mark.parametrize(("code", "headers", "needle"), [
    (401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted"}, "is gated"),
    (401, {"X-Error-Message": "Invalid credentials in Authorization header"}, "refused access"),
    (404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, "was not found"),
])
def test_auth_and_missing_repo_errors_say_how_to_fix(hub: FakeHub, tmp_path: Path, code: int,
                                                     headers: dict[str, str], needle: str) -> None:
    hub.errors[REPO] = (code, headers)
    with pytest.raises(DownloadError, match=needle) as err:
        fetch(hub, tmp_path / "ckpt")
    assert "HF_TOKEN" in err.value.hint and "huggingface-cli login" in err.value.hint
    assert err.value.exit_code == 1 and hub.file_requests() == []


def test_unknown_revision_is_bad_input(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="does not exist") as err:
        fetch(hub, tmp_path / "ckpt", revision="v9.9")
    assert err.value.exit_code == 2 and "--revision" in err.value.hint


def test_disk_precheck_refuses_with_numbers_before_fetching(hub: FakeHub, tmp_path: Path) -> None:
    p = plan("t2v-A14B", target_dir=tmp_path / "ckpt", endpoint=hub.endpoint, free_disk_bytes=4096)
    assert not p.fits_disk and p.to_fetch_bytes > 0 and any("does not fit" in n for n in p.notes)
    with pytest.raises(DownloadError, match="not enough disk") as err:
        fetch(hub, tmp_path / "ckpt", free_disk_bytes=4096)
    assert "4.0 KiB free" in str(err.value) and "headroom" in str(err.value)
    assert "--dir" in err.value.hint
    assert hub.file_requests() == [] and not (tmp_path / "ckpt").exists()


def test_dry_run_plan_lists_files_and_fetches_nothing(hub: FakeHub, tmp_path: Path) -> None:
    p = plan("t2v-A14B", target_dir=tmp_path / "ckpt", endpoint=hub.endpoint)
    files = pipeline_files()
    assert {f.path for f in p.files} == EXPECTED
    assert p.total_bytes == p.to_fetch_bytes == sum(len(files[x]) for x in EXPECTED)
    big = next(f for f in p.files if f.path == BIG)
    assert big.component == "transformer_2" and big.sha256 and not big.present
    assert hub.file_requests() == [] and not (tmp_path / "ckpt").exists()


def test_offline_uses_a_complete_dir_without_network_and_fails_clearly_without_one(hub: FakeHub, tmp_path: Path,
                                                                                     guard: SocketGuard,
                                                                                     monkeypatch) -> None:
    target = tmp_path / "ckpt"
    fetch(hub, target)
    hub.clear()
    before = len(guard.connects)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = download("t2v-A14B", target_dir=target)  # no endpoint at all: nothing may be asked
    assert report.already_complete and report.verified
    with pytest.raises(DownloadError, match="offline") as err:
        download("t2v-A14B", target_dir=tmp_path / "empty")
    assert "wanctl download --task t2v-A14B" in err.value.hint
    with pytest.raises(BadInput, match="holds t2v-A14B .* would overwrite it"):
        download("ti2v-5B", target_dir=target, offline=True)  # a dir of another task: refused, not overwritten
    assert len(guard.connects) == before and hub.requests == []


FIVE_B = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"


def test_another_tasks_download_is_refused_whatever_the_folder_is_called(tmp_path: Path, monkeypatch) -> None:
    """The guard decides on what the folder holds, not on words in a message that also holds the path."""
    hub = serve(monkeypatch, more=(FakeRepo(FIVE_B, pipeline_files("ti2v-5B")),))
    target = tmp_path / "my revision 2" / "ckpt"
    try:
        fetch(hub, target)
        hub.clear()
        with pytest.raises(BadInput, match="holds t2v-A14B .* would overwrite it") as err:
            fetch(hub, target, task="ti2v-5B")
        assert "--dir" in err.value.hint and hub.requests == []  # decided before asking the hub
        assert read_manifest(target).artifact == "t2v-A14B"
        verify_checkpoint_dir(target, task="t2v-A14B", deep=True)
    finally:
        hub.stop()


def test_a_manifest_this_wanctl_cannot_read_is_refused_unless_it_names_the_same_artifact(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    """A newer wanctl's manifest (schema 2) or a damaged one: whose download is there decides, never a guess."""
    hub = serve(monkeypatch, more=(FakeRepo(FIVE_B, pipeline_files("ti2v-5B")),))
    target = tmp_path / "ckpt"
    try:
        fetch(hub, target)
        manifest = target / MANIFEST_NAME
        newer = {**json.loads(manifest.read_text()), "schema": 2}
        manifest.write_text(json.dumps(newer))
        hub.clear()
        with pytest.raises(BadInput, match="holds t2v-A14B .* would overwrite it"):
            fetch(hub, target, task="ti2v-5B")  # the newer manifest still says whose download this is
        assert json.loads(manifest.read_text()) == newer and hub.requests == []

        manifest.write_text(json.dumps(newer)[:40])  # torn: nothing can be told
        with pytest.raises(BadInput, match="cannot be read") as err:
            fetch(hub, target, task="ti2v-5B")
        assert str(manifest) in err.value.hint and "--dir" in err.value.hint
        with pytest.raises(BadInput, match="cannot be read"):
            fetch(hub, target)
        assert hub.requests == []

        manifest.write_text(json.dumps(newer))  # the same artifact: every file is checked against the hub, kept
        report = fetch(hub, target)
        assert report.verified and report.fetched_bytes == 0
        assert not [r for r in hub.file_requests() if r.method == "GET"]
        assert any("re-checking against the source" in n for n in report.notes)
        assert read_manifest(target).artifact == "t2v-A14B"
    finally:
        hub.stop()


def test_second_run_after_a_file_went_missing_fetches_only_that_file(hub: FakeHub, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    fetch(hub, target)
    (target / "vae/diffusion_pytorch_model.safetensors").unlink()
    hub.clear()
    report = fetch(hub, target)
    assert not report.already_complete and report.fetched == ("vae/diffusion_pytorch_model.safetensors",)
    assert {p for p in EXPECTED if hub.file_requests(p)} == {"vae/diffusion_pytorch_model.safetensors"}
    assert read_manifest(target) is not None


def test_lora_download_pinned_revision_progress_and_verify(tmp_path: Path, monkeypatch) -> None:
    from downloads import CATALOGUE, ProgressEvent

    art = CATALOGUE["t2v-A14B-lightning"]
    files = {p: tensor_file(i, 2048) for i, c in enumerate(art.components) for p in c.patterns}
    files["README.md"] = b"lightning"
    files["Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/high_noise_model.safetensors"] = tensor_file(9, 16)
    hub = serve(monkeypatch, files, repo_id=art.hf_repo)
    events: list[ProgressEvent] = []
    try:
        commit = hub.repos[art.hf_repo].commit
        target = tmp_path / "lora"
        report = download(art.name, target_dir=target, revision=commit, endpoint=hub.endpoint,
                          cache_dir=tmp_path / "c", progress=events.append)
        assert report.kind == "lora" and report.revision == commit
        assert set(report.fetched) == {p for c in art.components for p in c.patterns}  # not the I2V one
        assert any(r.path == f"/api/models/{art.hf_repo}/revision/{commit}" for r in hub.requests)
        m = verify_checkpoint_dir(target, task=art.name, deep=True)
        assert m.kind == "lora" and m.artifact == art.name
        with pytest.raises(Exception, match="LoRA, not a t2v-A14B pipeline"):
            verify_checkpoint_dir(target, task="t2v-A14B")
        total = sum(len(files[p]) for p in report.fetched)
        downloads_ = [e for e in events if e.phase == "download"]
        assert downloads_[0].done_bytes == 0 and downloads_[-1].done_bytes == downloads_[-1].total_bytes == total
        verify = [e for e in events if e.phase == "verify"]
        assert verify[-1].done_bytes == total and verify[-1].file in report.fetched
    finally:
        hub.stop()


def test_dry_run_advice_suggests_5b_but_plans_what_was_asked(hub: FakeHub, tmp_path: Path) -> None:
    from downloads import Machine

    p = plan("t2v-A14B", target_dir=tmp_path / "ckpt", endpoint=hub.endpoint, machine=Machine(1, 23.6))
    assert p.task == "t2v-A14B" and any(f.component == "transformer_2" for f in p.files)
    assert p.advice is not None and not p.advice.runnable and p.advice.suggestion == "ti2v-5B"
    assert hub.file_requests() == []


def test_disk_filling_up_mid_download_is_a_clean_error_and_the_rerun_completes(small_disk: Path,
                                                                               monkeypatch) -> None:
    """A real ENOSPC (a 1 MiB tmpfs, 4 MiB of weights) after the free-space check passed (another writer)."""
    files = pipeline_files(big=2 * 1024 * 1024)
    hub = serve(monkeypatch, files)
    target = small_disk / "ckpt"
    try:
        with pytest.raises(DownloadError, match="disk filled up") as err:
            fetch(hub, target, free_disk_bytes=1 << 40, max_workers=1)
        assert "free disk space" in err.value.hint and "rerun" in err.value.hint
        assert "partial file(s)" in err.value.message
        assert not (target / MANIFEST_NAME).exists() and (target / INCOMPLETE_MARKER).exists()
        assert not list((target / ".cache").rglob("*.incomplete")), "temp files must be freed"
        for p in target.rglob("*"):  # what did land is complete and correct
            rel = p.relative_to(target).as_posix()
            if p.is_file() and rel in files:
                assert p.read_bytes() == files[rel], rel
        kept = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}

        subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
        hub.clear()
        report = fetch(hub, target, free_disk_bytes=1 << 40, max_workers=1)  # the 1 GiB headroom rule aside
        assert report.verified and verify_checkpoint_dir(target, task="t2v-A14B", deep=True)
        refetched = {p for p in EXPECTED if hub.file_requests(p)}
        assert not (refetched & kept), f"finished files fetched again: {refetched & kept}"
    finally:
        hub.stop()


# hf_xet (huggingface_hub's Xet storage client) reports every failed transfer as a plain RuntimeError
XET_503 = ("Task error: File reconstruction error: CAS Client Error: Request failed after 5 retries: HTTP status "
           "server error (503 Service Unavailable) for url (https://cas-server.xethub.hf.co/v1/reconstructions/x)")
XET_ENOSPC = "Task error: Data processing error: I/O error: No space left on device (os error 28)"


def xet_fails(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], failing: dict[str, str]) -> None:
    """Make huggingface_hub's transfer of each file in ``failing`` raise RuntimeError(message) as hf_xet does.

    The fake hub speaks no Xet, so the error is raised where huggingface_hub runs the transfer (its temp file
    open, half the bytes written), and travels the real snapshot_download path from there. Clearing
    ``failing`` lets the transfers through again.
    """
    from huggingface_hub import file_download

    real = file_download.http_get
    by_sha = {hashlib.sha256(data).hexdigest(): path for path, data in files.items()}

    def http_get(url: str, temp_file, **kw) -> None:
        path = by_sha.get(url.rsplit("/", 1)[-1]) or next((p for p in files if url.endswith("/" + p)), "")
        if path in failing:
            temp_file.write(files[path][: len(files[path]) // 2])
            raise RuntimeError(failing[path])
        real(url, temp_file, **kw)

    monkeypatch.setattr(file_download, "http_get", http_get)


def test_a_xet_transfer_failure_is_a_download_error_and_the_rerun_completes(hub: FakeHub, tmp_path: Path,
                                                                            monkeypatch) -> None:
    failing = {BIG: XET_503}
    xet_fails(monkeypatch, hub.repos[REPO].files, failing)
    target = tmp_path / "ckpt"
    with pytest.raises(DownloadError, match="Xet transfer") as err:
        fetch(hub, target)
    assert "503 Service Unavailable" in err.value.message and isinstance(err.value.__cause__, RuntimeError)
    assert "rerun the same command" in err.value.hint and "HF_HUB_DISABLE_XET=1" in err.value.hint
    assert (target / INCOMPLETE_MARKER).exists() and not (target / MANIFEST_NAME).exists()
    assert not (target / BIG).exists()
    _no_partials_in_final_layout(target)

    failing.clear()
    hub.clear()
    report = fetch(hub, target)
    assert report.verified and (target / BIG).read_bytes() == hub.repos[REPO].files[BIG]
    assert {p for p in EXPECTED if hub.file_requests(p)} == {BIG}  # what had finished was kept


def test_a_full_disk_on_the_xet_path_is_the_disk_full_error(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    """hf_xet reports ENOSPC as RuntimeError text, never as OSError: same error, hint and clean-up as ENOSPC."""
    from downloads.hub import DISK_FULL_HINT

    xet_fails(monkeypatch, hub.repos[REPO].files, {BIG: XET_ENOSPC})
    target = tmp_path / "ckpt"
    stale = target / ".cache/huggingface/download/transformer_2/old.incomplete"
    from downloads import fetch as fetch_mod

    real_fetch = fetch_mod._fetch

    def fetch_leaving_a_partial(*args: object) -> None:  # a temp file the cut transfer leaves behind
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(bytes(4096))
        real_fetch(*args)

    monkeypatch.setattr(fetch_mod, "_fetch", fetch_leaving_a_partial)
    with pytest.raises(DownloadError, match="disk filled up") as err:
        fetch(hub, target, max_workers=1)
    assert err.value.hint == DISK_FULL_HINT and "No space left on device" in err.value.message
    assert "removed 1 partial file(s)" in err.value.message and not stale.exists()
    assert (target / INCOMPLETE_MARKER).exists() and not (target / MANIFEST_NAME).exists()


def test_a_xet_failure_through_the_cli_is_an_error_message_not_a_traceback(hub: FakeHub, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    driver = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}]
        from tests.fakehub import SocketGuard
        SocketGuard().install()
        from huggingface_hub import file_download

        def http_get(url, temp_file, **kw):
            raise RuntimeError({XET_503!r})

        file_download.http_get = http_get
        import cli
        sys.argv = ["wanctl", "download", "--dir", {str(target)!r}]
        cli.main()
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    p = subprocess.run([sys.executable, "-c", driver], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    err = " ".join(p.stderr.split())
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "error: the Xet transfer of" in err and "HF_HUB_DISABLE_XET=1" in err
    assert (target / INCOMPLETE_MARKER).exists() and not (target / MANIFEST_NAME).exists()


def test_catalogue_pin_fetches_that_commit_while_main_has_moved(tmp_path: Path, monkeypatch) -> None:
    """A pinned catalogue entry gets its commit, not main; the tuned recipe carries it; a move is refused."""
    import dataclasses

    from autotune.config import TuneConfig
    from downloads.catalogue import CATALOGUE
    from recipes.errors import CheckpointError
    from recipes.manifest import check_revision

    old_files = pipeline_files()
    new_files = {**old_files, BIG: tensor_file(99, len(old_files[BIG]) // 4)}
    pinned = "1" * 40
    hub = serve(monkeypatch, new_files, older={pinned: old_files})
    head = hub.repos[REPO].commit
    try:
        monkeypatch.setitem(CATALOGUE, "t2v-A14B", dataclasses.replace(CATALOGUE["t2v-A14B"], revision=pinned))
        target = tmp_path / "ckpt"
        report = fetch(hub, target)
        assert report.revision == pinned and head != pinned
        assert (target / BIG).read_bytes() == old_files[BIG] != new_files[BIG]
        assert verify_checkpoint_dir(target, task="t2v-A14B", deep=True).revision == pinned
        assert TuneConfig(model=str(target), task="t2v-A14B").base_recipe().model_revision == pinned

        hub.clear()  # the user moves the directory to main: only the changed file is fetched
        moved = fetch(hub, target, revision=head)
        assert moved.revision == head and set(moved.fetched) == {BIG}
        assert (target / BIG).read_bytes() == new_files[BIG]
        with pytest.raises(CheckpointError, match="pins model_revision 111111111111") as err:
            check_revision(target, verify_checkpoint_dir(target, task="t2v-A14B"), pinned)
        assert f"--revision {pinned}" in err.value.hint
    finally:
        hub.stop()


# ----------------------------------------------------------------- the user's files, and reruns that must not cost
def test_files_wanctl_did_not_download_are_adopted_only_when_they_are_the_hubs(hub: FakeHub, tmp_path: Path) -> None:
    files = pipeline_files()
    mine = tmp_path / "mine"  # the user's fine-tune under the hub's names: same size, other bytes
    (mine / "transformer").mkdir(parents=True)
    tuned = bytes(b ^ 0x5A for b in files["transformer/diffusion_pytorch_model.safetensors"])
    (mine / "transformer/diffusion_pytorch_model.safetensors").write_bytes(tuned)
    with pytest.raises(BadInput, match="wanctl did not download that differ") as err:
        fetch(hub, mine)
    assert "transformer/diffusion_pytorch_model.safetensors (sha256)" in str(err.value)
    assert (mine / "transformer/diffusion_pytorch_model.safetensors").read_bytes() == tuned  # untouched
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "transformer", "transformer/diffusion_pytorch_model.safetensors"]  # no marker, cache or manifest either
    assert hub.file_requests() == []

    copy = tmp_path / "copy"  # the same files from another client (huggingface-cli download): adopted
    (copy / "vae").mkdir(parents=True)
    (copy / "vae/diffusion_pytorch_model.safetensors").write_bytes(files["vae/diffusion_pytorch_model.safetensors"])
    report = fetch(hub, copy)
    assert report.verified and "vae/diffusion_pytorch_model.safetensors" not in report.fetched
    assert not [r for r in hub.file_requests("vae/diffusion_pytorch_model.safetensors") if r.method == "GET"]


def lightning_repo() -> FakeRepo:
    from downloads import CATALOGUE

    art = CATALOGUE["t2v-A14B-lightning"]
    return FakeRepo(art.hf_repo, {p: tensor_file(i, 2048) for i, c in enumerate(art.components) for p in c.patterns})


def test_another_artifacts_failed_download_does_not_make_the_users_files_wanctls(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """Which files are wanctl's is decided per file: the marker of the LoRA's failed download here vouches for the
    LoRA's files, not for the user's fine-tune under the pipeline's names."""
    lora = lightning_repo()
    hub = serve(monkeypatch, more=(lora,))
    user_file = "transformer/diffusion_pytorch_model.safetensors"
    mine = tmp_path / "mine"
    (mine / "transformer").mkdir(parents=True)
    tuned = bytes(b ^ 0x5A for b in hub.repos[REPO].files[user_file])
    (mine / user_file).write_bytes(tuned)
    try:
        with pytest.raises(BadInput, match="wanctl did not download that differ"):
            fetch(hub, mine)
        lora_file = next(iter(lora.files))
        hub.override[lora_file] = bytes(len(lora.files[lora_file]))  # the LoRA's download fails, marker left
        with pytest.raises(DownloadError, match="failed verification"):
            fetch(hub, mine, task="t2v-A14B-lightning")
        assert (mine / INCOMPLETE_MARKER).exists()
        again = plan("t2v-A14B-lightning", target_dir=mine, endpoint=hub.endpoint)  # its own files stay its own
        assert any(f.present for f in again.files) and not any("not downloaded by wanctl" in n for n in again.notes)
        hub.clear()

        with pytest.raises(BadInput, match="wanctl did not download that differ") as err:
            fetch(hub, mine)
        assert f"{user_file} (sha256)" in str(err.value)
        assert (mine / user_file).read_bytes() == tuned  # untouched
        assert not [r for r in hub.file_requests(user_file) if r.method == "GET"]
    finally:
        hub.stop()


def test_files_another_huggingface_hub_client_fetched_are_still_checked(tmp_path: Path, monkeypatch) -> None:
    """huggingface_hub's local-dir metadata is no sign a file is wanctl's: ``hf download`` of the user's own
    fine-tune writes it too (it records a commit and an ETag, not the repository)."""
    from huggingface_hub import snapshot_download

    files = pipeline_files()
    user_file = "transformer/diffusion_pytorch_model.safetensors"
    finetune = FakeRepo("me/wan-finetune", {**files, user_file: bytes(b ^ 0x5A for b in files[user_file])})
    hub = serve(monkeypatch, files, more=(finetune,))
    mine = tmp_path / "mine"
    try:
        snapshot_download("me/wan-finetune", local_dir=mine, endpoint=hub.endpoint, allow_patterns=[user_file],
                          cache_dir=tmp_path / "user-cache")
        assert (mine / ".cache/huggingface/download" / f"{user_file}.metadata").is_file()
        with pytest.raises(BadInput, match="wanctl did not download that differ"):
            fetch(hub, mine)
        assert (mine / user_file).read_bytes() == finetune.files[user_file]
    finally:
        hub.stop()


def test_verify_rehashes_and_refetches_only_what_rotted(hub: FakeHub, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    fetch(hub, target)
    weights = target / "vae/diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot: same size, same mtime order
    weights.write_bytes(bytes(data))
    plain = fetch(hub, target)
    assert plain.already_complete and not plain.hashed  # sizes only, and the report says so
    hub.clear()
    checked = fetch(hub, target, verify=True)
    assert checked.verified and not checked.already_complete
    assert checked.fetched == ("vae/diffusion_pytorch_model.safetensors",)
    assert weights.read_bytes() == pipeline_files()["vae/diffusion_pytorch_model.safetensors"]
    assert any("no longer matched" in n for n in checked.notes)
    again = fetch(hub, target, verify=True)
    assert again.already_complete and again.hashed and any("re-hashed and match" in n for n in again.notes)


def test_a_branch_name_is_resolved_not_compared_with_the_commit(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "ckpt"
    fetch(hub, target, revision="main")
    hub.clear()
    again = fetch(hub, target, revision="main")
    assert again.already_complete and hub.file_requests() == []  # one listing call, no file and no re-hash
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = download("t2v-A14B", target_dir=target, revision="main")
    assert offline.already_complete and any("offline, the held commit" in n for n in offline.notes)
    short = download("t2v-A14B", target_dir=target, revision=hub.repos[REPO].commit[:10])
    assert short.already_complete


def test_partial_files_of_a_killed_run_count_as_free_space(hub: FakeHub, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    need = plan("t2v-A14B", target_dir=target, endpoint=hub.endpoint, free_disk_bytes=1 << 40).to_fetch_bytes
    dead = target / ".cache/huggingface/download/transformer/x.incomplete"
    dead.parent.mkdir(parents=True)
    dead.write_bytes(bytes(1 << 20))
    (target / INCOMPLETE_MARKER).write_text("interrupted\n")
    from downloads.select import disk_shortfall

    free = next(f for f in range(0, 1 << 32, 1 << 16) if not disk_shortfall(need, f + (1 << 20)))
    assert disk_shortfall(need, free)  # without the partial's megabyte it would not fit
    report = fetch(hub, target, free_disk_bytes=free)
    assert report.verified and not dead.exists()


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["Ctrl-C", "TERM"])
def test_ctrl_c_stops_the_download_at_once_and_says_so(tmp_path: Path, monkeypatch, sig: int, code: int,
                                                       said: str) -> None:
    files = pipeline_files()
    hub = serve(monkeypatch, files)
    hold = hub.holds[BIG] = Hold(after=len(files[BIG]) // 2)
    target = tmp_path / "ckpt"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    child = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "download", "--dir", str(target)],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hold.reached.wait(60), child.communicate(timeout=5)[1][-2000:]
        child.send_signal(sig)  # the held transfer would keep a plain exit waiting for minutes
        _, err = child.communicate(timeout=15)
        assert child.returncode == code and said in err and "resumes" in err
        assert (target / INCOMPLETE_MARKER).exists() and not (target / MANIFEST_NAME).exists()
    finally:
        hold.release.set()
        if child.poll() is None:
            child.kill()
        hub.stop()


@pytest.mark.parametrize("name", sorted(__import__("downloads").CATALOGUE))
def test_dry_run_offline_says_what_it_would_fetch_from_the_catalogue(name: str, tmp_path: Path, guard: SocketGuard,
                                                                     monkeypatch) -> None:
    """Offline, `wanctl download --dry-run` could not say how much it would fetch: every catalogue entry's
    components carry expected sizes, and the dry run says them (marked expected), with the disk check."""
    from downloads import artifact

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(guard.connects)
    art = artifact(name)
    p = plan(name, target_dir=tmp_path / "ckpt", expected_without_listing=True, free_disk_bytes=10**15)
    assert p.expected and not p.complete and p.fits_disk
    assert [f.component for f in p.files] == [c.name for c in art.components]
    assert all(f.size > 0 for f in p.files) and p.total_bytes == p.to_fetch_bytes == art.approx_bytes
    weights = sum(f.size for f, c in zip(p.files, art.components, strict=True) if c.weights)
    assert weights > (1e9 if art.kind == "lora" else 10e9)  # GBs of weights, not a placeholder
    assert "no file listing (offline)" in p.notes[0] and "approximate" in p.notes[0]
    short = plan(name, target_dir=tmp_path / "ckpt", expected_without_listing=True, free_disk_bytes=10**6)
    assert not short.fits_disk and any(n.startswith("would not fit: ~") for n in short.notes)
    with pytest.raises(DownloadError, match="offline"):  # a real download still needs the listing
        plan(name, target_dir=tmp_path / "ckpt")
    assert len(guard.connects) == before and not (tmp_path / "ckpt").exists()


def test_dry_run_with_the_hub_unreachable_says_the_expected_size(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    p = plan("ti2v-5B", target_dir=tmp_path / "ckpt", source="hf", endpoint=dead, expected_without_listing=True)
    assert p.expected and p.total_bytes > 30e9
    assert "Wan-AI/Wan2.2-TI2V-5B-Diffusers unreachable" in p.notes[0]
    with pytest.raises(DownloadError):
        plan("ti2v-5B", target_dir=tmp_path / "ckpt", source="hf", endpoint=dead)


def test_dry_run_offline_through_the_cli_prints_the_expected_total(tmp_path: Path) -> None:
    from downloads import artifact
    from tests.conftest import run_cli

    env = {"HF_HUB_OFFLINE": "1", "WANCTL_CACHE": str(tmp_path / "c"), "COLUMNS": "200"}
    p = run_cli("download", "--task", "t2v-A14B", "--dry-run", "--dir", str(tmp_path / "ckpt"), env=env)
    assert p.returncode == 0, p.stderr
    total = artifact("t2v-A14B").approx_bytes / 2**30
    assert f"expected total ~{total:.1f} GiB in 7 components" in p.stdout, p.stdout
    doc = json.loads(run_cli("download", "--task", "t2v-A14B", "--dry-run", "--dir", str(tmp_path / "ckpt"),
                             "--json", env=env).stdout)
    assert doc["expected"] is True and doc["total_bytes"] == artifact("t2v-A14B").approx_bytes
