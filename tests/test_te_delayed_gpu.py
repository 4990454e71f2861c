"""Delayed scaling against the real Transformer Engine: the scales wanctl writes after the calibrating forward
are the ones TE quantizes with, and they follow the amax history in inference (where TE itself updates
nothing). The CPU stand-in in test_te_quant.py only keeps TE's contract as its source reads; this checks it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from wan_runtime.knobs.quant import _PaddedTELinear, _TEForward, te_ran_fp8, te_recipe, te_supported  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture
def te(monkeypatch: pytest.MonkeyPatch) -> object:
    import os

    from wan_runtime.env import share_torch_cudnn

    monkeypatch.setenv("CUDNN_PATH", os.environ.get("CUDNN_PATH", ""))  # what the call sets is undone after
    share_torch_cudnn()  # as the runtime's entry does, before TE loads any cuDNN
    te = pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine not installed ('wanctl[te]')")
    why = te_supported(te, "te_delayed")
    if why:
        pytest.skip(why)
    return te


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_delayed_scales_come_from_calibration_then_follow_the_history(te: object) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    padded = _PaddedTELinear(lin, te)
    forward = _TEForward(padded.forward, te, te_recipe("te_delayed", amax_history_len=4), calibrate_first=True,
                         linears=[padded])
    x = torch.randn(3, 40, 256, device="cuda", dtype=torch.bfloat16)  # 120 rows: padded to 128 and sliced back
    with torch.no_grad():
        ref = lin(x)
        calibrated = forward(x)
        assert not te_ran_fp8(padded.inner)
        assert _rel(calibrated, ref) < 1e-2

        meta = padded.inner.fp8_meta
        scale, fp8_max = meta["scaling_fwd"].scale, float(meta["fp8_max_fwd"])
        x_amax, w_amax = float(x.abs().amax()), float(lin.weight.abs().amax())
        assert scale[0].item() == pytest.approx(fp8_max / x_amax, rel=1e-3)
        assert scale[1].item() == pytest.approx(fp8_max / w_amax, rel=1e-3)

        first_fp8 = forward(x)
        assert te_ran_fp8(padded.inner)
        assert _rel(first_fp8, ref) < 0.1, "the first fp8 forward did not quantize with the calibrated scales"
        steady = scale[0].item()

        forward(4 * x)  # quantized with the old scale; its amax enters the history after the forward
        assert scale[0].item() == pytest.approx(steady / 4, rel=0.02), "the input scale did not follow the history"
        assert _rel(forward(4 * x), 4 * ref - 3 * lin.bias) < 0.1
