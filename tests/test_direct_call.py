"""A fused site's direct call of the CUDA implementation (fuse._direct_call_ok, _cuda.run).

Without autograd, tracing or a dispatch mode, a FusedSite calls ``_cuda.run`` itself instead of
going through ``torch.ops.ct3d.conv_transpose3d_epilogue`` (about 40 us less host time per
site). These tests check when it may, and that both routes give the same bits.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import ct3d_fx
from ct3d_fx import _cuda, fuse

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _model_and_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose3d(8, 16, 3, stride=2, padding=1), nn.BatchNorm3d(16),
                          nn.ReLU()).cuda().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 8, 5, 6, 7, device="cuda")


def test_direct_call_conditions():
    conv = nn.ConvTranspose3d(4, 8, 3).cuda()
    x = torch.randn(1, 4, 3, 3, 3, device="cuda")
    with torch.no_grad():
        assert fuse._direct_call_ok(x, conv.weight, conv.bias, [])
        with _Passthrough():
            assert not fuse._direct_call_ok(x, conv.weight, conv.bias, [])
    # parameters that require grad, grad mode on: the op records autograd
    assert not fuse._direct_call_ok(x, conv.weight, conv.bias, [])
    # nothing requires grad: direct even in grad mode
    assert fuse._direct_call_ok(x, conv.weight.detach(), None, [x.new_ones(8)])
    assert not fuse._direct_call_ok(x.cpu(), conv.weight.cpu().detach(), None, [])


def test_direct_call_same_bits_as_the_op(monkeypatch):
    model, x = _model_and_input()
    opt = ct3d_fx.optimize(model, (x,))
    routes = []
    real = fuse._direct_call_ok
    monkeypatch.setattr(fuse, "_direct_call_ok", lambda *a: routes.append(real(*a)) or routes[-1])
    with torch.no_grad():
        direct = opt(x)
    assert routes == [True]
    with torch.no_grad(), _Passthrough():
        via_op = opt(x)
    assert routes == [True, False]
    assert torch.equal(direct, via_op)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(direct, want, rtol=1e-2, atol=1e-2)  # TF32 bar of the sweep
    # with autograd the op runs and the gradient reaches the original parameters
    x.requires_grad_(True)
    opt(x).sum().backward()
    assert routes[-1] is False and model[0].weight.grad is not None
