"""The runtime shares torch's cuDNN with Transformer Engine (a mixed cuDNN failed every trial on the H200 image)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wan_runtime import env

MAPS = """\
7f00-7f10 r-xp 00000000 00:2a 101 /usr/lib/x86_64-linux-gnu/libc.so.6
7f20-7f30 r--p 00000000 00:2a 102 /opt/venv/site-packages/nvidia/cudnn/lib/libcudnn.so.9
7f40-7f50 rw-p 00000000 00:00 0
7f60-7f70 r-xp 00000000 00:2a 103 /usr/lib/x86_64-linux-gnu/libcudnn_graph.so.9.14.0
"""


def test_the_first_mapped_copy_of_a_library_is_found() -> None:
    assert env.loaded_library("libcudnn.so", MAPS) == Path("/opt/venv/site-packages/nvidia/cudnn/lib/libcudnn.so.9")
    assert env.loaded_library("libcudnn_graph", MAPS).name == "libcudnn_graph.so.9.14.0"
    assert env.loaded_library("libnccl", MAPS) is None  # anonymous mappings (no path) are skipped too


def test_cudnn_libraries_load_graph_first_and_the_front_library_last() -> None:
    names = ["libcudnn.so", "libcudnn.so.9", "libcudnn_adv.so.9", "libcudnn_cnn.so.9", "libcudnn_ops.so.9",
             "libcudnn_graph.so.9", "libcudnn_heuristic.so.9", "libcudnn_engines_precompiled.so.9"]
    order = [p.name for p in env.cudnn_preload_order(Path("/x") / n for n in names)]
    assert order[:4] == ["libcudnn_graph.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9", "libcudnn_adv.so.9"]
    assert order[-1] == "libcudnn.so.9" and "libcudnn.so" not in order and len(order) == 7


def test_a_cudnn_library_from_another_folder_is_found() -> None:
    maps = MAPS + "7f80-7f90 r-xp 00000000 00:2a 104 /opt/venv/site-packages/nvidia/cudnn/lib/libcudnn_ops.so.9\n"
    folder = Path("/opt/venv/site-packages/nvidia/cudnn/lib")
    assert env.foreign_cudnn(folder, maps) == [Path("/usr/lib/x86_64-linux-gnu/libcudnn_graph.so.9.14.0")]
    assert env.foreign_cudnn(Path("/usr/lib/x86_64-linux-gnu"), MAPS) == [folder / "libcudnn.so.9"]


def _torch_cudnn_in(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch's cuDNN "loaded" from ``folder`` with TE installed; returns the libraries preloaded."""
    monkeypatch.setattr(env.torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(env.torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "transformer_engine" else None)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("libcudnn.so.9", "libcudnn_graph.so.9"):
        (folder / name).write_bytes(b"not a library")
    monkeypatch.setattr(env, "loaded_library", lambda prefix, maps=None: folder / "libcudnn.so.9")
    monkeypatch.setattr(env, "foreign_cudnn", lambda folder, maps=None: [])
    loaded: list[str] = []
    monkeypatch.setattr("ctypes.CDLL", lambda name, mode=0: loaded.append(Path(name).name))
    return loaded


@pytest.mark.parametrize("var", ["CUDNN_PATH", "CUDNN_HOME"])
def test_a_users_other_cudnn_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str) -> None:
    monkeypatch.setenv("CUDNN_PATH", "")  # empty counts as unset, and monkeypatch restores what the call sets
    monkeypatch.setenv("CUDNN_HOME", "")
    monkeypatch.setenv(var, str(tmp_path / "my-cudnn"))
    loaded = _torch_cudnn_in(tmp_path / "venv/nvidia/cudnn/lib", monkeypatch)
    env.share_torch_cudnn()
    assert loaded == []
    assert os.environ[var] == str(tmp_path / "my-cudnn") and (os.environ["CUDNN_PATH"] == "" or var == "CUDNN_PATH")


@pytest.mark.parametrize("named", ["lib", "package"])
def test_an_inherited_cudnn_path_naming_torchs_folder_still_preloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                     named: str) -> None:
    """A trial inherits the CUDNN_PATH its parent's call set; CUDNN_PATH alone did not keep the system cuDNN
    out on the H200 image (the baseline trial died of two cuDNNs), so the preload must still happen."""
    lib = tmp_path / "venv/nvidia/cudnn/lib"
    monkeypatch.setenv("CUDNN_HOME", "")
    monkeypatch.setenv("CUDNN_PATH", str(lib if named == "lib" else lib.parent))
    loaded = _torch_cudnn_in(lib, monkeypatch)
    env.share_torch_cudnn()
    assert loaded == ["libcudnn_graph.so.9", "libcudnn.so.9"]
    assert os.environ["CUDNN_PATH"] == str(lib if named == "lib" else lib.parent)


