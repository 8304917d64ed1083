"""ct3d::spatial_softmax (softmax over the positions of each (n, c), times a per-channel weight)
and the pass that puts it after a fused site.

CPU: the pattern spellings the pass recognizes and those it must leave alone, the op's schema,
fake and autograd registrations (opcheck), gradients against float64 finite differences.
CUDA: the kernel against a float64 reference (fresh random inputs, outputs poisoned with NaN),
every dtype pair, row lengths that do and do not take 16-byte vectors, one and many chunks a
row, NaN and -inf rows, the cases that must run the reference, and a whole optimized model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ct3d_fx
from ct3d_fx import Config
from ct3d_fx import spatial_softmax as ss
from ct3d_fx.fuse import _spatial_softmax_call

from conftest import randn

OP = torch.ops.ct3d.spatial_softmax.default


def _count_tail_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_function" and n.target is _spatial_softmax_call)


class Head(nn.Module):
    """ConvTranspose3d -> clamp -> spatial softmax (spelled by `form`) [-> * weight]."""

    def __init__(self, form: str, weight: str = "param", log: bool = False, cin=3, cout=4):
        super().__init__()
        self.ct = nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        self.form, self.weight, self.log = form, weight, log
        self.p = nn.Parameter(randn(1, cout, 1, 1, 1, dtype=torch.float32, seed=7))
        self.sm = nn.LogSoftmax(dim=2) if log else nn.Softmax(dim=2)

    def forward(self, x):
        y = torch.clamp(self.ct(x), min=-0.5, max=2.0)
        f = F.log_softmax if self.log else F.softmax
        if self.form == "view_getitem":
            shape = y.shape
            z = f(y.view(shape[0], shape[1], -1), dim=2).view(shape)
        elif self.form == "size":
            z = f(y.reshape(y.size(0), y.size(1), -1), dim=-1).reshape(y.size())
        elif self.form == "flatten":
            z = f(torch.flatten(y, 2), dim=2).view_as(y)
        elif self.form == "method":
            z = y.flatten(start_dim=2).log_softmax(2) if self.log else y.flatten(2).softmax(2)
            z = z.view(y.size(0), y.size(1), y.size(2), y.size(3), y.size(4))
        elif self.form == "module":
            z = self.sm(y.view(y.shape[0], y.shape[1], -1)).reshape_as(y)
        else:
            raise AssertionError(self.form)
        if self.weight == "param":
            return z * self.p
        if self.weight == "param_left":
            return torch.mul(self.p, z)
        return z


FORMS = ["view_getitem", "size", "flatten", "method", "module"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("weight", ["param", "param_left", "none"])
def test_pattern_is_folded(form, log, weight):
    m = Head(form, weight, log).eval()
    x = randn(2, 3, 3, 4, 5, dtype=torch.float32, seed=1)
    opt = ct3d_fx.optimize(m, x)
    assert _count_tail_calls(opt) == 1, opt.code
    rec = opt.ct3d_report.sites[0]
    assert rec.status == "fused" and rec.then is not None
    assert ("log_softmax" if log else "softmax(dim=2)") in rec.then
    assert ("mul(p)" in rec.then) == (weight != "none")
    assert "spatial_softmax" in str(opt.ct3d_report)
    for n in opt.graph.nodes:  # the softmax and the multiply are gone from the graph
        assert n.target not in (F.softmax, F.log_softmax, torch.mul), opt.code
    torch.testing.assert_close(opt(x), m(x), rtol=1e-5, atol=1e-6)
    # parameters stay the model's own objects
    assert opt.p is m.p


class NotSpatial(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.ct = nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.case = case

    def forward(self, x, side=None):
        y = torch.relu(self.ct(x))
        n, c = y.shape[0], y.shape[1]
        if self.case == "channel_dim":      # softmax over the channels of the flat view
            return F.softmax(y.view(n, c, -1), dim=1).view(y.shape)
        if self.case == "flat_batch":       # rows are whole samples, not (n, c)
            return F.softmax(y.view(n, -1), dim=1).view(y.shape)
        if self.case == "swapped":          # view(c, n, -1)
            return F.softmax(y.view(c, n, -1), dim=2).view(y.shape)
        if self.case == "dtype":            # softmax with a dtype
            return F.softmax(y.view(n, c, -1), dim=2, dtype=torch.float64).view(y.shape)
        if self.case == "flat_used_twice":  # the flat view has another reader
            v = y.view(n, c, -1)
            return F.softmax(v, dim=2).view(y.shape), v.sum()
        if self.case == "not_restored":     # the result stays (n, c, L)
            return F.softmax(y.view(n, c, -1), dim=2)
        if self.case == "flatten_1":
            return F.softmax(y.flatten(1), dim=1).view_as(y)
        raise AssertionError(self.case)


@pytest.mark.parametrize("case", ["channel_dim", "flat_batch", "swapped", "dtype",
                                  "flat_used_twice", "not_restored", "flatten_1"])
def test_other_patterns_are_left_alone(case):
    m = NotSpatial(case).eval()
    x = randn(2, 3, 3, 4, 5, dtype=torch.float32, seed=2)
    opt = ct3d_fx.optimize(m, x)
    assert _count_tail_calls(opt) == 0, opt.code
    assert opt.ct3d_report.sites[0].then is None
    ref, out = m(x), opt(x)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,),
                    out if isinstance(out, tuple) else (out,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class MulByInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.ct = nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x, scale):
        y = self.ct(x)
        return F.softmax(y.view(y.shape[0], y.shape[1], -1), dim=2).view(y.shape) * scale


def test_mul_by_a_model_input_is_not_folded():
    """The softmax is folded; a multiply by a model input (not a parameter) stays in the graph."""
    m = MulByInput().eval()
    x = randn(2, 3, 3, 4, 5, dtype=torch.float32, seed=3)
    scale = randn(1, 4, 1, 1, 1, dtype=torch.float32, seed=4)
    opt = ct3d_fx.optimize(m, (x, scale))
    assert _count_tail_calls(opt) == 1
    assert "mul(" not in opt.ct3d_report.sites[0].then
    torch.testing.assert_close(opt(x, scale), m(x, scale), rtol=1e-5, atol=1e-6)


def test_family_can_be_disabled():
    m = Head("view_getitem").eval()
    x = randn(2, 3, 3, 4, 5, dtype=torch.float32, seed=5)
    fams = ct3d_fx.patterns.FAMILIES - {"spatial_softmax"}
    opt = ct3d_fx.optimize(m, x, config=Config(families=fams))
    assert _count_tail_calls(opt) == 0
    assert opt.ct3d_report.sites[0].then is None
    torch.testing.assert_close(opt(x), m(x), rtol=1e-5, atol=1e-6)


def test_explain_reports_the_tail():
    m = Head("flatten").eval()
    rep = ct3d_fx.explain(m, randn(2, 3, 3, 4, 5, dtype=torch.float32, seed=6))
    assert "spatial_softmax kernel" in rep.sites[0].then
    assert rep.to_dict()["sites"][0]["then"] == rep.sites[0].then


def _ref64(x, log, w):
    n, c = x.shape[:2]
    f = torch.log_softmax if log else torch.softmax
    y = f(x.double().reshape(n, c, -1), dim=2).reshape(x.shape)
    return y if w is None else y * w.double()


@pytest.mark.parametrize("log", [False, True])
def test_reference_and_registrations(log):
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=8)
    w = randn(1, 3, 1, 1, 1, dtype=torch.float32, seed=9)
    torch.testing.assert_close(OP(x, log, w), _ref64(x, log, w).float(), rtol=1e-5, atol=1e-6)
    torch.library.opcheck(OP, (x, log, w))
    torch.library.opcheck(OP, (x.requires_grad_(), log, None))


@pytest.mark.parametrize("log", [False, True])
def test_gradients(log):
    x = randn(2, 3, 2, 3, 4, seed=10).requires_grad_()
    w = randn(1, 3, 1, 1, 1, seed=11).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: OP(a, log, b), (x, w))
    torch.autograd.gradgradcheck(lambda a, b: OP(a, log, b), (x, w))
    torch.autograd.gradcheck(lambda a: OP(a, log, None), (x,))


def test_bad_input_raises():
    with pytest.raises(RuntimeError, match="at least 2"):
        OP(torch.randn(5), False, None)
    with pytest.raises(RuntimeError):
        OP(torch.randn(2, 3, 4), False, torch.randn(5))  # does not broadcast


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(ss, "POISON_OUTPUT", True)


def _tol(dtype):
    return {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


SHAPES = [
    (2, 3, 4, 5, 6),        # L = 120: vectors, one chunk / a cluster of 1
    (2, 3, 3, 5, 7),        # L = 105: no vectors (odd): two kernels
    (1, 2, 1, 1, 1),        # L = 1
    (2, 2, 17, 64, 66),     # L = 71808: several chunks a row / a cluster of 5 (3 in 16 bits)
    (1, 3, 13, 61, 67),     # L = 53131: several chunks, no vectors
    (64, 32, 2, 2, 2),      # many rows, L = 8
    (1, 2, 32, 64, 64),     # L = 131072 (l2_38's rows): a cluster of 8 in float32
    (1, 2, 8, 128, 132),    # L = 135168: too long for 8 float32 CTAs (two kernels), 5 in 16 bits
]


def _expected_path(shape, dtype, path):
    """Which form the kernel runs: the one-read cluster kernels need compute capability 9.0,
    16-byte vectors (L a multiple of the vector width) and at most 8 CTAs of 4096 vectors."""
    L = 1
    for d in shape[2:]:
        L *= d
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    onchip = (path.startswith("onchip") and torch.cuda.get_device_capability()[0] >= 9
              and L % vec == 0 and -(-L // (256 * 16 * vec)) <= 8)
    return path if onchip else "two_pass"


# path -> (MAX_CLUSTER, SHARED_VECS); "onchip_shared" with 16 vectors per thread (64 KB per CTA)
# and with 3 (the row split over more CTAs, an uneven last vector group)
PATHS = {"onchip_shared": (8, 16), "onchip_shared3": (8, 3), "onchip_registers": (8, 0),
         "two_pass": (0, 16)}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    mc, vecs = PATHS[request.param]
    monkeypatch.setattr(ss, "MAX_CLUSTER", mc)
    monkeypatch.setattr(ss, "SHARED_VECS", vecs)
    return request.param


def _path_ran(shape, dtype, path):
    """LAST_PATH expected after a call on `path` (shared3 reports as onchip_shared, and falls
    back to two kernels where its 3 vectors per thread x 8 CTAs do not hold the row)."""
    if path == "onchip_shared3":
        L = 1
        for d in shape[2:]:
            L *= d
        vec = 16 // torch.empty((), dtype=dtype).element_size()
        if -(-L // (256 * 3 * vec)) > 8:
            return "two_pass"
        return _expected_path(shape, dtype, "onchip_shared")
    return _expected_path(shape, dtype, path)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log"])
@pytest.mark.parametrize("wkind", ["none", "channel", "flat_channel", "scalar0d"])
def test_kernel_matches_float64(shape, dtype, log, wkind, path, poison):
    x = (randn(*shape, seed=sum(shape)) * 3).to(dtype).cuda()
    c = shape[1]
    w = {"none": None,
         "channel": randn(1, c, 1, 1, 1, seed=1),
         "flat_channel": randn(c, 1, 1, 1, seed=2),
         "scalar0d": randn(1, seed=3).reshape(())}[wkind]
    if w is not None:
        w = w.to(dtype).cuda()
    out = OP(x, log, w)
    assert ss.LAST_KERNEL is True
    assert ss.LAST_PATH == _path_ran(shape, dtype, path)
    ref = _ref64(x, log, w)
    assert out.shape == x.shape and out.dtype == (x.dtype if w is None else
                                                  torch.result_type(x, w))
    assert out.is_contiguous()
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0 if log else 1e-30)).max().item() \
        if log else ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < _tol(dtype), err


@pytest.mark.cuda
@pytest.mark.parametrize("xdt,wdt", [(torch.bfloat16, torch.float32),
                                     (torch.float16, torch.float32),
                                     (torch.float16, torch.bfloat16)])
def test_kernel_promotes_like_mul(xdt, wdt, path, poison):
    """A wider weight widens the result (bf16 * float32 Parameter -> float32), as `y * w` does."""
    x = randn(2, 4, 3, 8, 8, seed=12).to(xdt).cuda()
    w = randn(1, 4, 1, 1, 1, seed=13).to(wdt).cuda()
    out = OP(x, False, w)
    assert ss.LAST_KERNEL is True and out.dtype == torch.float32
    ref = _ref64(x, False, w)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.cuda
def test_kernel_cpu_scalar_weight(poison):
    x = randn(2, 4, 3, 8, 8, seed=14).float().cuda()
    w = torch.tensor(1.7)
    out = OP(x, False, w)
    assert ss.LAST_KERNEL is True
    torch.testing.assert_close(out, _ref64(x, False, w).float(), rtol=2e-6, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["float64", "channels_last", "full_weight", "weight_enlarges",
                                  "float64_weight"])
def test_reference_where_the_kernel_does_not_apply(case):
    x = randn(2, 4, 3, 8, 8, seed=15).float().cuda()
    w = randn(1, 4, 1, 1, 1, seed=16).float().cuda()
    if case == "float64":
        x = x.double()
        w = w.double()
    elif case == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    elif case == "full_weight":
        w = randn(2, 4, 3, 8, 8, seed=17).float().cuda()
    elif case == "weight_enlarges":
        x = x[:1]
        w = randn(3, 4, 1, 1, 1, seed=18).float().cuda()
    elif case == "float64_weight":
        w = w.double()
    out = OP(x, False, w)
    assert ss.LAST_KERNEL is False
    torch.testing.assert_close(out, ss.reference(x, False, w), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("log", [False, True])
def test_kernel_nan_and_inf_rows(log, path):
    x = randn(2, 3, 4, 8, 8, seed=19).float()
    x[0, 0, 1, 2, 3] = float("nan")      # row (0, 0): NaN everywhere, as PyTorch
    x[0, 1, :2] = float("-inf")          # row (0, 1): some -inf, the rest finite
    x[1, 2] = float("-inf")              # row (1, 2): all -inf
    x[1, 2, 0, 0, 0] = 0.5               # ... but one
    x = x.cuda()
    out = OP(x, log, None)
    assert ss.LAST_KERNEL is True
    ref = ss.reference(x, log, None)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("log", [False, True])
def test_gradients_cuda(log):
    x = randn(2, 3, 4, 8, 8, seed=20).float().cuda().requires_grad_()
    w = randn(1, 3, 1, 1, 1, seed=21).float().cuda().requires_grad_()
    g = randn(2, 3, 4, 8, 8, seed=22).float().cuda()
    (OP(x, log, w) * g).sum().backward()
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (_ref64(x2, log, w2) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("form", FORMS)
def test_optimized_model_cuda(form, poison, monkeypatch):
    """The l2_38 pattern end to end: fused site, then the spatial softmax kernel, exact FP32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    m = Head(form, "param", cin=8, cout=16).eval().cuda()
    x = randn(2, 8, 6, 10, 12, dtype=torch.float32, seed=23).cuda()
    opt = ct3d_fx.optimize(m, x)
    assert _count_tail_calls(opt) == 1
    ss.LAST_KERNEL = None
    out = opt(x)
    assert ss.LAST_KERNEL is True
    m64 = Head(form, "param", cin=8, cout=16).eval()
    m64.load_state_dict(m.state_dict())
    ref = m64.double()(x.double().cpu()).cuda()
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


