"""Epilogues that are DAGs, in-place ops, and chains that stop (with the reason in the report)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ct3d_fx
from conftest import anchor_nodes, assert_matches, fused_calls, optimize_checked, randn, \
    randomize_, site_nodes

C = 4
DTYPES = [torch.float64, torch.float32]


class Net(nn.Module):
    """``body(self, up(x), skip)`` with a few parameters and modules to draw on."""

    def __init__(self, body, mods=None):
        super().__init__()
        self.up = nn.ConvTranspose3d(3, C, 2, stride=2)
        self.bias = nn.Parameter(torch.empty(C, 1, 1, 1))
        self.mods = nn.ModuleDict(mods or {})
        self.body = body

    def forward(self, x, skip):
        return self.body(self, self.up(x), skip)


def build(body, mods=None, dtype=torch.float64, train=False):
    m = randomize_(Net(body, mods)).to(dtype)
    m.train(train)
    x = randn(2, 3, 2, 3, 3, dtype=dtype, seed=1)
    skip = randn(2, C, 4, 6, 6, dtype=dtype, seed=2)
    return m, (x, skip)


def l2_20(m, y, s):
    """KernelBench level 2 #20: add a parameter, add, multiply and add the conv output."""
    original = y.clone().detach()
    y = y + m.bias
    y = y + original
    y = y * original
    return y + original


def two_branches(m, y, s):
    a = F.relu(y)
    b = torch.sigmoid(y) * 2.0
    return a * b + y


def shared_intermediate(m, y, s):
    t = y * m.bias - 0.5
    return torch.tanh(t) * t + t


def side_input_twice(m, y, s):
    return (y + s) * s - s


def inplace_chain(m, y, s):
    y = y.mul_(2.0)
    y = F.relu(y, inplace=True)
    y += s                       # traced as operator.add
    return m.mods.act(y)


def inplace_result_unused(m, y, s):
    y.relu_()                   # the result of relu_ is not assigned: y itself changed
    y.mul_(m.bias)
    return y + 1.0


def inplace_after_identity(m, y, s):
    z = m.mods.drop(y)          # eval-mode dropout returns y itself
    z.relu_()
    return z * 3.0