def test_torchs_cudnn_folder_is_named_for_transformer_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDNN_PATH", "")  # empty counts as unset, and monkeypatch restores what the call sets
    monkeypatch.setenv("CUDNN_HOME", "")
    monkeypatch.setattr(env.torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(env.torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "transformer_engine" else None)
    (tmp_path / "libcudnn.so.9").write_bytes(b"not a library")  # preloading it fails: logged, not raised
    monkeypatch.setattr(env, "loaded_library", lambda prefix, maps=None: tmp_path / "libcudnn.so.9")
    env.share_torch_cudnn()
    assert os.environ["CUDNN_PATH"] == str(tmp_path)


def test_nothing_changes_without_transformer_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDNN_PATH", "")  # empty counts as unset, and monkeypatch restores what the call sets
    monkeypatch.setenv("CUDNN_HOME", "")
    monkeypatch.setattr(env.torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr(env, "loaded_library", lambda *a: pytest.fail("must not look for torch's cuDNN"))
    env.share_torch_cudnn()
    assert os.environ["CUDNN_PATH"] == ""


@pytest.mark.parametrize(("kind", "message"), [
    (RuntimeError, "cuDNN version incompatibility: PyTorch was compiled  against (9, 19, 0) but found runtime "
                   "version (9, 14, 0)."),
    (RuntimeError, "/lib/x86_64-linux-gnu/libcudnn_heuristic.so.9: undefined symbol: _ZTVN5cudnn7backend12OperationSetE"),
    (OSError, "/lib/x86_64-linux-gnu/libcudnn_heuristic.so.9: undefined symbol: _ZTVN5cudnn7backend12OperationSetE"),
])
def test_a_trial_killed_by_two_cudnns_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         kind: type[Exception], message: str) -> None:
    from recipes.recipe import Recipe
    from recipes.spec import TrialSpec
    from wan_runtime import run

    def boom(*args: object) -> None:
        raise kind(message)  # an OSError from a failed library load has no errno: not a write error

    monkeypatch.setattr(run, "_run", boom)
    res = run.run_spec(TrialSpec(recipe=Recipe(), mode="quality", out_dir=str(tmp_path), write_video=False))
    assert res.outcome == "crash" and res.error.startswith(message.splitlines()[0])
    assert "LD_LIBRARY_PATH" in res.error
    assert env.mixed_cudnn_hint("CUDA error: an illegal memory access was encountered") == ""


def test_a_te_import_broken_by_two_cudnns_is_a_crash_with_the_fix_not_a_missing_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from recipes.errors import WanctlError
    from wan_runtime.knobs.base import Unsupported, require_module

    def broken(name: str) -> None:
        raise OSError("/lib/x86_64-linux-gnu/libcudnn_heuristic.so.9: undefined symbol: _ZTVN5cudnn7backend12Op")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(WanctlError) as exc:
        require_module("transformer_engine.pytorch", "te")
    assert not isinstance(exc.value, Unsupported) and "LD_LIBRARY_PATH" in exc.value.hint
    monkeypatch.setattr(importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError("No module")))
    with pytest.raises(Unsupported):
        require_module("transformer_engine.pytorch", "te")


def test_cudnn_home_wins_as_it_does_for_te(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TE reads CUDNN_HOME before CUDNN_PATH: an inherited CUDNN_PATH naming torch's folder does not override a
    user's CUDNN_HOME naming another cuDNN (preloading torch's would give the process two)."""
    lib = tmp_path / "venv/nvidia/cudnn/lib"
    monkeypatch.setenv("CUDNN_PATH", str(lib))
    monkeypatch.setenv("CUDNN_HOME", str(tmp_path / "my-cudnn"))
    loaded = _torch_cudnn_in(lib, monkeypatch)
    env.share_torch_cudnn()
    assert loaded == []


def test_a_symlink_loop_in_the_users_path_is_not_torchs_folder(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert env._names_folder(str(loop / "lib"), tmp_path / "venv/nvidia/cudnn/lib") is False
