"""Kernel checks: the real child on this CPU, and children that crash, hang or print garbage."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from probes.commands import CommandResult, run_command
from probes.kernels import KERNEL_CHECKS, START_MARK, run_kernel_checks
from recipes.locations import with_source_on_path
from tests.conftest import ROOT
from tests.probe_fakes import write_script

CPU_OK = ("attention:native", "attention:_native_flash", "attention:_native_math", "attention:flex")
"""diffusers backends that pass on a CPU (torch 2.13, diffusers 0.42.1): recorded in the report."""


@pytest.fixture(scope="module")
def real_child() -> CommandResult:
    """One real run of ``python -m wan_runtime.kernel_check --cpu`` (~6 s: torch + diffusers import).

    ``--cpu`` keeps the expectations the same on a GPU host; the GPU run is ``test_real_child_on_gpu``.
    """
    res = run_command([sys.executable, "-m", "wan_runtime.kernel_check", "--cpu"], timeout_s=120,
                      env=with_source_on_path(), cwd=str(ROOT))
    assert res.ok, res.stderr[-2000:]
    return res


@pytest.mark.slow
def test_real_child_prints_exactly_one_json_document(real_child: CommandResult) -> None:
    doc = json.loads(real_child.stdout)  # strict: library chatter went to stderr, not stdout
    assert doc["schema"] == 1
    assert list(doc["checks"]) == sorted(KERNEL_CHECKS)  # the child's list is the parent's list
    assert doc["device"] == "cpu"
    assert doc["torch"].startswith("2.")
    announced = [ln[len(START_MARK):] for ln in real_child.stderr.splitlines() if ln.startswith(START_MARK)]
    assert announced == list(KERNEL_CHECKS)  # same marker, same order


def test_real_child_on_cpu(real_child: CommandResult, tmp_path: Path) -> None:
    saved = tmp_path / "doc.json"
    saved.write_text(real_child.stdout)
    py = write_script(tmp_path / "python", f'cat "{saved}"\n')
    report = run_kernel_checks(python=str(py), timeout_s=10)
    by = {c.name: c for c in report.checks}
    assert [c.name for c in report.checks] == list(KERNEL_CHECKS)
    for name in CPU_OK:
        assert by[name].ok, by[name]
        assert 0 < by[name].rel_err < 2e-2
    assert by["attention:_native_cudnn"].summary == "absent: no CUDA device"
    assert by["attention:_native_efficient"].summary == "absent: no CUDA device"
    assert by["fp8_scaled_mm"].summary == "absent: no CUDA device"
    assert by["compile"].status == "absent" and "wanctl probe --with-compile" in by["compile"].detail
    assert report.device == "cpu"
    assert report.notes == ()


@pytest.mark.gpu
def test_real_child_on_gpu() -> None:
    report = run_kernel_checks(timeout_s=300)
    by = {c.name: c for c in report.checks}
    assert report.device == "cuda", report.notes
    for name in ("attention:native", "attention:_native_cudnn", "attention:_native_flash", "attention:_native_math"):
        assert by[name].ok, by[name]
    cc = tuple(int(x) for x in report.compute_capability.split("."))
    assert by["fp8_scaled_mm"].ok == (cc >= (8, 9)), by["fp8_scaled_mm"]


def test_child_that_segfaults_fails_every_check(tmp_path: Path) -> None:
    py = write_script(tmp_path / "python", "exit 139\n")
    report = run_kernel_checks(python=str(py), timeout_s=10)
    assert len(report.checks) == len(KERNEL_CHECKS)
    assert {c.summary for c in report.checks} == {"fails: probe child crashed (exit 139 (SIGSEGV))"}
    assert report.notes == ("probe failed: kernel-check child crashed (exit 139 (SIGSEGV))",)


def test_child_that_prints_garbage(tmp_path: Path) -> None:
    py = write_script(tmp_path / "python", "echo 'Illegal instruction? no: just words'\n")
    report = run_kernel_checks(python=str(py), timeout_s=10)
    assert {c.status for c in report.checks} == {"fails"}
    assert report.checks[0].detail.startswith("probe child printed no JSON document: 'Illegal instruction?")


def test_child_that_hangs_is_killed_as_a_group(tmp_path: Path) -> None:
    py = write_script(tmp_path / "python", "sleep 30 &\nwait\n")
    t0 = time.monotonic()
    report = run_kernel_checks(python=str(py), timeout_s=0.5)
    assert time.monotonic() - t0 < 2  # killing only the child would leave the pipes open (2 s grace)
    assert {c.summary for c in report.checks} == {"fails: probe child timed out after 0.5 s"}


def test_crash_inside_one_check_reruns_the_others(tmp_path: Path) -> None:
    # First start: dies inside the sage check. Second start (with --skip): reports the rest.
    doc = {"schema": 1, "torch": "2.11.0+cu130", "torch_cuda": "13.0", "cudnn": "91900", "device": "cuda",
           "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda_unavailable": "",
           "checks": {"attention:native": {"status": "ok", "detail": "", "rel_err": 0.002, "seconds": 1.0}}}
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    py = write_script(tmp_path / "python", f"""case "$*" in
  *"--skip attention:sage"*) cat "{tmp_path / 'doc.json'}" ;;
  *) echo "{START_MARK}attention:native" >&2; echo "{START_MARK}attention:sage" >&2; kill -SEGV $$ ;;