DAGS = [
    ("x*hardswish(x)", lambda m, y, s: y * F.hardswish(y),
     ["ConvTranspose3d", "hardswish", "mul"], None),
    ("x+x.clone().detach()", lambda m, y, s: y + y.clone().detach(),
     ["ConvTranspose3d", "clone", "detach", "add"], None),
    ("x*sigmoid(x)", lambda m, y, s: y * torch.sigmoid(y),
     ["ConvTranspose3d", "sigmoid", "mul"], None),
    ("sigmoid(x)*x", lambda m, y, s: y.sigmoid() * y,
     ["ConvTranspose3d", "sigmoid", "mul"], None),
    ("l2_20", l2_20, ["ConvTranspose3d", "clone", "detach", "add", "add", "mul", "add"], None),
    ("two-branches", two_branches, ["ConvTranspose3d", "relu", "sigmoid", "mul", "mul", "add"],
     None),
    ("shared-intermediate", shared_intermediate,
     ["ConvTranspose3d", "mul", "sub", "tanh", "mul", "add"], None),
    ("side-input-twice", side_input_twice, ["ConvTranspose3d", "add", "mul", "sub"], None),
    ("inplace-chain", inplace_chain, ["ConvTranspose3d", "mul_", "relu", "add", "LeakyReLU"],
     lambda: {"act": nn.LeakyReLU(0.2, inplace=True)}),
    ("inplace-result-unused", inplace_result_unused, ["ConvTranspose3d", "relu_", "mul_", "add"],
     None),
    ("inplace-after-identity", inplace_after_identity,
     ["ConvTranspose3d", "Dropout", "relu_", "mul"], lambda: {"drop": nn.Dropout(0.5)}),
    ("bn-prelu-residual", lambda m, y, s: F.relu(m.mods.pr(m.mods.bn(y)) + s),
     ["ConvTranspose3d", "BatchNorm3d", "PReLU", "add", "relu"],
     lambda: {"bn": nn.BatchNorm3d(C), "pr": nn.PReLU(C)}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DAGS, ids=[c[0] for c in DAGS])
def test_dag_fused_and_equal(case, dtype):
    cid, body, chain, mods = case
    m, inputs = build(body, mods() if mods else None, dtype)
    randomize_(m.mods, seed=4)
    opt = optimize_checked(m, inputs, chain=chain)
    assert_matches(opt, m, inputs, what=cid)
    fresh = (randn(2, 3, 2, 3, 3, dtype=dtype, seed=9), randn(2, C, 4, 6, 6, dtype=dtype, seed=10))
    assert_matches(opt, m, fresh, what=f"{cid} (fresh inputs)")


def test_inplace_alias_of_chain_value_is_not_fused_wrongly():
    """``w = y.detach().relu_()`` also changes ``y``: a later ``w + y`` must see relu(y) twice."""
    def body(m, y, s):
        w = y.detach().relu_()
        return w + y

    m, inputs = build(body)
    opt = ct3d_fx.optimize(m, inputs)
    assert_matches(opt, m, inputs, what="alias")
    site = opt.ct3d_report.sites[0]
    assert "add" not in site.chain, str(opt.ct3d_report)


# --------------------------------------------------------------------------------------------
# Chains that stop, and why
# --------------------------------------------------------------------------------------------
def _stop(body, mods=None, train=False, expect_chain=("ConvTranspose3d",)):
    m, inputs = build(body, mods() if mods else None, train=train)
    randomize_(m.mods, seed=4)
    opt = ct3d_fx.optimize(m, inputs)
    site = opt.ct3d_report.sites[0]
    assert site.status == "fused", str(opt.ct3d_report)
    assert site.chain == list(expect_chain), str(opt.ct3d_report)
    assert len(site_nodes(opt)) == 1 and anchor_nodes(opt) == []
    assert fused_calls(opt, *inputs) == 1
    assert_matches(opt, m, inputs, seed=0)   # reseeded: random dropout draws the same mask
    return site.stop, opt


STOPS = [
    ("softmax", lambda m, y, s: torch.softmax(F.relu(y), dim=2), None, False,
     ["ConvTranspose3d", "relu"], "softmax(dim=2) is not over the channels"),
    ("F.softmax", lambda m, y, s: F.softmax(y * 2, dim=-1), None, False,
     ["ConvTranspose3d", "mul"], "softmax(dim=-1) is not over the channels"),
    ("layer_norm", lambda m, y, s: F.layer_norm(y * 2, (6, 6)), None, False,
     ["ConvTranspose3d", "mul"], "layer_norm over normalized_shape=(6, 6) (2 dims) is not fused"),
    ("layer_norm-last-dim", lambda m, y, s: torch.exp(F.layer_norm(y * 2, (6,))), None, False,
     ["ConvTranspose3d", "mul", "layer_norm"], "exp is elementwise but not supported"),
    ("two-users", lambda m, y, s: (lambda r: r * 2 + r.sum())(F.relu(y)), None, False,
     ["ConvTranspose3d", "relu"], "has 2 users"),
    ("intermediate-used-outside", lambda m, y, s: (lambda t: (torch.tanh(t), t.mean()))(y + 1),
     None, False, ["ConvTranspose3d", "add"], "has 2 users"),
    ("batchnorm-train", lambda m, y, s: F.relu(m.mods.bn(y * 2)),
     lambda: {"bn": nn.BatchNorm3d(C)}, True, ["ConvTranspose3d", "mul"],
     "BatchNorm3d in training mode uses batch statistics"),
    ("batchnorm-no-running-stats", lambda m, y, s: m.mods.bn(y),
     lambda: {"bn": nn.BatchNorm3d(C, track_running_stats=False)}, False, ["ConvTranspose3d"],
     "BatchNorm3d without running statistics"),
    ("F.batch_norm-training", lambda m, y, s: F.batch_norm(y, None, None, training=True), None,
     False, ["ConvTranspose3d"], "batch_norm"),
    ("dropout-train", lambda m, y, s: m.mods.d(F.relu(y)), lambda: {"d": nn.Dropout(0.3)}, True,
     ["ConvTranspose3d", "relu"], "Dropout in training mode is random"),
    ("F.dropout-train", lambda m, y, s: F.dropout(y, 0.3, training=True), None, False,
     ["ConvTranspose3d"], "dropout with training=True is random"),
    ("group-norm", lambda m, y, s: m.mods.gn(y + 1), lambda: {"gn": nn.GroupNorm(2, C)}, False,
     ["ConvTranspose3d", "add"], "GroupNorm is not elementwise"),
    ("F.group_norm", lambda m, y, s: F.group_norm(y, 2), None, False, ["ConvTranspose3d"],
     "group_norm(2) is not elementwise"),
    ("layer-norm", lambda m, y, s: m.mods.ln(y), lambda: {"ln": nn.LayerNorm([6, 6])}, False,
     ["ConvTranspose3d"], "LayerNorm over normalized_shape=(6, 6) (2 dims) is not fused"),
    ("instance-norm", lambda m, y, s: m.mods.n(y), lambda: {"n": nn.InstanceNorm3d(C)}, False,
     ["ConvTranspose3d"], "InstanceNorm3d is not elementwise"),
    ("max-pool", lambda m, y, s: m.mods.p(torch.relu(y)), lambda: {"p": nn.MaxPool3d(2)}, False,
     ["ConvTranspose3d", "relu"], "MaxPool3d is not elementwise"),
    ("F.avg_pool3d", lambda m, y, s: F.avg_pool3d(y, 2), None, False, ["ConvTranspose3d"],
     "avg_pool3d(2) is not elementwise"),
    ("cat", lambda m, y, s: torch.cat([F.relu(y), s], dim=1), None, False,
     ["ConvTranspose3d", "relu"], "cat(dim=1) is not elementwise"),
    ("view", lambda m, y, s: F.relu(y).view(2, -1), None, False, ["ConvTranspose3d", "relu"],
     "view(2, -1) is not elementwise"),
    ("flatten", lambda m, y, s: torch.flatten(y, 1), None, False, ["ConvTranspose3d"],
     "flatten(1) is not elementwise"),
    ("permute", lambda m, y, s: y.permute(0, 2, 3, 4, 1), None, False, ["ConvTranspose3d"],
     "permute(0, 2, 3, 4, 1) is not elementwise"),
    ("sum", lambda m, y, s: y.sum(dim=(2, 3, 4)), None, False, ["ConvTranspose3d"],
     "sum(dim=(2, 3, 4)) is not elementwise"),
    ("exp-unsupported", lambda m, y, s: torch.exp(y * 0.5), None, False,
     ["ConvTranspose3d", "mul"], "exp is elementwise but not supported by the fused kernel"),
    ("pow-3", lambda m, y, s: y ** 3, None, False, ["ConvTranspose3d"],
     "pow(exponent=3) is not supported (only 2)"),
    ("pow-tensor-exponent", lambda m, y, s: 2.0 ** y, None, False, ["ConvTranspose3d"],
     "pow with a tensor exponent"),
    ("div-floor", lambda m, y, s: torch.div(y, 2, rounding_mode="floor"), None, False,
     ["ConvTranspose3d"], "div(rounding_mode='floor') is not true division"),
    ("clamp-tensor", lambda m, y, s: torch.clamp(y, min=m.bias), None, False,
     ["ConvTranspose3d"], "clamp with a tensor min is not supported"),
    ("inplace-on-side-input", lambda m, y, s: s.add_(y), None, False, ["ConvTranspose3d"],
     "in-place add_ mutates 'skip', outside the chain"),
    ("bool-operand", lambda m, y, s: y * True, None, False, ["ConvTranspose3d"],
     "operand other=True is not a tensor or a Python number"),
]


@pytest.mark.parametrize("case", STOPS, ids=[c[0] for c in STOPS])
def test_chain_stops_with_reason(case):
    cid, body, mods, train, chain, reason = case
    stop, opt = _stop(body, mods, train, chain)
    if reason is None:
        assert stop == "the result is a graph output", stop
    else:
        assert stop is not None and reason in stop, f"{cid}: stop reason {stop!r}"
        assert reason in str(opt.ct3d_report)


def test_chain_stops_at_second_conv_and_both_fuse():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ConvTranspose3d(2, 3, 2, stride=2)
            self.b = nn.ConvTranspose3d(3, 2, 3, padding=1)

        def forward(self, x):
            return torch.tanh(self.b(F.relu(self.a(x) - 0.1)))

    m = randomize_(Two()).double().eval()
    x = randn(1, 2, 2, 2, 3)
    opt = optimize_checked(m, (x,), sites=2)
    a, b = opt.ct3d_report.sites
    assert a.chain == ["ConvTranspose3d", "sub", "relu"]
    assert a.stop == "feeds another ConvTranspose3d (b)"
    assert b.chain == ["ConvTranspose3d", "tanh"]
    assert_matches(opt, m, (x,))


FAMILY_STEPS = [
    (set(), ["ConvTranspose3d"], "BatchNorm3d (family 'batch_norm') is disabled"),
    ({"arithmetic"}, ["ConvTranspose3d"], "BatchNorm3d (family 'batch_norm') is disabled"),
    ({"batch_norm"}, ["ConvTranspose3d", "BatchNorm3d"], "ReLU (family 'activation') is disabled"),
    ({"batch_norm", "activation"}, ["ConvTranspose3d", "BatchNorm3d", "ReLU"],
     "mul (family 'arithmetic') is disabled"),
    ({"batch_norm", "activation", "arithmetic"}, ["ConvTranspose3d", "BatchNorm3d", "ReLU", "mul"],
     "side input 'skip' (family 'residual') is disabled"),
    ({"batch_norm", "activation", "arithmetic", "residual"},
     ["ConvTranspose3d", "BatchNorm3d", "ReLU", "mul", "add"],
     "clamp(-1, 1) (family 'clamp') is disabled"),
    ({"batch_norm", "activation", "arithmetic", "residual", "clamp"},
     ["ConvTranspose3d", "BatchNorm3d", "ReLU", "mul", "add", "clamp"],
     "Dropout (family 'dropout') is disabled"),
    ({"batch_norm", "activation", "arithmetic", "residual", "clamp", "dropout"},
     ["ConvTranspose3d", "BatchNorm3d", "ReLU", "mul", "add", "clamp", "Dropout"], None),
]


@pytest.mark.parametrize("families,chain,stop", FAMILY_STEPS,
                         ids=["+".join(sorted(f)) or "none" for f, _, _ in FAMILY_STEPS])
def test_config_families(families, chain, stop):
    def body(m, y, s):
        return m.mods.d(torch.clamp(m.mods.r(m.mods.bn(y)) * m.bias + s, -1, 1))

    m, inputs = build(body, {"bn": nn.BatchNorm3d(C), "r": nn.ReLU(), "d": nn.Dropout()})
    randomize_(m.mods, seed=3)
    opt = optimize_checked(m, inputs, chain=chain, config=ct3d_fx.Config(families=families))
    got = opt.ct3d_report.sites[0].stop
    if stop is None:
        assert got == "the result is a graph output", got
    else:
        assert got is not None and stop in got, got
    assert_matches(opt, m, inputs)


def test_config_families_unknown_is_an_error():
    with pytest.raises(ValueError, match=r"unknown \['activations'\]"):
        ct3d_fx.Config(families={"activations"})


def test_config_filter_fn():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.ConvTranspose3d(2, 3, 2, stride=2), nn.ReLU())
            self.w = nn.Parameter(torch.empty(3, 2, 3, 3, 3))

        def forward(self, x):
            return torch.tanh(F.conv_transpose3d(self.enc(x), self.w, padding=1))

    m = randomize_(Two()).double().eval()
    x = randn(1, 2, 2, 2, 3)
    seen = []

    def keep(module, fqn):
        seen.append((type(module).__name__ if module is not None else None, fqn))
        return module is None

    opt = ct3d_fx.optimize(m, (x,), config=ct3d_fx.Config(filter_fn=keep))
    assert seen == [("ConvTranspose3d", "enc.0"), (None, "conv_transpose3d")]
    enc, fn = opt.ct3d_report.sites
    assert (enc.status, enc.reason) == ("skipped", "Config.filter_fn returned False")
    assert enc.chain == ["ConvTranspose3d"] and enc.implementation == "original (unfused)"
    assert (fn.status, fn.kind, fn.chain) == ("fused", "function", ["conv_transpose3d", "tanh"])
    assert len(site_nodes(opt)) == 1 and len(anchor_nodes(opt)) == 1
    assert fused_calls(opt, x) == 1
    assert_matches(opt, m, (x,))
