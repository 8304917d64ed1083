"""The sub-pixel form of ConvTranspose3d (ct3d_fx/subpixel.py) and the autotune's "subpixel"
candidate built on it (ct3d_fx/_cuda.py ``_reference_subpixel``), on the CPU against
F.conv_transpose3d and the op's reference in float64. tests/test_cuda_autotune.py runs the
candidate on the GPU."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from ct3d_fx import _cuda, ops
from ct3d_fx.ops import Opcode as O
from ct3d_fx.subpixel import conv_transpose3d_subpixel, subpixel_dims, subpixel_weight


def _config(seed):
    """A random valid ConvTranspose3d configuration: PyTorch's output_padding rule, an output
    of at least one voxel per dimension."""
    rnd = random.Random(seed)
    while True:
        k = [rnd.randint(1, 5) for _ in range(3)]
        s = [rnd.randint(1, 3) for _ in range(3)]
        dl = [rnd.randint(1, 2) for _ in range(3)]
        p = [rnd.randint(0, dl[i] * (k[i] - 1)) for i in range(3)]
        op = [rnd.randint(0, max(s[i], dl[i]) - 1) for i in range(3)]
        size = [rnd.randint(1, 6) for _ in range(3)]
        if all((size[i] - 1) * s[i] - 2 * p[i] + dl[i] * (k[i] - 1) + op[i] >= 0
               for i in range(3)):
            break
    cin, cout = rnd.randint(1, 5), rnd.randint(1, 4)
    return k, s, p, op, dl, size, cin, cout, rnd.random() < 0.5


@pytest.mark.parametrize("seed", range(80))
def test_matches_conv_transpose3d(seed):
    k, s, p, op, dl, size, cin, cout, with_bias = _config(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, *size, generator=g, dtype=torch.float64)
    w = torch.randn(cin, cout, *k, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if with_bias else None
    ref = F.conv_transpose3d(x, w, b, s, p, op, 1, dl)
    out = conv_transpose3d_subpixel(x, w, b, s, p, op, dl)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p,op", [(4, 2, 1, 0), (3, 2, 1, 1), (3, 2, 1, 0), (5, 3, 2, 2)])
def test_common_layers(k, s, p, op):
    """GAN / decoder upsampling layers, including extents that are not multiples of the stride
    (a cropped view)."""
    g = torch.Generator().manual_seed(k * 10 + s)
    x = torch.randn(2, 8, 5, 6, 7, generator=g, dtype=torch.float64)
    w = torch.randn(8, 1, k, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(1, generator=g, dtype=torch.float64)
    ref = F.conv_transpose3d(x, w, b, s, p, op)
    out = conv_transpose3d_subpixel(x, w, b, [s] * 3, [p] * 3, [op] * 3, [1] * 3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_kernel_4_stride_2_geometry():
    """k4 s2 p1: each phase uses 2 of the 4 taps per dimension, deltas -1..1 (E = 3)."""
    (d, _, _) = subpixel_dims([32] * 3, [4] * 3, [2] * 3, [1] * 3, [0] * 3, [1] * 3)
    assert (d.out, d.phases, d.span, d.dmin) == (64, 32, 3, -1)
    assert d.taps == [[3, 1, -1], [-1, 2, 0]]


def test_weight_holds_each_tap_once():
    """Every weight of the transposed conv appears exactly once in the conv3d weight (each tap
    belongs to one phase and one delta per dimension); the rest are zeros."""
    g = torch.Generator().manual_seed(5)
    w = torch.rand(3, 2, 4, 3, 5, generator=g, dtype=torch.float64) + 0.5  # no zeros
    dims = subpixel_dims([6, 6, 6], [4, 3, 5], [2, 3, 2], [1, 0, 2], [0, 0, 1], [1, 1, 1])
    w2 = subpixel_weight(w, dims)
    assert w2.shape == (2 * 2 * 3 * 2, 3, dims[0].span, dims[1].span, dims[2].span)
    nz = w2[w2 != 0]
    assert nz.numel() == w.numel()
    torch.testing.assert_close(nz.sort().values, w.flatten().sort().values, rtol=0, atol=0)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same C_in"):
        conv_transpose3d_subpixel(torch.zeros(1, 3, 2, 2, 2), torch.zeros(4, 1, 2, 2, 2), None,
                                  [2] * 3, [0] * 3, [0] * 3, [1] * 3)


def _args(cout=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 3, 4, 5, generator=g, dtype=dtype)
    w = torch.randn(6, cout, 4, 4, 4, generator=g, dtype=dtype) * 0.3
    b = torch.randn(cout, generator=g, dtype=dtype)
    side = torch.randn(2, cout, 6, 8, 10, generator=g, dtype=dtype)
    program = [int(O.LOAD_TENSOR), 0, -1, -1, -1, -1, int(O.ADD), 0, 1, -1, -1, -1,
               int(O.SIGMOID), 2, -1, -1, -1, -1]
    return (x, w, b, [2] * 3, [1] * 3, [0] * 3, [1] * 3, 1, program, [], [side])


def _check_candidate(args, tol):
    """The "subpixel" candidate on ``args`` against the reference: values within ``tol``
    (relative and absolute), shape, strides and dtype."""
    ref = ops.reference(*args)
    out = _cuda._reference_subpixel(args, tuple(ref.shape), ref.stride(), ref.dtype)
    assert out.shape == ref.shape and out.stride() == ref.stride() and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("cout", [1, 3])
def test_candidate_same_values_and_layout_as_the_reference(cout, monkeypatch):
    """The candidate's result: the reference's values (float64), shape, strides and dtype; the
    user's cudnn.benchmark flag left as it was."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    args = _args(cout)
    _check_candidate(args, 1e-12)
    assert torch.backends.cudnn.benchmark is False