class _FakeExt:
    """Stands in for the CUDA extension on the CPU: writes the reference into `out` and reports
    a one-read kernel (a cluster of 1) for max_cluster > 0, else two kernels."""

    def __init__(self):
        self.calls = []

    def spatial_softmax(self, x, out, wc, log, max_cluster, shared_vecs):
        self.calls.append((max_cluster, shared_vecs))
        w = None if wc is None else wc.view(1, -1, *[1] * (x.dim() - 2))
        out.copy_(ss.reference(x, log, w))
        return -1 if max_cluster > 0 else 1


@pytest.fixture
def tuned(monkeypatch):
    """The autotune on, over a fake extension. Returns (fake, picks, answer): picks collects the
    candidate names of each _pick_fastest call, which runs every candidate once and returns
    answer[0] (None: the first candidate)."""
    fake = _FakeExt()
    monkeypatch.setattr(ss._build, "load", lambda: fake)
    monkeypatch.setattr(ss._cuda, "_tunable", lambda t: True)
    monkeypatch.setattr(ss, "_choices", {})
    picks, answer = [], [None]

    def pick(cands, reps=7, timer=None):
        picks.append([name for name, _ in cands])
        for _, fn in cands:
            fn()
        return cands[0][0] if answer[0] is None else answer[0]
    monkeypatch.setattr(ss._cuda, "_pick_fastest", pick)
    return fake, picks, answer


