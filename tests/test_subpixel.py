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


@pytest.mark.parametrize("cout", [1, 3])
def test_candidate_same_values_and_layout_as_the_reference(cout, monkeypatch):
    """The candidate's result: the reference's values (float64), shape, strides and dtype; the
    user's cudnn.benchmark flag left as it was."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    args = _args(cout)
    ref = ops.reference(*args)
    out = _cuda._reference_subpixel(args, tuple(ref.shape), ref.stride(), ref.dtype)
    assert out.shape == ref.shape and out.stride() == ref.stride() and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.backends.cudnn.benchmark is False


def test_candidate_applies_to_small_cout_with_a_stride(monkeypatch):
    x = torch.zeros(1, 8, 4, 4, 4)
    monkeypatch.setattr(_cuda, "SUBPIXEL", True)
    assert _cuda._subpixel_applies(x, torch.zeros(8, 1, 4, 4, 4), 1, [2, 2, 2])
    assert _cuda._subpixel_applies(x, torch.zeros(8, 4, 3, 3, 3), 1, [1, 1, 2])
    assert not _cuda._subpixel_applies(x, torch.zeros(8, 5, 3, 3, 3), 1, [2, 2, 2])  # C_out
    assert not _cuda._subpixel_applies(x, torch.zeros(8, 1, 3, 3, 3), 1, [1, 1, 1])  # stride
    assert not _cuda._subpixel_applies(x, torch.zeros(4, 1, 3, 3, 3), 2, [2, 2, 2])  # groups
    monkeypatch.setattr(_cuda, "SUBPIXEL", False)
    assert not _cuda._subpixel_applies(x, torch.zeros(8, 1, 4, 4, 4), 1, [2, 2, 2])