def test_candidate_applies_to_small_cout_with_a_stride(monkeypatch):
    x = torch.zeros(1, 8, 4, 4, 4)
    monkeypatch.setattr(_cuda, "SUBPIXEL", True)
    assert _cuda._subpixel_applies(x, torch.zeros(8, 1, 4, 4, 4), 1, [2, 2, 2])
    assert _cuda._subpixel_applies(x, torch.zeros(8, 4, 3, 3, 3), 1, [1, 1, 2])
    assert not _cuda._subpixel_applies(x, torch.zeros(8, 5, 3, 3, 3), 1, [2, 2, 2])  # C_out
    assert not _cuda._subpixel_applies(x, torch.zeros(8, 1, 3, 3, 3), 1, [1, 1, 1])  # stride
    assert not _cuda._subpixel_applies(x, torch.zeros(4, 17, 3, 3, 3), 2, [2, 2, 2])  # C_out/g
    monkeypatch.setattr(_cuda, "SUBPIXEL", False)
    assert not _cuda._subpixel_applies(x, torch.zeros(8, 1, 4, 4, 4), 1, [2, 2, 2])


# Grouped transposed convs: (N, C_in, spatial size, C_out, groups, kernel, stride, padding,
# output_padding, dilation, bias)
_GROUPED = {
    # suite problem l1_72 (C_in 32, C_out 32, groups 4, input (8, 32, 12, 24, 48)) scaled down
    "l1_72": (2, 8, (3, 5, 6), 8, 4, (3, 5, 7), (2, 2, 2), (1, 2, 3), (1, 1, 1), (1, 1, 1),
              True),
    "l1_72_no_bias": (2, 8, (3, 5, 6), 8, 4, (3, 5, 7), (2, 2, 2), (1, 2, 3), (1, 1, 1),
                      (1, 1, 1), False),
    "groups2_k4_s2": (2, 6, (4, 3, 5), 4, 2, (4, 4, 4), (2, 2, 2), (1, 1, 1), (0, 0, 0),
                      (1, 1, 1), True),
    "mixed_strides": (2, 4, (3, 4, 5), 6, 2, (3, 4, 5), (1, 2, 3), (1, 1, 2), (0, 1, 2),
                      (1, 1, 1), False),
    "dilation2": (1, 8, (4, 3, 5), 8, 4, (3, 3, 3), (2, 2, 2), (2, 2, 2), (1, 1, 1), (2, 2, 2),
                  True),
    # extents 3 * i - 1: not multiples of the stride (a cropped view), 1 output channel a group
    "uneven_extents": (2, 6, (4, 3, 5), 3, 3, (4, 4, 4), (3, 3, 3), (1, 1, 1), (0, 0, 0),
                       (1, 1, 1), True),
    "depthwise": (2, 4, (3, 4, 3), 4, 4, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1),
                  False),
}


