"""torch.compile over an optimized model on the CPU: one graph with the fused op, eager results."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import ct3d_fx
from conftest import randn, randomize_

OP = torch.ops.ct3d.conv_transpose3d_epilogue

# raised inside torch while compiling, not by this package
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose3d(3, 4, 2, stride=2), nn.BatchNorm3d(4),
                                nn.ReLU())
        self.final = nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1)

    def forward(self, x, skip):
        y = self.up(x) + skip
        return torch.tanh(self.final(y, output_size=[2, 2, 7, 11, 12]))


def make(dtype):
    m = randomize_(Net()).to(dtype).eval()
    xs = (randn(2, 3, 2, 3, 3, dtype=dtype), randn(2, 4, 4, 6, 6, dtype=dtype, seed=2))
    return m, xs, ct3d_fx.optimize(m, xs)


def test_compile_captures_one_graph_with_the_fused_op():
    m, xs, opt = make(torch.float64)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(opt, backend=record, fullgraph=True)
    with torch.no_grad():
        out = compiled(*xs)
        ref = m(*xs)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(graphs) == 1
    ops = [n for n in graphs[0].graph.nodes
           if n.op == "call_function" and n.target in (OP, OP.default)]
    assert len(ops) == 2, graphs[0].code
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_compile_inductor_matches_eager(dtype):
    m, xs, opt = make(dtype)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(opt, fullgraph=True)
    with torch.no_grad():
        for seed in (3, 4):
            ins = (randn(2, 3, 2, 3, 3, dtype=dtype, seed=seed),
                   randn(2, 4, 4, 6, 6, dtype=dtype, seed=seed + 10))
            torch.testing.assert_close(compiled(*ins), opt(*ins), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(*ins), m(*ins), rtol=1e-5, atol=1e-5)
        # live statistics under compile too: the BatchNorm buffers are graph inputs
        m.up[1].running_mean.add_(0.25)
        torch.testing.assert_close(compiled(*xs), m(*xs), rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
