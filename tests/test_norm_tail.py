"""The normalization tail (ct3d_fx/norm_tail.py, csrc/kernels_norm_tail.cu): GroupNorm or
InstanceNorm3d (no running statistics) and the activation after it, after a fused site.

CPU: the spellings the pass folds and those it must leave alone, the report, the optimized
model's values and parameters, gradients, and the reference path ``call`` takes without a GPU.
CUDA: the kernels against a float64 reference (fresh random inputs, the output poisoned with NaN
first) for each dtype and activation, rows shorter and longer than a CTA's chunk, rows that are
not a multiple of the 8-element vector, a large mean, NaN inputs, the inputs that must run the
reference, the autotune, and whole optimized models.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ct3d_fx
from ct3d_fx import Config
from ct3d_fx import norm_tail as nt

from conftest import randn

cuda = pytest.mark.cuda

_TOL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(nt, "POISON_OUTPUT", True)


def _expected(x, groups, weight, bias, eps, act, alpha=0.01):
    """float64 reference: the norm in float64, rounded to x's dtype (what PyTorch
    materializes), then the activation in float64."""
    w = None if weight is None else weight.double().cpu()
    b = None if bias is None else bias.double().cpu()
    y = nt.reference(x.double().cpu(), groups, w, b, eps)
    return nt._act(y.to(x.dtype).double(), act, alpha)


_SHAPES = [  # (shape, groups): S below, at and above a CTA's chunk (8192 float32, 16384 16-bit
    # elements); S % 8 != 0 (scalar loads, a partial last vector)
    ((2, 8, 4, 6, 8), 4),          # S = 192
    ((1, 6, 5, 7, 9), 3),          # S = 315: scalar loads (S % 8 != 0)
    ((2, 4, 16, 16, 32), 2),       # S = 8192: one full float32 chunk
    ((1, 16, 17, 20, 31), 8),      # S = 10540: two float32 chunks, the last partial, scalar
    ((2, 8, 12, 24, 40), None),    # InstanceNorm: 8 groups of 1 channel, S = 11520
    ((1, 32, 8, 8, 8), 1),         # one group of all channels
    ((2, 4, 20, 32, 32), 4),       # S = 20480: 3 float32 / 2 16-bit chunks, the last partial
    ((1, 4, 19, 31, 31), 2),       # S = 18259: 3 / 2 chunks, scalar loads
]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", sorted(nt.ACTIVATIONS, key=str))
@pytest.mark.parametrize("shape,groups", _SHAPES)
def test_kernel_matches_float64(dtype, act, shape, groups, ext, poison):
    seed = sum(shape) + (groups or 0)
    x = randn(*shape, dtype=dtype, seed=seed).cuda()
    c = shape[1]
    w = randn(c, dtype=torch.float32, seed=seed + 1).cuda()
    b = randn(c, dtype=torch.float32, seed=seed + 2).cuda()
    out = nt.run(x, groups, w, b, 1e-5, act, 0.2)
    assert nt.LAST_KERNEL is True
    want = _expected(x, groups, w, b, 1e-5, act, 0.2)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert not torch.isnan(out).any(), "an output element was not written"
    torch.testing.assert_close(out.double().cpu(), want, rtol=_TOL[dtype], atol=_TOL[dtype])


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
def test_affine_parts(dtype, affine, ext, poison):
    x = randn(2, 6, 8, 9, 10, dtype=dtype, seed=11).cuda()
    w = randn(6, dtype=dtype, seed=12).cuda() if affine in ("weight", "both") else None
    b = randn(6, dtype=dtype, seed=13).cuda() if affine in ("bias", "both") else None
    out = nt.run(x, 3, w, b, 1e-3, "silu")
    assert nt.LAST_KERNEL is True
    want = _expected(x, 3, w, b, 1e-3, "silu")
    torch.testing.assert_close(out.double().cpu(), want, rtol=_TOL[dtype], atol=_TOL[dtype])


@cuda
def test_large_mean_and_long_groups(ext, poison):
    """Values far from zero (mean 50, std 0.5) over groups of 4 x 98304 elements: the merged
    statistics must not lose the variance to cancellation."""
    x = (randn(2, 8, 24, 64, 64, dtype=torch.float32, seed=14) * 0.5 + 50.0).cuda()
    out = nt.run(x, 2, None, None, 1e-5, None)
    want = _expected(x, 2, None, None, 1e-5, None)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-4, atol=1e-4)


@cuda
def test_nan_stays_in_its_group(ext, poison):
    x = randn(2, 4, 6, 8, 8, dtype=torch.float32, seed=15).cuda()
    x[1, 2, 3, 4, 5] = float("nan")
    out = nt.run(x, 2, None, None, 1e-5, "relu")
    assert torch.isnan(out[1, 2:]).all()
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, :2]).any()
    want = _expected(x[0:1], 2, None, None, 1e-5, "relu")
    torch.testing.assert_close(out[0:1].double().cpu(), want, rtol=3e-5, atol=3e-5)


@cuda
@pytest.mark.parametrize("what", ["channels_last", "float64", "four_d", "groups_not_dividing"])
def test_inputs_outside_the_kernel_run_the_reference(what, ext):
    x = randn(2, 6, 4, 6, 8, dtype=torch.float32, seed=16).cuda()
    groups = 3
    if what == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    elif what == "float64":
        x = x.double()
    elif what == "four_d":  # (C, D, H, W) read by F.group_norm as (N, C, L): 4 channels
        x, groups = x[0], 2
    elif what == "groups_not_dividing":
        with pytest.raises(RuntimeError):
            nt.run(x, 4, None, None, 1e-5, None)
        assert nt.LAST_KERNEL is False
        return
    out = nt.run(x, groups, None, None, 1e-5, "gelu")
    assert nt.LAST_KERNEL is False
    torch.testing.assert_close(out, nt.reference(x, groups, None, None, 1e-5, "gelu"),
                               rtol=0, atol=0)


@cuda
def test_binding_rejects_bad_arguments(ext):
    x = randn(1, 4, 4, 4, 8, dtype=torch.float32, seed=17).cuda()
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="divisible by groups"):
        ext.norm_tail(x, out, 3, None, None, 1e-5, 0, 0, 0.0)
    with pytest.raises(RuntimeError, match="weight must be a contiguous"):
        ext.norm_tail(x, out, 2, torch.ones(5, device="cuda"), None, 1e-5, 0, 0, 0.0)
    with pytest.raises(RuntimeError, match="output must be contiguous"):
        ext.norm_tail(x, out[:, :2], 2, None, None, 1e-5, 0, 0, 0.0)
    with pytest.raises(RuntimeError, match="launch failed"):
        ext.norm_tail(x, out, 2, None, None, 1e-5, 999, 0, 0.0)  # not an activation


@cuda
def test_autotune_picks_and_remembers(ext, monkeypatch):
    from ct3d_fx import _cuda
    monkeypatch.setattr(_cuda, "AUTOTUNE", True)
    monkeypatch.setattr(nt, "_choices", {})
    monkeypatch.setattr(nt, "_timings", {})
    x = randn(2, 8, 16, 16, 16, dtype=torch.float32, seed=18).cuda()
    out = nt.run(x, 4, None, None, 1e-5, "relu")
    assert list(nt._choices.values())[0] in ("kernel", "reference")
    assert set(list(nt._timings.values())[0]) == {"kernel", "reference"}
    torch.testing.assert_close(out, nt.reference(x, 4, None, None, 1e-5, "relu"),
                               rtol=3e-5, atol=3e-5)
    nt.run(x, 4, None, None, 1e-5, "relu")
    assert len(nt._choices) == 1


# --- the pass (CPU) -------------------------------------------------------------------------

class Net(nn.Module):
    """ConvTranspose3d -> (* 1.5) -> a norm spelled by `norm` -> an activation spelled by
    `act`."""

    def __init__(self, norm: str, act: str = "none"):
        super().__init__()
        self.ct = nn.ConvTranspose3d(3, 8, 3, stride=2, padding=1, output_padding=1)
        self.norm, self.act = norm, act
        self.gn = nn.GroupNorm(4, 8)
        self.gn_plain = nn.GroupNorm(2, 8, affine=False, eps=1e-3)
        self.inorm = nn.InstanceNorm3d(8, affine=True)
        self.inorm_plain = nn.InstanceNorm3d(8)
        self.inorm_running = nn.InstanceNorm3d(8, track_running_stats=True)
        self.gw = nn.Parameter(torch.randn(8))
        self.gb = nn.Parameter(torch.randn(8))
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))
        self.relu = nn.ReLU(inplace=True)
        self.lrelu = nn.LeakyReLU(0.2)
        self.hswish = nn.Hardswish()
        self.gelu = nn.GELU(approximate="tanh")
        with torch.no_grad():  # affine parameters that are not the identity
            for m in (self.gn, self.inorm):
                m.weight.copy_(torch.randn(8))
                m.bias.copy_(torch.randn(8))

    def forward(self, x):
        y = self.ct(x) * 1.5
        n = self.norm
        if n == "gn_module":
            z = self.gn(y)
        elif n == "gn_plain":
            z = self.gn_plain(y)
        elif n == "gn_functional":
            z = F.group_norm(y, 2, self.gw, self.gb, eps=1e-4)
        elif n == "gn_functional_positional":
            z = F.group_norm(y, 8, self.gw, None, 1e-5)
        elif n == "in_module":
            z = self.inorm(y)
        elif n == "in_plain":
            z = self.inorm_plain(y)
        elif n == "in_functional":
            z = F.instance_norm(y, weight=self.gw, bias=self.gb)
        elif n == "in_running":
            z = self.inorm_running(y)
        elif n == "in_functional_running":
            z = F.instance_norm(y, self.rm, self.rv)
        elif n == "not_the_site_output":
            z = self.gn(torch.cat([y[:, :4], y[:, 4:]], 1))
        else:
            raise AssertionError(n)
        a = self.act
        if a == "none":
            return z * 2.0
        if a == "module_relu_inplace":
            return self.relu(z)
        if a == "module_leaky":
            return self.lrelu(z)
        if a == "fn_leaky":
            return F.leaky_relu(z, negative_slope=0.05)
        if a == "module_hardswish":
            return self.hswish(z)
        if a == "fn_hardswish":
            return F.hardswish(z)
        if a == "module_gelu_tanh":
            return self.gelu(z)
        if a == "fn_silu":
            return F.silu(z)
        if a == "method_sigmoid":
            return z.sigmoid()
        if a == "fn_elu":
            return F.elu(z)
        if a == "two_users":
            return torch.relu(z) + z
        raise AssertionError(a)


def _tail_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is nt.call]


def _optimize(net, x, **kw):
    net = net.eval()
    opt = ct3d_fx.optimize(net, x, **kw)
    torch.testing.assert_close(opt(x), net(x), rtol=1e-6, atol=1e-6)
    return opt


@pytest.mark.parametrize("norm,act,groups,want_act,alpha", [
    ("gn_module", "module_relu_inplace", 4, "relu", 0.01),
    ("gn_module", "module_leaky", 4, "leaky_relu", 0.2),
    ("gn_plain", "fn_leaky", 2, "leaky_relu", 0.05),
    ("gn_functional", "module_hardswish", 2, "hardswish", 0.01),
    ("gn_functional_positional", "fn_hardswish", 8, "hardswish", 0.01),
    ("in_module", "module_gelu_tanh", None, "gelu_tanh", 0.01),
    ("in_plain", "fn_silu", None, "silu", 0.01),
    ("in_functional", "method_sigmoid", None, "sigmoid", 0.01),
    ("gn_module", "none", 4, None, 0.01),        # the multiply stays after the tail
    ("gn_module", "fn_elu", 4, None, 0.01),      # not a tail activation: the norm alone
    ("gn_module", "two_users", 4, None, 0.01),   # the norm's result is read twice
])
def test_pass_folds_the_norm_and_its_activation(norm, act, groups, want_act, alpha):
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=1)
    opt = _optimize(Net(norm, act), x)
    calls = _tail_calls(opt)
    assert len(calls) == 1
    args = calls[0].args
    assert args[1] == groups and args[5] == want_act and args[6] == pytest.approx(alpha)
    site = opt.ct3d_report.sites[0]
    assert site.then is not None and "norm tail" in site.then
    assert "norm tail kernels" in str(opt.ct3d_report)


def test_module_parameters_stay_the_same_objects():
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=2)
    net = Net("gn_module", "module_relu_inplace")
    opt = _optimize(net, x)
    assert opt.gn.weight is net.gn.weight and opt.gn.bias is net.gn.bias
    with torch.no_grad():  # a change to the original's parameter shows in the optimized model
        net.gn.bias.add_(1.0)
    torch.testing.assert_close(opt(x), net(x), rtol=1e-6, atol=1e-6)
    assert set(opt.state_dict()) == set(net.state_dict())


@pytest.mark.parametrize("norm", ["in_running", "in_functional_running", "not_the_site_output"])
def test_pass_leaves_other_norms_alone(norm):
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=3)
    opt = _optimize(Net(norm, "module_relu_inplace"), x)
    assert not _tail_calls(opt)
    assert opt.ct3d_report.sites[0].then is None


def test_family_off_leaves_the_norm_alone():
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=4)
    fams = ct3d_fx.patterns.FAMILIES - {"norm_tail"}
    opt = _optimize(Net("gn_module", "module_relu_inplace"), x, config=Config(families=fams))
    assert not _tail_calls(opt)


def test_gradients_flow_through_the_reference_path():
    """With a gradient to record, ``call`` runs PyTorch's ops: the same gradients as the
    original model's, for the input and the norm's parameters."""
    x = randn(2, 3, 4, 5, 6, dtype=torch.float64, seed=5)
    net = Net("gn_functional", "module_leaky").double().eval()
    opt = ct3d_fx.optimize(net, x)
    assert len(_tail_calls(opt)) == 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    opt(xa).square().sum().backward()
    ga = net.gw.grad.clone()
    net.zero_grad()
    net(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ga, net.gw.grad, rtol=1e-10, atol=1e-10)


def test_call_on_the_cpu_is_the_reference():
    x = randn(1, 4, 4, 4, 6, dtype=torch.float32, seed=6)
    w, b = randn(4, dtype=torch.float32, seed=7), randn(4, dtype=torch.float32, seed=8)
    torch.testing.assert_close(nt.call(x, 2, w, b, 1e-5, "leaky_relu", 0.3),
                               F.leaky_relu(F.group_norm(x, 2, w, b, 1e-5), 0.3),
                               rtol=0, atol=0)
    torch.testing.assert_close(nt.call(x, None, None, None, 1e-5, "hardswish"),
                               F.hardswish(F.instance_norm(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        nt.run(x, 2, None, None, 1e-5, "elu")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,act", [("gn_module", "module_relu_inplace"),
                                      ("in_module", "module_leaky")])
def test_optimized_model_runs_the_tail_kernel(dtype, norm, act, ext):
    x = randn(2, 3, 8, 8, 16, dtype=dtype, seed=9).cuda()
    net = Net(norm, act).to(device="cuda", dtype=dtype).eval()
    opt = ct3d_fx.optimize(net, x)
    assert len(_tail_calls(opt)) == 1
    with torch.no_grad():
        got, want = opt(x), net(x)
    assert nt.LAST_KERNEL is True
    tol = 2e-2 if dtype == torch.float32 else 6e-2  # TF32 conv, as the fused site's tests
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