def _grouped_inputs(case, seed):
    n, cin, size, cout, groups, k, s, p, op, dl, with_bias = _GROUPED[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *size, generator=g, dtype=torch.float64)
    w = torch.randn(cin, cout // groups, *k, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if with_bias else None
    return x, w, b, groups, s, p, op, dl


@pytest.mark.parametrize("case", sorted(_GROUPED))
def test_grouped_matches_conv_transpose3d(case):
    """``groups=g``: one grouped conv3d over the phases gives F.conv_transpose3d's values and
    shape."""
    x, w, b, groups, s, p, op, dl = _grouped_inputs(case, sorted(_GROUPED).index(case) + 100)
    ref = F.conv_transpose3d(x, w, b, s, p, op, groups, dl)
    out = conv_transpose3d_subpixel(x, w, b, s, p, op, dl, groups=groups)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # the caller's cached conv3d weight and geometry give the same values
    dims = subpixel_dims(x.shape[2:], w.shape[2:], s, p, op, dl)
    w2 = subpixel_weight(w, dims, groups=groups)
    out2 = conv_transpose3d_subpixel(x, w, b, s, p, op, dl, w2, dims, groups=groups)
    torch.testing.assert_close(out2, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(40))
def test_grouped_random_configurations(seed):
    """Random geometries (as test_matches_conv_transpose3d) with 2 to 4 groups."""
    k, s, p, op, dl, size, cin_g, cout_g, with_bias = _config(seed)
    groups = random.Random(seed).randint(2, 4)
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(2, cin_g * groups, *size, generator=g, dtype=torch.float64)
    w = torch.randn(cin_g * groups, cout_g, *k, generator=g, dtype=torch.float64)
    b = torch.randn(cout_g * groups, generator=g, dtype=torch.float64) if with_bias else None
    ref = F.conv_transpose3d(x, w, b, s, p, op, groups, dl)
    out = conv_transpose3d_subpixel(x, w, b, s, p, op, dl, groups=groups)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_grouped_weight_is_the_dense_weights_diagonal_blocks():
    """The grouped conv3d weight is the block of the groups=1 conv3d weight of the equivalent
    dense (block-diagonal) transposed-conv weight that each group reads: output channels
    [j * (C_out / g) * s3, (j + 1) * (C_out / g) * s3) against input channels of group j; the
    dense one is zero off those blocks."""
    groups, cin_g, cout_g = 3, 2, 2
    g = torch.Generator().manual_seed(11)
    w = torch.randn(cin_g * groups, cout_g, 3, 4, 5, generator=g, dtype=torch.float64)
    dense = torch.zeros(cin_g * groups, cout_g * groups, 3, 4, 5, dtype=torch.float64)
    for j in range(groups):
        dense[j * cin_g:(j + 1) * cin_g, j * cout_g:(j + 1) * cout_g] = w[j * cin_g:
                                                                          (j + 1) * cin_g]
    dims = subpixel_dims([5, 5, 5], [3, 4, 5], [2, 2, 3], [1, 1, 2], [1, 0, 0], [1, 1, 1])
    s3 = 2 * 2 * 3
    w2 = subpixel_weight(w, dims, groups=groups)
    d2 = subpixel_weight(dense, dims)
    assert w2.shape == (cout_g * groups * s3, cin_g, dims[0].span, dims[1].span, dims[2].span)
    for j in range(groups):
        rows = slice(j * cout_g * s3, (j + 1) * cout_g * s3)
        torch.testing.assert_close(w2[rows], d2[rows, j * cin_g:(j + 1) * cin_g], rtol=0,
                                   atol=0)
        off = torch.cat([d2[rows, :j * cin_g], d2[rows, (j + 1) * cin_g:]], dim=1)
        assert not off.any()


def test_rejects_mismatched_groups():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 2, 2, 2, generator=g)
    w = torch.randn(8, 2, 3, 3, 3, generator=g)
    args = ([2] * 3, [1] * 3, [0] * 3, [1] * 3)
    with pytest.raises(ValueError, match="groups=3 and C_in=8"):
        conv_transpose3d_subpixel(x, w, None, *args, groups=3)
    with pytest.raises(ValueError, match="groups=0"):
        conv_transpose3d_subpixel(x, w, None, *args, groups=0)
    dims = subpixel_dims([2] * 3, [3] * 3, [2] * 3, [1] * 3, [0] * 3, [1] * 3)
    with pytest.raises(ValueError, match="groups=3 and C_in=8"):
        subpixel_weight(w, dims, groups=3)
    # a conv3d weight built for another groups value
    with pytest.raises(ValueError, match=r"weight2 must be .* for groups=4, got"):
        conv_transpose3d_subpixel(x, w, None, *args, subpixel_weight(w, dims), dims, groups=4)


