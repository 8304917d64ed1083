"""Parameters and buffers stay the original objects: tied, checkpoints load both ways, and the
optimized model computes with their current values (BatchNorm statistics, optimizer steps),
in eval and in training mode."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ct3d_fx
from conftest import assert_matches, fused_calls, optimize_checked, randn, randomize_


class Decoder(nn.Module):
    """ConvT -> BN -> ReLU; ConvT -> BN -> PReLU -> Dropout, scaled, shifted, residual adds;
    a functional ConvT with a Parameter weight; a final ConvT -> tanh."""

    def __init__(self):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose3d(4, 3, 2, stride=2), nn.BatchNorm3d(3),
                                nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(nn.ConvTranspose3d(3, 3, 3, padding=1), nn.BatchNorm3d(3),
                                 nn.PReLU(3), nn.Dropout(0.25))
        self.scale = nn.Parameter(torch.empty(3, 1, 1, 1))
        self.register_buffer("shift", torch.empty(3))
        self.w = nn.Parameter(torch.empty(3, 3, 1, 1, 1))
        self.final = nn.ConvTranspose3d(3, 2, 2, stride=2, bias=False)

    def forward(self, x, skip):
        y = self.up(x)
        z = self.up2(y) * self.scale + self.shift.view(1, -1, 1, 1, 1) + skip
        z = F.conv_transpose3d(z + y, self.w) - 0.25
        return torch.tanh(self.final(z))


def make(seed=0, dtype=torch.float64, train=False):
    m = randomize_(Decoder(), seed).to(dtype)
    return m.train(train)


def inputs(dtype=torch.float64, seed=1):
    return (randn(2, 4, 2, 2, 3, dtype=dtype, seed=seed),
            randn(2, 3, 4, 4, 6, dtype=dtype, seed=seed + 1))


CHAINS = [["ConvTranspose3d", "BatchNorm3d", "ReLU"],
          ["ConvTranspose3d", "BatchNorm3d", "PReLU", "Dropout", "mul", "add", "add", "add"],
          ["conv_transpose3d", "sub"],
          ["ConvTranspose3d", "tanh"]]


@pytest.fixture
def pair():
    m = make()
    xs = inputs()
    opt = optimize_checked(m, xs, sites=4)
    assert [s.chain for s in opt.ct3d_report.sites] == CHAINS, str(opt.ct3d_report)
    return m, opt, xs


def test_parameters_and_buffers_are_the_same_objects(pair):
    m, opt, _ = pair
    assert opt.get_parameter("up.0.weight") is m.up[0].weight
    assert opt.up is m.up and opt.up[1] is m.up[1] and opt.final is m.final
    for name, p in m.named_parameters():
        assert opt.get_parameter(name) is p, name
    for name, b in m.named_buffers():
        assert opt.get_buffer(name) is b, name
    assert [n for n, _ in opt.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert [n for n, _ in opt.named_buffers()] == [n for n, _ in m.named_buffers()]


def test_state_dict_keys_equal(pair):
    m, opt, _ = pair
    keys = list(m.state_dict().keys())
    assert list(opt.state_dict().keys()) == keys
    assert "up.1.num_batches_tracked" in keys and "up2.1.num_batches_tracked" in keys
    sd, osd = m.state_dict(), opt.state_dict()
    for k in keys:
        assert osd[k].data_ptr() == sd[k].data_ptr(), k


def test_original_checkpoint_loads_into_optimized(pair):
    m, opt, xs = pair
    donor = make(seed=7)
    missing = opt.load_state_dict(donor.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert_matches(opt, donor, xs, what="after loading the donor's checkpoint")
    assert fused_calls(opt, *xs) == 4


def test_optimized_checkpoint_loads_into_original_class(pair):
    m, opt, xs = pair
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = make(seed=3)
    fresh.load_state_dict(torch.load(buf), strict=True)
    assert_matches(opt, fresh, xs, what="original class loaded from the optimized checkpoint")


def test_checkpoint_round_trip_through_file(pair, tmp_path):
    m, opt, xs = pair
    path = tmp_path / "ckpt.pt"
    torch.save(make(seed=11).state_dict(), path)
    opt.load_state_dict(torch.load(path), strict=True)
    assert_matches(opt, m, xs)          # shared parameters: the original follows too
    twin = make(seed=5)
    twin.load_state_dict(torch.load(path), strict=True)
    assert_matches(opt, twin, xs)


@pytest.mark.parametrize("change", ["running_mean", "running_var", "weight", "bias",
                                    "replace_running_mean", "prelu", "scale", "shift",
                                    "replace_shift", "w"])
def test_live_values_after_optimize(pair, change):
    m, opt, xs = pair
    with torch.no_grad():
        before = opt(*xs).clone()
        bn = m.up[1]
        if change == "running_mean":
            bn.running_mean.add_(0.5)
        elif change == "running_var":
            bn.running_var.mul_(3.0)
        elif change == "weight":
            bn.weight.mul_(-2.0)
        elif change == "bias":
            bn.bias.add_(1.0)
        elif change == "replace_running_mean":
            bn.running_mean = randn(3, seed=4)
        elif change == "prelu":
            m.up2[2].weight.mul_(-3.0)
        elif change == "scale":
            m.scale.mul_(2.5)
        elif change == "shift":
            m.shift.add_(1.5)     # a buffer read through .view(): must not be frozen
        elif change == "replace_shift":
            m.shift = randn(3, seed=6)
        elif change == "w":
            m.w.mul_(-1.0)
    with torch.no_grad():
        after = opt(*xs)
    assert (after - before).abs().max() > 1e-3, f"changing {change} did not change the output"
    assert_matches(opt, m, xs, what=change)
    assert fused_calls(opt, *xs) == 4


def test_optimizer_step_on_original_parameters(pair):
    m, opt, xs = pair
    with torch.no_grad():
        before = opt(*xs).clone()
    sgd = torch.optim.SGD(m.parameters(), lr=0.5)
    loss = (m(*xs) ** 2).mean()
    loss.backward()
    sgd.step()
    with torch.no_grad():
        after = opt(*xs)
    assert (after - before).abs().max() > 1e-4
    assert_matches(opt, m, xs, what="after an SGD step")


def test_gradients_through_optimized_equal_original(pair):
    m, opt, xs = pair
    twin = copy.deepcopy(m)
    xa = tuple(t.clone().requires_grad_() for t in xs)
    xb = tuple(t.clone().requires_grad_() for t in xs)
    (opt(*xa) * randn(2, 2, 8, 8, 12, seed=5)).sum().backward()
    (twin(*xb) * randn(2, 2, 8, 8, 12, seed=5)).sum().backward()
    for (name, p), q in zip(m.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda s: f"grad of {name}: {s}")
    for a, b in zip(xa, xb):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_train_eval_switching(dtype):
    m = make(dtype=dtype)
    xs = inputs(dtype)
    twin = copy.deepcopy(m)
    opt = optimize_checked(m, xs, sites=4)
    assert opt.ct3d_report.sites[1].chain == CHAINS[1]
    # training mode: BatchNorm uses and updates batch statistics, Dropout draws a mask
    opt.train()
    assert opt.training and m.up[1].training and m.up2[3].training   # shared submodules
    twin.train()
    for step in range(3):
        x = inputs(dtype, seed=20 + step)
        torch.manual_seed(step)
        got = opt(*x)
        torch.manual_seed(step)
        want = twin(*x)
        torch.testing.assert_close(got, want, rtol=1e-12 if dtype == torch.float64 else 1e-5,
                                   atol=1e-12 if dtype == torch.float64 else 1e-5)
        for k, v in _bn_state(twin).items():
            torch.testing.assert_close(_bn_state(m)[k], v, msg=lambda s: f"{k}: {s}")
    assert int(m.up[1].num_batches_tracked) == 3
    # the two BatchNorm sites run unfused in training mode, the other two stay fused
    assert fused_calls(opt, *xs) == 2
    twin(*xs)                              # the same fourth training step for the twin
    # back to eval: fused again, with the statistics training produced
    opt.eval()
    twin.eval()
    assert not opt.training and not m.up[1].training
    assert fused_calls(opt, *xs) == 4
    assert_matches(opt, twin, xs, what="eval after training")


def test_optimized_in_training_mode():
    """BatchNorm in training mode ends the chain at optimize time; both modes still match."""
    m = make(train=True)
    xs = inputs()
    twin = copy.deepcopy(m)
    opt = ct3d_fx.optimize(m, xs)
    rep = opt.ct3d_report
    assert [s.chain for s in rep.sites] == [["ConvTranspose3d"], ["ConvTranspose3d"],
                                           ["conv_transpose3d", "sub"],
                                           ["ConvTranspose3d", "tanh"]], str(rep)
    assert rep.sites[0].stop == "BatchNorm3d in training mode uses batch statistics"
    # verification ran on copies of the statistics: nothing changed in the model
    assert int(m.up[1].num_batches_tracked) == 0
    torch.testing.assert_close(m.up[1].running_mean, twin.up[1].running_mean, rtol=0, atol=0)
    torch.manual_seed(1)
    got = opt(*xs)
    torch.manual_seed(1)
    torch.testing.assert_close(got, twin(*xs), rtol=1e-12, atol=1e-12)
    opt.eval()
    twin.eval()
    assert_matches(opt, twin, xs)


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ConvTranspose3d(2, 2, 3, padding=1)
            self.b = nn.ConvTranspose3d(2, 2, 3, padding=1)
            self.b.weight = self.a.weight

        def forward(self, x):
            return F.silu(self.b(torch.relu(self.a(x))))

    m = randomize_(Tied()).double().eval()
    x = randn(1, 2, 2, 3, 3)
    opt = optimize_checked(m, (x,), sites=2)
    assert opt.get_parameter("a.weight") is opt.get_parameter("b.weight") is m.a.weight
    assert list(opt.state_dict().keys()) == list(m.state_dict().keys())
    with torch.no_grad():
        m.a.weight.mul_(-1.0)
    assert_matches(opt, m, (x,))


def test_model_is_not_modified_by_optimize():
    m = make()
    xs = inputs()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    mods = dict(m.named_modules())
    with torch.no_grad():
        ref = m(*xs).clone()
    opt = ct3d_fx.optimize(m, xs)
    assert opt is not m
    assert dict(m.named_modules()) == mods
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=lambda s: f"{k}: {s}")
    with torch.no_grad():
        torch.testing.assert_close(m(*xs), ref, rtol=0, atol=0)


def test_deepcopy_is_independent_and_keeps_everything(pair):
    m, opt, xs = pair
    dup = copy.deepcopy(opt)
    assert list(dup.state_dict().keys()) == list(opt.state_dict().keys())
    assert_matches(dup, m, xs, what="deepcopy")
    with torch.no_grad():
        dup.get_parameter("up.0.weight").mul_(-1.0)
        dup.get_buffer("up.1.running_mean").add_(1.0)
    assert_matches(opt, m, xs, what="original after changing the copy")
    dup.train()
    assert not m.up[1].training                 # the copy's modules are its own
    assert fused_calls(opt, *xs) == 4


def test_dtype_conversion_keeps_sharing(pair):
    m, opt, xs = pair
    opt.float()
    assert m.up[0].weight.dtype == torch.float32 and m.shift.dtype == torch.float32
    assert opt.get_buffer("shift") is m.shift
    assert opt.get_parameter("up.0.weight") is m.up[0].weight
    xs32 = tuple(t.float() for t in xs)
    assert fused_calls(opt, *xs32) == 4
    assert_matches(opt, m, xs32, what="after opt.float()")


class _DetachModel(nn.Module):
    """The suite's l2_20 pattern: conv output reused through detach (no gradient there)."""

    def __init__(self):
        super().__init__()
        self.ct = nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.p = nn.Parameter(torch.randn(6, 1, 1, 1))

    def forward(self, x):
        y = self.ct(x)
        c = y.detach()
        z = (y + self.p + c) * c + c
        return z * torch.sigmoid(z).detach()