esac
""")
    report = run_kernel_checks(python=str(py), timeout_s=10)
    by = {c.name: c for c in report.checks}
    assert by["attention:native"].ok
    assert by["attention:sage"].summary == "fails: probe child crashed (exit -11 (SIGSEGV)) during this check"
    assert by["attention:flash"].summary == "fails: probe child did not report it"
    assert report.device_name == "NVIDIA H100 80GB HBM3"
    assert report.notes == ("kernel check 'attention:sage' crashed (exit -11 (SIGSEGV)); restarted the child without it",)


def test_child_that_keeps_dying_gives_up(tmp_path: Path) -> None:
    # Dies in a different check every start: at most max_restarts + 1 starts, then everything left fails.
    counter = tmp_path / "n"
    counter.write_text("0")
    py = write_script(tmp_path / "python", f"""n=$(cat "{counter}"); n=$((n+1)); echo $n > "{counter}"
echo "{START_MARK}check$n" >&2
exit 134
""")
    report = run_kernel_checks(python=str(py), timeout_s=10, max_restarts=2)
    assert counter.read_text().strip() == "3"
    by = {c.name: c for c in report.checks}
    assert by["check1"].summary == "fails: probe child crashed (exit 134 (SIGABRT)) during this check"
    assert by["attention:native"].summary == "fails: probe child kept dying; not run"
    assert report.notes[-1] == "probe failed: kernel-check child died 3 times; remaining checks not run"


def test_missing_interpreter(tmp_path: Path) -> None:
    report = run_kernel_checks(python=str(tmp_path / "no-python"), timeout_s=5)
    assert report.checks[0].summary == f"fails: probe child could not run: {tmp_path / 'no-python'} not found"


def test_cuda_build_that_cannot_reach_the_gpu(tmp_path: Path) -> None:
    doc = {"schema": 1, "torch": "2.11.0+cu130", "torch_cuda": "13.0", "cudnn": "91900", "device": "cpu",
           "device_name": "", "compute_capability": "",
           "cuda_unavailable": "CUDA initialization: The NVIDIA driver on your system is too old (found version 12040).",
           "checks": {}}
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    py = write_script(tmp_path / "python", f'cat "{tmp_path / "doc.json"}"\n')
    report = run_kernel_checks(python=str(py), timeout_s=10)
    assert report.notes == ("torch 2.11.0+cu130 cannot use the GPU (CUDA initialization: The NVIDIA driver on your "
                            "system is too old (found version 12040).): kernel checks ran on the CPU",)


def test_stray_lines_around_the_childs_document_do_not_lose_the_report() -> None:
    """A library may print at import or at exit, through a path the child did not redirect."""
    from probes.kernels import _parse_doc

    doc = '{"checks": {"compile": {"status": "ok"}}}'
    for stdout in (f"loading...\n{doc}", f"{doc}\n[torchao] cleaning up", f"a\n{doc}\nb\n"):
        assert _parse_doc(stdout)["checks"] == {"compile": {"status": "ok"}}
    with pytest.raises(ValueError, match="printed no JSON document"):
        _parse_doc("only noise\nhere")


def test_each_check_is_named_as_it_starts_even_the_one_that_hangs(tmp_path: Path) -> None:
    """The name reaches the caller while the child still runs: the hung check is the last name heard, before
    the timeout, and the child is still killed as a group."""
    heard: list[tuple[str, float]] = []
    py = write_script(tmp_path / "python", f"""case "$*" in
  *"--skip attention:sage"*) echo '{{"schema": 1, "checks": {{}}}}' ;;
  *) echo "{START_MARK}attention:native" >&2; echo "not a mark" >&2; echo "{START_MARK}attention:sage" >&2
     sleep 30 & wait ;;