def test_grouped_candidate_same_values_as_the_reference(monkeypatch):
    """The "subpixel" candidate passes the call's groups (args[7]) through: the reference's
    values (float64), shape, strides and dtype for l1_72's geometry scaled down."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    x, w, b, groups, s, p, op, dl = _grouped_inputs("l1_72", 17)
    g = torch.Generator().manual_seed(18)
    out_size = F.conv_transpose3d(x, w, b, s, p, op, groups, dl).shape
    side = torch.randn(*out_size, generator=g, dtype=torch.float64)
    program = [int(O.LOAD_TENSOR), 0, -1, -1, -1, -1, int(O.ADD), 0, 1, -1, -1, -1,
               int(O.SIGMOID), 2, -1, -1, -1, -1]
    args = (x, w, b, list(s), list(p), list(op), list(dl), groups, program, [], [side])
    _check_candidate(args, 1e-10)
    assert torch.backends.cudnn.benchmark is False


def test_candidate_gating_with_groups(monkeypatch):
    """groups 1: C_out up to _SUBPIXEL_MAX_COUT (4); groups > 1: the per-group C_out
    (weight.size(1)) up to _SUBPIXEL_MAX_COUT_GROUPED (16); a stride above 1 either way."""
    monkeypatch.setattr(_cuda, "SUBPIXEL", True)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 32, 2, 2, 2, generator=g)

    def w(cout_per_group):
        return torch.randn(32, cout_per_group, 3, 3, 3, generator=g)

    assert _cuda._SUBPIXEL_MAX_COUT == 4 and _cuda._SUBPIXEL_MAX_COUT_GROUPED == 16
    assert _cuda._subpixel_applies(x, w(4), 1, [2, 2, 2])
    assert not _cuda._subpixel_applies(x, w(8), 1, [2, 2, 2])
    assert _cuda._subpixel_applies(x, w(8), 4, [2, 2, 2])      # l1_72: 8 per group
    assert _cuda._subpixel_applies(x, w(16), 4, [1, 2, 1])
    assert not _cuda._subpixel_applies(x, w(17), 2, [2, 2, 2])
    assert not _cuda._subpixel_applies(x, w(32), 4, [2, 2, 2])
    assert not _cuda._subpixel_applies(x, w(8), 4, [1, 1, 1])  # stride 1
    assert not _cuda._subpixel_applies(x, w(2), 1, [1, 1, 1])
    assert not _cuda._subpixel_applies(x[0], w(8), 4, [2, 2, 2])  # 4-D input
    monkeypatch.setattr(_cuda, "SUBPIXEL", False)
    assert not _cuda._subpixel_applies(x, w(8), 4, [2, 2, 2])