def test_gradients_respect_detach_inside_the_fused_chain():
    torch.manual_seed(0)
    m = _DetachModel().double()
    x = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    opt = ct3d_fx.optimize(m, (x,))
    assert opt.ct3d_report.sites[0].chain.count("detach") == 2
    gy = torch.randn_like(m(x))
    want = torch.autograd.grad(m(x), [x, *m.parameters()], gy)
    got = torch.autograd.grad(opt(x), [x, *m.parameters()], gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# LayerNorm: its weight and bias arrive at the fused op as the module's own Parameters
# --------------------------------------------------------------------------------------------
class _LNDecoder(nn.Module):
    """ConvT(4, 6, k3, stride 2) -> LayerNorm(W = 10) -> GELU; a second ConvT -> F.layer_norm
    with a Parameter weight and a buffer bias of the root module."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.ln = nn.LayerNorm(10)
        self.up2 = nn.ConvTranspose3d(6, 2, 3, padding=1)
        self.w2 = nn.Parameter(torch.empty(10))
        self.register_buffer("b2", torch.empty(10))

    def forward(self, x):
        y = F.gelu(self.ln(self.up(x)))
        return F.layer_norm(self.up2(y), (10,), self.w2, self.b2, 1e-4) * 2.0


def _ln_pair():
    m = randomize_(_LNDecoder(), seed=21).double().eval()
    x = randn(2, 4, 3, 4, 5, seed=22)
    opt = optimize_checked(m, (x,), sites=2)
    assert [s.chain for s in opt.ct3d_report.sites] == [
        ["ConvTranspose3d", "LayerNorm", "gelu"], ["ConvTranspose3d", "layer_norm", "mul"]]
    return m, opt, x


def test_layer_norm_parameters_are_the_same_objects():
    m, opt, x = _ln_pair()
    assert opt.ln is m.ln and opt.get_parameter("ln.weight") is m.ln.weight
    assert opt.get_parameter("ln.bias") is m.ln.bias and opt.get_parameter("w2") is m.w2
    assert opt.get_buffer("b2") is m.b2
    assert list(opt.state_dict().keys()) == list(m.state_dict().keys())
    # the sites read them through get_attr nodes of the original FQNs
    attrs = {n.target for n in opt.graph.nodes if n.op == "get_attr"}
    assert {"ln.weight", "ln.bias", "w2", "b2"} <= attrs, opt.code
    # encoded as LAYER_NORM(v0, t0, t1, eps, 10): weight and bias are the site's extras 0 and 1
    for site, eps in zip(opt.ct3d_report.sites, (1e-5, 1e-4)):
        ln = site.program[:6]
        assert ln[:4] == [42, 0, 0, 1] and ln[5] == 10, site.program
        assert site.scalars[ln[4]] == eps


@pytest.mark.parametrize("change", ["ln.weight", "ln.bias", "w2", "b2", "replace_b2"])
def test_layer_norm_live_values_after_optimize(change):
    m, opt, x = _ln_pair()
    with torch.no_grad():
        before = opt(x).clone()
        if change == "replace_b2":
            m.b2 = randn(10, seed=23)
        else:
            t = m.get_parameter(change) if change != "b2" else m.b2
            t.mul_(-2.0).add_(0.5)
    with torch.no_grad():
        after = opt(x)
    assert (after - before).abs().max() > 1e-3, f"changing {change} did not change the output"
    assert_matches(opt, m, (x,), what=change)
    assert fused_calls(opt, x) == 2


def test_layer_norm_optimizer_step_and_checkpoint():
    m, opt, x = _ln_pair()
    twin = copy.deepcopy(m)
    sgd = torch.optim.SGD(m.parameters(), lr=0.5)
    sgd_twin = torch.optim.SGD(twin.parameters(), lr=0.5)
    gy = randn(2, 2, 6, 8, 10, seed=24)
    (opt(x) * gy).sum().backward()         # the optimized module trains the original's Parameters
    (twin(x) * gy).sum().backward()
    for (name, p), q in zip(m.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda s: f"grad of {name}: {s}")
    sgd.step()
    sgd_twin.step()
    assert_matches(opt, twin, (x,), what="after an SGD step")
    donor = randomize_(_LNDecoder(), seed=25).double()
    opt.load_state_dict(donor.state_dict(), strict=True)
    assert_matches(opt, donor.eval(), (x,), what="after loading a checkpoint")