@pytest.mark.parametrize("winner", [(8, 16), (8, 8), (8, 0), (0, 0), "reference"],
                         ids=str)
def test_autotune_picks_once_per_signature(winner, tuned, monkeypatch):
    """With the autotune on, the first call of a signature times every form of the kernel
    against the reference (one _pick_fastest call), keeps the winner, and later calls run it."""
    fake, picks, answer = tuned
    answer[0] = winner
    monkeypatch.setattr(ss, "MAX_CLUSTER", 8)
    x = randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=30)
    w = randn(1, 3, 1, 1, 1, dtype=torch.float32, seed=31)
    ref = ss.reference(x, False, w)
    for _ in range(3):
        fake.calls.clear()
        torch.testing.assert_close(ss.run(x, False, w), ref, rtol=1e-6, atol=1e-7)
        assert ss.LAST_KERNEL is (winner != "reference")
        if winner != "reference":
            assert fake.calls[-1] == winner
            expected = "two_pass" if winner[0] == 0 else \
                ("onchip_shared" if winner[1] > 0 else "onchip_registers")
            assert ss.LAST_PATH == expected
    assert picks == [[(8, 16), (8, 8), (8, 0), (0, 0), "reference"]]
    assert list(ss._choices.values()) == [winner]
    # another signature is timed again
    ss.run(x[:1], False, w)
    assert len(picks) == 2


def test_autotune_without_cluster_forms(tuned, monkeypatch):
    """MAX_CLUSTER = 0 (no one-read kernel): the autotune weighs the two kernels against the
    reference only."""
    fake, picks, _ = tuned
    monkeypatch.setattr(ss, "MAX_CLUSTER", 0)
    ss.run(randn(2, 3, 4, 5, 6, dtype=torch.float32, seed=32), True, None)
    assert picks == [[(0, 0), "reference"]]
    assert fake.calls[-1] == (0, 0) and ss.LAST_PATH == "two_pass"
