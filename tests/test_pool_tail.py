"""The pooled tail (ct3d_fx/pool_tail.py, csrc/kernels_pool_tail.cu): avg_pool3d or max_pool3d
with kernel == stride and the activation after it, after a fused site.

CPU: the spellings the pass folds and those it must leave alone, the report, the optimized
model's values, and the reference path ``call`` takes without a GPU.
CUDA: the kernel against a float64 reference (fresh random inputs, the output poisoned with NaN
first) for each dtype, activation and window, sizes that do not divide by the window, NaN
inputs, the inputs that must run the reference, and a whole optimized model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ct3d_fx
from ct3d_fx import Config
from ct3d_fx import pool_tail as pt

from conftest import randn

cuda = pytest.mark.cuda

_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(pt, "POISON_OUTPUT", True)


def _expected(x: torch.Tensor, kernel, act, mode="avg") -> torch.Tensor:
    """float64 reference: the pool in float64, rounded to x's dtype (what PyTorch
    materializes), then the activation in float64."""
    pool = F.avg_pool3d if mode == "avg" else F.max_pool3d
    pooled = pool(x.double(), tuple(kernel)).to(x.dtype).double()
    return pt._act(pooled, act)


@cuda
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", sorted(pt.ACTIVATIONS, key=str))
@pytest.mark.parametrize("kernel,shape", [
    ((2, 2, 2), (2, 3, 8, 10, 12)),
    ((2, 2, 2), (1, 5, 7, 9, 11)),      # odd sizes: floor mode drops the last plane/row/column
    ((1, 2, 3), (2, 4, 5, 6, 13)),
    ((3, 3, 3), (1, 2, 9, 7, 8)),
    ((8, 1, 4), (1, 3, 17, 3, 33)),
])
def test_kernel_matches_float64(mode, dtype, act, kernel, shape, ext, poison):
    x = randn(*shape, dtype=dtype, seed=sum(shape)).cuda()
    out = pt.run(x, kernel, act, mode)
    assert pt.LAST_KERNEL is True
    want = _expected(x.cpu(), kernel, act, mode)
    assert out.shape == want.shape and out.dtype == dtype and out.is_contiguous()
    assert not torch.isnan(out).any(), "an output element was not written"
    torch.testing.assert_close(out.double().cpu(), want, rtol=_TOL[dtype], atol=_TOL[dtype])


@cuda
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("where", [0, 7, 3])  # the NaN first, last, or in between in the window
def test_kernel_propagates_nan(mode, where, ext, poison):
    x = randn(1, 2, 4, 4, 4, dtype=torch.float32, seed=3).cuda()
    x[0, 1, 2 + (where >> 2), 0 + ((where >> 1) & 1), 2 + (where & 1)] = float("nan")
    out = pt.run(x, (2, 2, 2), "relu", mode)
    assert pt.LAST_KERNEL is True
    assert torch.isnan(out[0, 1, 1, 0, 1]) and torch.isnan(out).sum() == 1
    torch.testing.assert_close(out, pt.reference(x, (2, 2, 2), "relu", mode), equal_nan=True,
                               rtol=2e-6, atol=2e-6)


@cuda
def test_max_of_an_all_minus_inf_window(ext, poison):
    x = randn(1, 1, 2, 2, 4, dtype=torch.bfloat16, seed=4).cuda()
    x[..., :2] = float("-inf")
    out = pt.run(x, (2, 2, 2), None, "max")
    assert pt.LAST_KERNEL is True and out[0, 0, 0, 0, 0] == float("-inf")
    torch.testing.assert_close(out, F.max_pool3d(x, 2), rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("what", ["channels_last", "float64", "window_9", "window_too_big"])
def test_inputs_outside_the_kernel_run_the_reference(what, ext):
    x = randn(2, 3, 10, 9, 18, dtype=torch.float32, seed=5).cuda()
    kernel = (2, 2, 2)
    if what == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif what == "float64":
        x = x.double()
    elif what == "window_9":
        kernel = (1, 1, 9)
    elif what == "window_too_big":
        kernel = (11, 1, 1)
    if what == "window_too_big":
        with pytest.raises(RuntimeError):
            pt.run(x, kernel, "gelu")
        return
    out = pt.run(x, kernel, "gelu")
    assert pt.LAST_KERNEL is False
    torch.testing.assert_close(out, pt.reference(x, kernel, "gelu"), rtol=0, atol=0)


@cuda
def test_autotune_picks_and_remembers(ext, monkeypatch):
    from ct3d_fx import _cuda
    monkeypatch.setattr(_cuda, "AUTOTUNE", True)
    monkeypatch.setattr(pt, "_choices", {})
    monkeypatch.setattr(pt, "_timings", {})
    x = randn(2, 8, 16, 16, 16, dtype=torch.float32, seed=9).cuda()
    out = pt.run(x, (2, 2, 2), "gelu")
    assert list(pt._choices.values())[0] in ("kernel", "reference")
    assert set(list(pt._timings.values())[0]) == {"kernel", "reference"}
    torch.testing.assert_close(out, pt.reference(x, (2, 2, 2), "gelu"), rtol=2e-6, atol=2e-6)
    pt.run(x, (2, 2, 2), "gelu")
    assert len(pt._choices) == 1


# --- the pass (CPU) -------------------------------------------------------------------------

class Net(nn.Module):
    """ConvTranspose3d -> (+ 0.5) -> a pool spelled by `pool` -> an activation spelled by `act`."""

    def __init__(self, pool: str, act: str = "none"):
        super().__init__()
        self.ct = nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.pool, self.act = pool, act
        self.avg2 = nn.AvgPool3d(2)
        self.avg_other = {
            "module_stride_differs": nn.AvgPool3d(3, stride=2),
            "module_padding": nn.AvgPool3d(2, padding=1),
            "module_ceil": nn.AvgPool3d(2, ceil_mode=True),
            "module_divisor": nn.AvgPool3d(2, divisor_override=3),
            "module_window_9": nn.AvgPool3d((1, 1, 9)),
            "max_module": nn.MaxPool3d(2),
            "max_module_stride_differs": nn.MaxPool3d(2, stride=1),
            "max_module_dilation": nn.MaxPool3d(2, dilation=2),
            "max_module_ceil": nn.MaxPool3d(2, ceil_mode=True),
            "max_module_padding": nn.MaxPool3d(2, padding=1),
        }.get(pool)
        self.gelu = nn.GELU(approximate="tanh")
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.ct(x) + 0.5
        p = self.pool
        if p == "module":
            z = self.avg2(y)
        elif p == "functional":
            z = F.avg_pool3d(y, 2)
        elif p == "functional_kwargs":
            z = F.avg_pool3d(y, kernel_size=(1, 2, 2), stride=(1, 2, 2), padding=0)
        elif p == "functional_stride_differs":
            z = F.avg_pool3d(y, 2, stride=1)
        elif p == "max_functional":
            z = F.max_pool3d(y, (2, 1, 2))
        elif p == "max_torch":
            z = torch.max_pool3d(y, 2)
        elif p == "max_functional_indices":
            z, _ = F.max_pool3d(y, 2, return_indices=True)
        elif p == "not_the_site_output":
            z = F.avg_pool3d(torch.cat([y, y], 1), 2)
        else:
            z = self.avg_other(y)
        a = self.act
        if a == "none":
            return z * 2.0
        if a == "module_gelu_tanh":
            return self.gelu(z)
        if a == "module_relu_inplace":
            return self.relu(z)
        if a == "fn_gelu":
            return F.gelu(z)
        if a == "fn_silu":
            return F.silu(z)
        if a == "torch_sigmoid":
            return torch.sigmoid(z)
        if a == "method_tanh":
            return z.tanh()
        if a == "leaky_relu":
            return F.leaky_relu(z, 0.1)
        if a == "two_users":
            return torch.relu(z) + z
        raise AssertionError(a)


def _tail_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is pt.call]


def _optimize(net, x, **kw):
    net = net.eval()
    torch.manual_seed(0)
    opt = ct3d_fx.optimize(net, x, **kw)
    torch.testing.assert_close(opt(x), net(x), rtol=0, atol=0)
    return opt


@pytest.mark.parametrize("pool,act,kernel,want_act,mode", [
    ("max_module", "fn_gelu", (2, 2, 2), "gelu", "max"),
    ("max_functional", "none", (2, 1, 2), None, "max"),
    ("max_torch", "method_tanh", (2, 2, 2), "tanh", "max"),
] + [c + ("avg",) for c in [
    ("module", "module_gelu_tanh", (2, 2, 2), "gelu_tanh"),
    ("module", "module_relu_inplace", (2, 2, 2), "relu"),
    ("functional", "fn_gelu", (2, 2, 2), "gelu"),
    ("functional", "fn_silu", (2, 2, 2), "silu"),
    ("functional_kwargs", "torch_sigmoid", (1, 2, 2), "sigmoid"),
    ("module", "method_tanh", (2, 2, 2), "tanh"),
    ("module", "none", (2, 2, 2), None),          # the multiply stays after the tail
    ("functional", "leaky_relu", (2, 2, 2), None),  # not a tail activation: pool alone
    ("module", "two_users", (2, 2, 2), None),     # the pool's result is read twice
]])
def test_pass_folds_the_pool_and_its_activation(pool, act, kernel, want_act, mode):
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=1)
    opt = _optimize(Net(pool, act), x)
    calls = _tail_calls(opt)
    assert len(calls) == 1
    assert calls[0].args[1:] == (kernel, want_act, mode)
    site = opt.ct3d_report.sites[0]
    assert site.then is not None and "pooled tail" in site.then
    assert "pooled tail kernel" in str(opt.ct3d_report)


@pytest.mark.parametrize("pool", ["module_stride_differs", "module_padding", "module_ceil",
                                  "module_divisor", "module_window_9",
                                  "functional_stride_differs", "not_the_site_output",
                                  "max_module_stride_differs", "max_module_dilation",
                                  "max_module_ceil", "max_module_padding",
                                  "max_functional_indices"])
def test_pass_leaves_other_pools_alone(pool):
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=2)
    opt = _optimize(Net(pool, "fn_gelu"), x)
    assert not _tail_calls(opt)
    assert opt.ct3d_report.sites[0].then is None


def test_family_off_leaves_the_pool_alone():
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=3)
    fams = ct3d_fx.patterns.FAMILIES - {"pool_tail"}
    opt = _optimize(Net("module", "fn_gelu"), x, config=Config(families=fams))
    assert not _tail_calls(opt)


def test_gradients_flow_through_the_reference_path():
    """With a gradient to record, ``call`` runs PyTorch's ops: the same gradients as the
    original model's."""
    x = randn(2, 3, 4, 5, 6, dtype=torch.float64, seed=4)
    net = Net("functional", "fn_gelu").double().eval()
    opt = ct3d_fx.optimize(net, x)
    assert len(_tail_calls(opt)) == 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    opt(xa).square().sum().backward()
    net(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)


def test_call_on_the_cpu_is_the_reference():
    x = randn(1, 2, 4, 4, 6, dtype=torch.float32, seed=5)
    torch.testing.assert_close(pt.call(x, (2, 2, 3), "silu"),
                               F.silu(F.avg_pool3d(x, (2, 2, 3))), rtol=0, atol=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        pt.reference(x, (2, 2, 2), "elu")
    torch.testing.assert_close(pt.call(x, (2, 2, 3), "relu", "max"),
                               torch.relu(F.max_pool3d(x, (2, 2, 3))), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode must be"):
        pt.call(x, (2, 2, 2), None, "min")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimized_model_runs_the_tail_kernel(dtype, ext):
    x = randn(2, 3, 8, 8, 16, dtype=dtype, seed=6).cuda()
    net = Net("module", "fn_gelu").to(device="cuda", dtype=dtype).eval()
    opt = ct3d_fx.optimize(net, x)
    assert len(_tail_calls(opt)) == 1
    with torch.no_grad():
        got, want = opt(x), net(x)
    assert pt.LAST_KERNEL is True
    tol = 1e-2 if dtype == torch.float32 else 5e-2  # TF32 conv, as the fused site's tests
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