esac
""")
    t0 = time.monotonic()
    report = run_kernel_checks(python=str(py), timeout_s=3.0,
                               on_check=lambda name: heard.append((name, time.monotonic() - t0)))
    assert [n for n, _ in heard] == ["attention:native", "attention:sage"]
    assert heard[-1][1] < 3.0  # heard while the child was hanging, not read back after it was killed
    assert time.monotonic() - t0 < 7
    by = {c.name: c for c in report.checks}
    assert by["attention:sage"].summary == "fails: probe child timed out after 3 s during this check"


def test_a_failing_line_callback_loses_nothing(tmp_path: Path) -> None:
    py = write_script(tmp_path / "python", "echo one >&2; echo two >&2; echo '{}'\n")

    def broken(line: str) -> None:
        raise RuntimeError("display gone")

    res = run_command([str(py)], timeout_s=10, on_stderr_line=broken)
    assert res.ok and res.stdout == "{}\n" and res.stderr == "one\ntwo\n"


def test_streamed_output_waits_for_a_descendant_holding_the_pipe_like_communicate(tmp_path: Path) -> None:
    """A child that prints its document and leaves a descendant writing on: its output is kept, within the
    deadline, as the non-streaming path keeps it."""
    # 5 s: longer than the 2 s + 2 s the old reader gave the pipes after the child exited
    py = write_script(tmp_path / "python", "echo '{\"ok\": 1}'; (sleep 5; echo late) & exit 0\n")
    res = run_command([str(py)], timeout_s=20, on_stderr_line=lambda line: None)
    assert res.ok and res.stdout == '{"ok": 1}\nlate\n', res
    hung = write_script(tmp_path / "hung", "echo partial; echo started >&2; sleep 30\n")
    res = run_command([str(hung)], timeout_s=1.5, on_stderr_line=lambda line: None)
    assert res.timed_out and res.stdout == "partial\n" and res.stderr == "started\n"


def test_children_number_gpus_as_the_probe_does_unless_the_user_chose(tmp_path: Path) -> None:
    from autotune.trial_runner import child_env

    py = write_script(tmp_path / "python", 'echo "$CUDA_DEVICE_ORDER" >&2; exit 1\n')
    for given, seen in ((None, "PCI_BUS_ID"), ("", "PCI_BUS_ID"), ("FASTEST_FIRST", "FASTEST_FIRST")):
        env = {"PATH": "/usr/bin:/bin"} | ({"CUDA_DEVICE_ORDER": given} if given is not None else {})
        report = run_kernel_checks(python=str(py), timeout_s=10, env=env)
        assert report.checks[0].detail.endswith(seen), report.checks[0].detail
    assert child_env()["CUDA_DEVICE_ORDER"] in ("PCI_BUS_ID", __import__("os").environ.get("CUDA_DEVICE_ORDER"))


@pytest.mark.parametrize("then", ["kill -SEGV $$", "sleep 30 & wait"])
def test_a_child_dying_after_its_report_keeps_the_report(tmp_path: Path, then: str) -> None:
    """Some CUDA extensions crash or hang at interpreter exit, after the document was printed: the checks
    it reports stand (they were blamed one by one on the last-started check, then all failed)."""
    doc = {"schema": 1, "torch": "2.11.0+cu130", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
           "checks": {name: {"status": "ok", "detail": "", "rel_err": 0.001, "seconds": 0.5}
                      for name in KERNEL_CHECKS}}
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    py = write_script(tmp_path / "python", f"""echo "{START_MARK}compile" >&2
cat "{tmp_path / 'doc.json'}"
{then}
""")
    report = run_kernel_checks(python=str(py), timeout_s=1)
    assert all(c.ok for c in report.checks), [c.summary for c in report.checks if not c.ok]
    assert len(report.notes) == 1 and "after reporting every check" in report.notes[0]


def test_numbers_the_child_could_not_measure_fail_their_check(tmp_path: Path) -> None:
    doc = {"schema": 1, "checks": {"attention:native": {"status": "ok", "rel_err": "n/a"},
                                   "attention:flex": {"status": "ok", "rel_err": float("inf")},
                                   "attention:_native_math": {"status": "ok", "rel_err": 0.001, "seconds": 0.2}}}
    (tmp_path / "doc.json").write_text(json.dumps(doc))  # json.dumps writes inf as Infinity, as Python reads it
    py = write_script(tmp_path / "python", f'cat "{tmp_path / "doc.json"}"\n')
    by = {c.name: c for c in run_kernel_checks(python=str(py), timeout_s=10).checks}
    assert by["attention:native"].summary.startswith("fails: probe child reported an unreadable result")
    assert by["attention:flex"].summary.startswith("fails: probe child reported an unreadable result")
    assert by["attention:_native_math"].ok


_FAKE_TORCHAO = '''
import torch


class Int8WeightOnlyConfig:
    pass


class AffineQuantizedTensor(torch.Tensor):
    pass


def quantize_(model, config, filter_fn=None):
    import os
    if os.environ.get("FAKE_TORCHAO_TAKES") != "1":  # a torchao that warns and leaves the weights alone
        return
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight = torch.nn.Parameter(m.weight.detach().as_subclass(AffineQuantizedTensor), requires_grad=False)
'''


@pytest.mark.parametrize(("takes", "status"), [("0", "fails"), ("1", "ok")])
@pytest.mark.slow
def test_torchao_check_fails_when_quantize_leaves_the_weights_plain(tmp_path: Path, takes: str, status: str) -> None:
    """Its tolerance passes an unquantized Linear: the check must see the weight become torchao's."""
    pkg = tmp_path / "torchao" / "quantization"
    pkg.mkdir(parents=True)
    (tmp_path / "torchao" / "__init__.py").write_text("__version__ = '0.0.fake'\n")
    (pkg / "__init__.py").write_text(_FAKE_TORCHAO)
    env = with_source_on_path()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    env["FAKE_TORCHAO_TAKES"] = takes
    res = run_command([sys.executable, "-m", "wan_runtime.kernel_check", "--cpu", "--only", "quant:int8wo"],
                      timeout_s=120, env=env, cwd=str(ROOT))
    assert res.ok, res.stderr[-2000:]
    check = json.loads(res.stdout)["checks"]["quant:int8wo"]
    assert check["status"] == status, check
    if status == "fails":
        assert "did not take: int8wo: the weight stayed a plain Parameter" in check["detail"]
