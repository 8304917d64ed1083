"""The per-shape autotune of the CUDA op: fused kernel or cuDNN + PyTorch epilogue."""
import pytest
import torch

import ct3d_fx._cuda as cu
from ct3d_fx.ops import Opcode, reference

pytestmark = pytest.mark.cuda
OP = torch.ops.ct3d.conv_transpose3d_epilogue.default


@pytest.fixture
def autotune(monkeypatch):
    monkeypatch.setattr(cu, "AUTOTUNE", True)
    cu._choices.clear()
    yield
    cu._choices.clear()


@pytest.mark.parametrize("cin,cout", [(3, 16), (64, 128)])
def test_autotune_picks_and_caches_a_correct_implementation(autotune, cin, cout):
    x = torch.rand(4, cin, 9, 10, 11, device="cuda")
    w = torch.randn(cin, cout, 3, 3, 3, device="cuda") / (cin * 27) ** 0.5
    b = torch.randn(cout, device="cuda")
    prog = [int(Opcode.RELU), 0, -1, -1, -1, -1]
    args = (x, w, b, [2] * 3, [1] * 3, [1] * 3, [1] * 3, 1, prog, [], [])
    out1 = OP(*args)
    choices = cu.autotune_choices()
    assert len(choices) == 1 and set(choices.values()) <= {"fused", "reference"}
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
