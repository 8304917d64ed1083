"""Models that do not trace (optimized through their submodules, in place) and traces that
compute something else (caught by verification)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ct3d_fx
from conftest import assert_matches, fused_calls, randn, randomize_, site_nodes


class Block(nn.Module):
    """Traceable: ConvT -> BN -> ReLU, then a functional ConvT with a Parameter weight."""

    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout),
                                nn.ReLU())
        self.w = nn.Parameter(torch.empty(cout, cout, 3, 3, 3))

    def forward(self, x):
        return torch.tanh(F.conv_transpose3d(self.up(x), self.w, padding=1)) * 0.5


class Picky(nn.Module):
    """Untraceable itself (a loop bound read from a tensor); its child ``inner`` traces."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.ConvTranspose3d(3, 3, 3, padding=1), nn.SiLU())

    def forward(self, x):
        for _ in range(int(x.abs().max() > 0) + 1):
            x = self.inner(x)
        return x


class Untraceable(nn.Module):
    """Data-dependent control flow in the root forward; the root also indexes a Sequential and
    reads an attribute of a child, which must keep working after optimization."""

    def __init__(self):
        super().__init__()
        self.enc = Block(2, 3)
        self.mid = Picky()
        self.head = nn.Sequential(nn.ConvTranspose3d(3, 2, 1), nn.LeakyReLU(0.1))
        self.norm = nn.GroupNorm(1, 2)

    def forward(self, x):
        y = self.enc(x)
        if y.sum() > 0:
            y = self.mid(y)
        else:
            y = -self.mid(-y)
        y = self.head(y) * self.head[0].out_channels
        return self.norm(y)


def make(dtype=torch.float64):
    return randomize_(Untraceable()).to(dtype).eval()


X_SHAPE = (2, 2, 2, 3, 2)


def test_untraceable_root_optimized_through_submodules():
    m = make()
    twin = copy.deepcopy(m)
    keys = list(m.state_dict().keys())
    params = {n: p for n, p in m.named_parameters()}
    objs = {n: mod for n, mod in m.named_modules()}
    x = randn(*X_SHAPE, seed=1)
    opt = ct3d_fx.optimize(m, (x,))
    assert opt is m                                  # optimized in place
    rep = opt.ct3d_report
    untraced = {u["fqn"]: u["reason"] for u in rep.untraced}
    assert set(untraced) == {"<root>", "mid"}, untraced
    assert "control flow" in untraced["<root>"], untraced["<root>"]
    assert "int() argument must be" in untraced["mid"], untraced["mid"]
    sites = {s.fqn: s for s in rep.sites}
    assert set(sites) == {"enc.up.0", "enc.conv_transpose3d", "mid.inner.0", "head.0"}, str(rep)
    assert sites["enc.up.0"].chain == ["ConvTranspose3d", "BatchNorm3d", "ReLU"]
    assert sites["enc.conv_transpose3d"].chain == ["conv_transpose3d", "tanh", "mul"]
    assert sites["mid.inner.0"].chain == ["ConvTranspose3d", "SiLU"]
    assert sites["head.0"].chain == ["ConvTranspose3d", "LeakyReLU"]
    assert all(s.status == "fused" for s in rep.sites), str(rep)
    assert sites["head.0"].input_shape == [2, 3, 4, 6, 4]      # captured submodule inputs
    # every FQN and object kept: same modules, classes, parameters, state_dict keys
    assert list(m.state_dict().keys()) == keys
    assert {n: p for n, p in m.named_parameters()} == params
    assert {n: mod for n, mod in m.named_modules()} == objs
    assert isinstance(m.head, nn.Sequential) and m.head[0].out_channels == 2
    # the optimized graphs run: enc 2 sites, mid.inner 1 (called twice), head 1
    assert fused_calls(m, x) == 5
    assert len(site_nodes(m.enc.forward.__self__)) == 2
    for seed in (1, 2, 3):
        xs = (randn(*X_SHAPE, seed=seed),)
        assert_matches(m, twin, xs, what=f"seed {seed}")
    neg = (-randn(*X_SHAPE, seed=4).abs() * 3,)       # the other branch of the root
    assert_matches(m, twin, neg, what="other branch")


def test_untraceable_report_lists_untraced_parts():
    m = make()
    rep = ct3d_fx.explain(m, (randn(*X_SHAPE),))
    text = str(rep)
    assert "not traced: <root>: TraceError" in text
    assert "not traced: mid: " in text
    assert rep.to_dict()["untraced"][0]["fqn"] == "<root>"
    assert "not traced: <root>" in rep.to_markdown()


def test_untraceable_without_example_inputs():
    m = make()
    twin = copy.deepcopy(m)
    opt = ct3d_fx.optimize(m)
    assert opt is m and opt.ct3d_report.verification is None
    assert opt.ct3d_report.sites[0].input_shape is None
    assert_matches(m, twin, (randn(*X_SHAPE, seed=5),))


def test_untraceable_float32():
    m = make(torch.float32)
    twin = copy.deepcopy(m)
    x = randn(*X_SHAPE, dtype=torch.float32, seed=6)
    ct3d_fx.optimize(m, (x,))
    assert fused_calls(m, x) == 5
    assert_matches(m, twin, (x,))


