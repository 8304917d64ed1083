"""The per-shape autotune of the CUDA op: fused kernel or cuDNN + PyTorch epilogue."""
import pytest
import torch

import ct3d_fx._cuda as cu
from ct3d_fx.ops import Opcode, reference

from conftest import rig_autotune

pytestmark = pytest.mark.cuda
OP = torch.ops.ct3d.conv_transpose3d_epilogue.default


@pytest.mark.parametrize("cin,cout", [(3, 16), (64, 128)])
def test_autotune_picks_and_caches_a_correct_implementation(autotune, cin, cout):
    x = torch.rand(4, cin, 9, 10, 11, device="cuda")
    w = torch.randn(cin, cout, 3, 3, 3, device="cuda") / (cin * 27) ** 0.5
    b = torch.randn(cout, device="cuda")
    prog = [int(Opcode.RELU), 0, -1, -1, -1, -1]
    args = (x, w, b, [2] * 3, [1] * 3, [1] * 3, [1] * 3, 1, prog, [], [])
    out1 = OP(*args)
    choices = cu.autotune_choices()
    assert len(choices) == 1 and set(choices.values()) <= {
        "fused", "reference", "cudnn_channels_last", "cudnn_channels_last_pass"}
    out2 = OP(*args)
    assert torch.equal(out1, out2), "the cached choice must give bitwise-identical results"
    ref = reference(*[a.double() if torch.is_tensor(a) else a for a in args])
    err = ((out1.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-3, err
    assert len(cu.autotune_choices()) == 1


def test_autotune_is_skipped_under_graph_capture(autotune):
    x = torch.rand(2, 8, 5, 6, 7, device="cuda")
    w = torch.randn(8, 8, 3, 3, 3, device="cuda")
    args = (x, w, None, [1] * 3, [1] * 3, [0] * 3, [1] * 3, 1, [], [], [])
    OP(*args)  # warm-up outside capture (builds the plan and chooses)
    cu._choices.clear()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            out = OP(*args)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    assert not cu.autotune_choices(), "no timing may happen during stream capture"
    assert torch.allclose(out, reference(*args), rtol=1e-2, atol=1e-2)


# winner: (C_out, kernel, output_padding, opcode after the bias, candidates the autotune times)
_CUDNN_WINNERS = {
    # epilogue pass off: the program runs in PyTorch ops (tests/test_epilogue_pass.py: the pass)
    "cudnn_channels_last": (24, 3, 1, Opcode.RELU, ["fused", "reference",
                                                    "cudnn_channels_last"]),
    # the GAN generator's last layer: 1 channel, kernel 4, stride 2
    "subpixel": (1, 4, 0, Opcode.SIGMOID, ["fused", "reference", "cudnn_channels_last",
                                           "subpixel"]),
}


@pytest.mark.parametrize("winner", sorted(_CUDNN_WINNERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cudnn_candidate_when_it_wins(autotune, monkeypatch, winner, dtype):
    """With the timings rigged so that ``winner`` wins, the autotune keeps that cuDNN
    candidate: output in the reference's layout and dtype, within TF32 / bf16 error of
    float64, cudnn.benchmark left as it was; later calls reuse the choice."""
    cout, k, out_pad, opcode, names = _CUDNN_WINNERS[winner]
    monkeypatch.setattr(cu, "CUDNN_CHANNELS_LAST", True)
    monkeypatch.setattr(cu, "EPILOGUE_PASS", False)
    monkeypatch.setattr(cu, "SUBPIXEL", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    timed = rig_autotune(monkeypatch, winner)
    x = torch.rand(2, 16, 6, 7, 8, device="cuda").to(dtype)
    w = (torch.randn(16, cout, k, k, k, device="cuda") / (16 * k ** 3 / 8) ** 0.5).to(dtype)
    b = torch.randn(cout, device="cuda").to(dtype)
    prog = [int(opcode), 0, -1, -1, -1, -1]
    args = (x, w, b, [2] * 3, [1] * 3, [out_pad] * 3, [1] * 3, 1, prog, [], [])
    out = OP(*args)
    assert timed == [names]
    assert list(cu.autotune_choices().values()) == [winner]
    eager = reference(*args)
    assert out.shape == eager.shape and out.stride() == eager.stride()
    assert out.dtype == eager.dtype
    ref = reference(*[a.double() if torch.is_tensor(a) else a for a in args])
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (2e-3 if dtype == torch.float32 else 2e-2), err
    assert torch.backends.cudnn.benchmark is False
    # the cached choice, no timing (cuDNN's algorithm may not be deterministic: close, not equal)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(OP(*args), out, rtol=tol, atol=tol)
    assert len(timed) == 1  # one _pick_fastest call, none for the cached choice


def test_default_timer_times_equal_bursts_of_short_calls(monkeypatch):
    """With CUDA events (the default timer), candidates far shorter than BURST_MS are timed in
    bursts of back-to-back calls, the same count for each, and the medians (ms per call) are
    kept; the longer candidate loses."""
    x = torch.rand(1 << 12, device="cuda")
    y = torch.rand(1 << 24, device="cuda")
    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1
        x.add_(1.0)

    def long():
        calls["long"] += 1
        y.mul_(1.0).add_(0.0).mul_(1.0)

    assert cu._pick_fastest([("long", long), ("short", short)], reps=5) == "short"
    timed = calls["short"] - 2
    assert timed == calls["long"] - 2 and timed % 5 == 0 and 1 < timed // 5 <= cu._BURST_MAX
    med = cu._last_timings
    assert set(med) == {"short", "long"} and 0 < med["short"] < med["long"]