def test_untraceable_checkpoints_and_train_mode():
    m = make()
    twin = copy.deepcopy(m)
    x = randn(*X_SHAPE, seed=7)
    ct3d_fx.optimize(m, (x,))
    donor = randomize_(Untraceable(), seed=9).double().eval()
    m.load_state_dict(donor.state_dict(), strict=True)
    twin.load_state_dict(donor.state_dict(), strict=True)
    assert_matches(m, twin, (x,), what="after loading a checkpoint")
    fresh = Untraceable().double().eval()
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert_matches(fresh, twin, (x,), what="original class from the optimized checkpoint")
    m.train()
    twin.train()
    torch.testing.assert_close(m(x), twin(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.enc.up[1].running_mean, twin.enc.up[1].running_mean)


def test_explain_does_not_modify_an_untraceable_model():
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    forwards = {n: mod.__dict__.get("forward") for n, mod in m.named_modules()}
    ct3d_fx.explain(m, (randn(*X_SHAPE),))
    assert {n: mod.__dict__.get("forward") for n, mod in m.named_modules()} == forwards
    assert not hasattr(m, "ct3d_report")
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Verification: a trace that computes something else
# --------------------------------------------------------------------------------------------
class Liar(nn.Module):
    """Eager takes the ReLU branch; symbolic tracing sees a Proxy and takes the other."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose3d(2, 3, 2, stride=2)

    def forward(self, x):
        y = self.up(x)
        if isinstance(x, torch.Tensor):
            return F.relu(y)
        return y * 2.0


def test_verification_raises():
    m = randomize_(Liar()).double().eval()
    x = randn(1, 2, 2, 2, 2)
    with pytest.raises(ct3d_fx.VerificationError,
                       match=r"optimized Liar differs from the original on example_inputs: max "
                             r"relative error [0-9.e+-]+ > verify_tol 1e-09"):
        ct3d_fx.optimize(m, (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_verification_keep_original(dtype):
    m = randomize_(Liar()).to(dtype).eval()
    x = randn(1, 2, 2, 2, 2, dtype=dtype)
    cfg = ct3d_fx.Config(on_verify_failure="keep_original")
    res = ct3d_fx.optimize(m, (x,), config=cfg)
    assert res is m and type(res) is Liar
    rep = res.ct3d_report
    site = rep.sites[0]
    assert site.status == "refused" and site.implementation == "original (unfused)"
    assert site.reason.startswith("verification failed: max relative error")
    assert rep.verification["passed"] is False and rep.verification["max_rel_err"] > 0.1
    assert "refused" in str(rep) and "FAILED" in str(rep)
    assert rep.totals()["refused"] == 1 and rep.totals()["fused"] == 0
    torch.testing.assert_close(res(x), F.relu(m.up(x)))


def test_verification_keep_original_restores_untraced_submodules():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.liar = Liar()
            self.ok = nn.Sequential(nn.ConvTranspose3d(3, 2, 1), nn.Tanh())

        def forward(self, x):
            y = self.liar(x)
            if y.mean() > -100:
                y = self.ok(y)
            return y

    m = randomize_(Outer()).double().eval()
    x = randn(1, 2, 2, 2, 2, seed=3)
    with torch.no_grad():
        ref = m(x).clone()
    res = ct3d_fx.optimize(m, (x,), config=ct3d_fx.Config(on_verify_failure="keep_original"))
    assert res is m
    assert "forward" not in m.liar.__dict__ and "forward" not in m.ok.__dict__
    assert {s.status for s in res.ct3d_report.sites} == {"refused"}
    assert fused_calls(m, x) == 0
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    with pytest.raises(ct3d_fx.VerificationError):
        ct3d_fx.optimize(m, (x,))
    assert "forward" not in m.liar.__dict__ and "forward" not in m.ok.__dict__


def test_verification_tolerance_and_switch():
    m = randomize_(Liar()).double().eval()
    x = randn(1, 2, 2, 2, 2)
    opt = ct3d_fx.optimize(m, (x,), config=ct3d_fx.Config(verify_tol=1e9))
    assert opt.ct3d_report.verification["passed"] is True
    opt = ct3d_fx.optimize(m, (x,), config=ct3d_fx.Config(verify=False))
    assert opt.ct3d_report.verification is None
    # an unverified rewrite of a lying trace computes the traced branch: that is what
    # verification is for
    torch.testing.assert_close(opt(x), m.up(x) * 2.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"on_verify_failure": "warn"}, "on_verify_failure must be 'raise' or 'keep_original'"),
    ({"verify_tol": -1.0}, "verify_tol must be >= 0 or None"),
    ({"verify_tol": float("nan")}, "verify_tol must be >= 0 or None"),
    ({"families": {"relu"}}, r"unknown \['relu'\]"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ct3d_fx.Config(**kwargs)


def test_config_is_frozen():
    cfg = ct3d_fx.Config()
    with pytest.raises(Exception):
        cfg.verify = False


def test_verification_with_a_model_that_changes_its_input_in_place():
    """Each run sees fresh copies of the example inputs, which optimize() leaves unchanged."""
    class Mutates(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose3d(2, 2, 2)

        def forward(self, x):
            x.mul_(2.0)
            return torch.relu(self.up(x))

    m = randomize_(Mutates()).double().eval()
    x = randn(1, 2, 2, 2, 2)
    x0 = x.clone()
    opt = ct3d_fx.optimize(m, (x,))
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    assert opt.ct3d_report.verification["passed"] is True
    assert opt.ct3d_report.sites[0].chain == ["ConvTranspose3d", "relu"]
    a, b = x.clone(), x.clone()
    torch.testing.assert_close(opt(a), m(b), rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
