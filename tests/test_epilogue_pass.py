"""The epilogue pass (csrc/kernels_epilogue_pass.cu; ct3d_fx/_cuda.py ``_run_pass``): a site's
bias and program in one pass over a conv output cuDNN computed, and the two autotune candidates
that use it ("cudnn_channels_last_pass" reads cuDNN's channels_last_3d output, "cudnn_pass", off
by default, runs in place on the reference's conv).

Each kernel test draws fresh random inputs, poisons the output with NaN, runs the pass and
compares it with the program run in float64 on the same conv output (so only the pass's float32
arithmetic and the output rounding are measured)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ct3d_fx._cuda as cu
from ct3d_fx import ops
from ct3d_fx.ops import Opcode as O

from conftest import randn, rig_autotune

OP = torch.ops.ct3d.conv_transpose3d_epilogue.default
CL = torch.channels_last_3d


def _row(*fields):
    return [int(f) for f in fields] + [-1] * (6 - len(fields))


def _programs(C, shape):
    """(name, program, scalars, extras as float64 CPU tensors) for an output of ``shape``."""
    n, _, d, h, w = shape
    return [
        ("relu", _row(O.RELU, 0), [], []),
        ("side_input_hardswish_mul",  # l2_26: conv + x, then x * hardswish(x)
         _row(O.LOAD_TENSOR, 0) + _row(O.ADD, 0, 1) + _row(O.HARDSWISH, 2) + _row(O.MUL, 2, 3),
         [], [randn(*shape, seed=5)]),
        ("clamp_div",  # l2_100
         _row(O.CLAMP, 0, 0, -1) + _row(O.LOAD_SCALAR, 1) + _row(O.DIV, 1, 2), [-1.0, 2.0], []),
        ("batch_norm_gelu",
         _row(O.BATCH_NORM, 0, 0, 1, 0) + _row(O.GELU, 1, 0), [1e-5],
         [randn(C, seed=6) * 0.3, randn(C, seed=7, lo=0.5, hi=1.5), randn(C, seed=8),
          randn(C, seed=9)]),
        ("per_channel_scale_leaky",
         _row(O.LOAD_TENSOR, 0) + _row(O.MUL, 0, 1) + _row(O.LEAKY_RELU, 2, 0), [0.1],
         [randn(C, 1, 1, 1, seed=10)]),
        ("broadcast_over_w_prelu",  # a slot that is neither per-channel nor output-shaped
         _row(O.LOAD_TENSOR, 0) + _row(O.SUB, 0, 1) + _row(O.PRELU, 2, 1), [],
         [randn(1, 1, 1, w, seed=11), randn(C, seed=12) * 0.2]),
        ("zero_dim_tensor_silu",
         _row(O.LOAD_TENSOR, 0) + _row(O.MUL, 1, 0) + _row(O.SILU, 2), [],
         [torch.tensor(1.7, dtype=torch.float64)]),
    ]


PROGRAM_NAMES = [p[0] for p in _programs(4, (1, 4, 2, 2, 2))]

CASES = [  # (input shape, C_out, kernel, stride, padding, output_padding)
    ((2, 8, 5, 6, 7), 24, 3, 2, 1, 1),    # C_out not a multiple of 32; D*H*W not of 64
    ((1, 16, 4, 4, 8), 40, 3, 1, 0, 0),
    ((3, 4, 3, 5, 9), 64, (1, 2, 3), (1, 2, 1), 0, 0),
    ((1, 6, 3, 3, 5), 9, 3, 1, 0, 0),     # odd C and D*H*W: half types take the plain kernel
]


def _conv(x, w, st, pa, op, layout):
    fmt = CL if layout == "cl" else torch.contiguous_format
    y = F.conv_transpose3d(x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt),
                           None, st, pa, op)
    assert y.is_contiguous(memory_format=fmt)
    return y


def _lite_expected(name, src_layout, out_layout, C, S, out_itemsize, lite):
    """The kernel the pass should run with ``_cuda.PASS_LITE = lite`` (the binding's rule: 8
    elements along each tensor's fast dimension in 16-byte vectors, the transpose's output also
    with scalar stores; lite_program_ok: <= 2 registers, per-channel or output-shaped slots),
    or None where the staged / plain kernel runs."""
    if lite == 0 or name == "broadcast_over_w_prelu":  # a slot broadcast over W
        return None
    if name == "side_input_hardswish_mul" and out_layout == "cl":  # an NCDHW side input: not
        return None                                                # laid out like the output
    if src_layout == out_layout:
        return "lite" if (C if src_layout == "cl" else S) % 8 == 0 else None
    if (src_layout, out_layout) != ("cl", "ncdhw") or C % 8 != 0:
        return None
    return "lite_transpose"


@pytest.mark.cuda
@pytest.mark.parametrize("lite", [1, 0, 2, 3], ids=["lite", "nolite", "lite_scalar", "lite_vec"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"case{i}")
@pytest.mark.parametrize("prog_id", range(7), ids=lambda i: PROGRAM_NAMES[i])
@pytest.mark.parametrize("dtype,src_layout,out_layout", [
    (torch.float32, "ncdhw", "ncdhw"), (torch.float32, "cl", "ncdhw"),
    (torch.float32, "cl", "cl"), (torch.float32, "ncdhw", "cl"),
    (torch.bfloat16, "cl", "ncdhw"), (torch.bfloat16, "ncdhw", "ncdhw"),
    (torch.float16, "cl", "ncdhw"),
], ids=["f32-ncdhw-ncdhw", "f32-cl-ncdhw", "f32-cl-cl", "f32-ncdhw-cl", "bf16-cl-ncdhw",
        "bf16-ncdhw-ncdhw", "f16-cl-ncdhw"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_pass_matches_float64(case, prog_id, dtype, src_layout, out_layout, bias, lite, ext,
                              monkeypatch):
    monkeypatch.setattr(cu, "PASS_LITE", lite)
    xs, cout, k, st, pa, op = CASES[case]
    k3 = (k,) * 3 if isinstance(k, int) else k
    seed = case * 100 + prog_id
    x = randn(*xs, seed=seed).to(dtype).cuda()
    w = (randn(xs[1], cout, *k3, seed=seed + 1) / (xs[1] * 27) ** 0.5).to(dtype).cuda()
    b = randn(cout, seed=seed + 2).to(dtype).cuda() if bias else None
    st3 = [st] * 3 if isinstance(st, int) else list(st)
    conv_shape = ops.output_shape(x, w, st3, [pa] * 3, [op] * 3, [1] * 3, 1)
    name, program, scalars, extras64 = _programs(cout, tuple(conv_shape))[prog_id]
    extras = [t.to(dtype).cuda() for t in extras64]
    if out_layout == "cl":
        x = x.contiguous(memory_format=CL)  # the reference's output follows the input
    args = (x, w, b, st3, [pa] * 3, [op] * 3, [1] * 3, 1, program, scalars, extras)
    plan = cu._get_plan(*args)
    assert plan.fallback is None and plan.passable, (name, plan.fallback)
    y = _conv(x, w, st3, [pa] * 3, [op] * 3, src_layout)
    out = torch.empty_strided(plan.shape, plan.stride, dtype=plan.dtype, device="cuda")
    out.fill_(float("nan"))
    cu._run_pass(ext, plan, y, b, extras, out)
    out_layout_got = "cl" if out.stride(1) == 1 and cout > 1 else "ncdhw"
    want_kernel = _lite_expected(name, src_layout, out_layout_got, cout,
                                 conv_shape[2] * conv_shape[3] * conv_shape[4],
                                 out.element_size(), lite)
    if want_kernel is None:
        assert cu.LAST_PASS_KERNEL in ("staged", "plain"), cu.LAST_PASS_KERNEL
    else:
        assert cu.LAST_PASS_KERNEL == want_kernel, (name, cu.LAST_PASS_KERNEL, want_kernel)
    y64 = y.double() + (0 if b is None else b.double().view(1, -1, 1, 1, 1))
    want = ops._run_program(y64, program, scalars, [t.double() for t in extras])
    assert not torch.isnan(out).any(), f"{name}: an output element was not written"
    assert out.stride() == tuple(plan.stride) and out.dtype == plan.dtype
    err = ((out.double() - want).norm() / want.norm()).item()
    tol = 1e-6 if plan.dtype == torch.float32 and dtype == torch.float32 else 8e-3
    assert err < tol, (name, err)


@pytest.mark.cuda
@pytest.mark.parametrize("lite", [1, 0], ids=["lite", "nolite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass_in_place(dtype, lite, ext, monkeypatch):
    """Source and output the same tensor (the "cudnn_pass" candidate's case)."""
    monkeypatch.setattr(cu, "PASS_LITE", lite)
    x = randn(2, 8, 5, 6, 7, seed=3).to(dtype).cuda()
    w = (randn(8, 24, 3, 3, 3, seed=4) * 0.1).to(dtype).cuda()
    b = randn(24, seed=5).to(dtype).cuda()
    program = _row(O.CLAMP, 0, 0, -1) + _row(O.LOAD_SCALAR, 1) + _row(O.DIV, 1, 2)
    args = (x, w, b, [2] * 3, [1] * 3, [1] * 3, [1] * 3, 1, program, [-0.5, 2.0], [])
    plan = cu._get_plan(*args)
    y = F.conv_transpose3d(x, w, None, 2, 1, 1)
    want = ops._run_program(y.double() + b.double().view(1, -1, 1, 1, 1), program,
                            [-0.5, 2.0], [])
    out = cu._run_pass(ext, plan, y, b, [], y)
    assert out.data_ptr() == y.data_ptr()
    assert cu.LAST_PASS_KERNEL == ("lite" if lite else "staged"), cu.LAST_PASS_KERNEL
    err = ((out.double() - want).norm() / want.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 8e-3), err


@pytest.mark.cuda
@pytest.mark.parametrize("src_layout", ["ncdhw", "cl"])
def test_pass_bf16_conv_float32_output(src_layout, ext):
    """A float32 side input promotes the site's result to float32: the pass reads the bf16
    conv output and writes float32."""
    x = randn(2, 8, 5, 6, 7, seed=41).to(torch.bfloat16).cuda()
    w = (randn(8, 24, 3, 3, 3, seed=42) * 0.1).to(torch.bfloat16).cuda()
    b = randn(24, seed=43).to(torch.bfloat16).cuda()
    side = randn(2, 24, 10, 12, 14, seed=44).float().cuda()
    program = _row(O.LOAD_TENSOR, 0) + _row(O.ADD, 0, 1) + _row(O.TANH, 2)
    args = (x, w, b, [2] * 3, [1] * 3, [1] * 3, [1] * 3, 1, program, [], [side])
    plan = cu._get_plan(*args)
    assert plan.dtype == torch.float32 and cu._pass_applies(plan, x)
    y = _conv(x, w, [2] * 3, [1] * 3, [1] * 3, src_layout)
    out = torch.full(plan.shape, float("nan"), device="cuda")
    cu._run_pass(ext, plan, y, b, [side], out)
    want = ops._run_program(y.double() + b.double().view(1, -1, 1, 1, 1), program, [],
                            [side.double()])
    err = ((out.double() - want).norm() / want.norm()).item()
    assert err < 1e-6, err


@pytest.mark.cuda
@pytest.mark.parametrize("lite", [2, 3], ids=["scalar_stores", "vector_stores"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("src_layout", ["cl", "ncdhw"])
def test_pass_lite_batch_one_per_channel(dtype, src_layout, lite, ext, monkeypatch):
    """N == 1 with a (C, 1, 1, 1) scale: the binding zeroes the strides of size-1 output
    dimensions, so the slot is per-channel and the vector kernels take the program; several
    32-channel blocks and 128-position tiles, the last of each partial; the transpose forced to
    scalar or 16-byte output stores."""
    monkeypatch.setattr(cu, "PASS_LITE", lite)
    x = randn(1, 16, 5, 9, 12, seed=61).to(dtype).cuda()
    w = (randn(16, 72, 3, 3, 3, seed=62) / (16 * 27) ** 0.5).to(dtype).cuda()
    b = randn(72, seed=63).to(dtype).cuda()
    scale = randn(72, 1, 1, 1, seed=64).to(dtype).cuda()
    program = _row(O.LOAD_TENSOR, 0) + _row(O.MUL, 0, 1) + _row(O.GELU, 2, 0)
    args = (x, w, b, [2] * 3, [1] * 3, [1] * 3, [1] * 3, 1, program, [], [scale])
    plan = cu._get_plan(*args)
    y = _conv(x, w, [2] * 3, [1] * 3, [1] * 3, src_layout)
    out = torch.full(plan.shape, float("nan"), device="cuda", dtype=plan.dtype)
    cu._run_pass(ext, plan, y, b, [scale], out)
    assert cu.LAST_PASS_KERNEL == ("lite_transpose" if src_layout == "cl" else "lite")
    want = ops._run_program(y.double() + b.double().view(1, -1, 1, 1, 1), program, [],
                            [scale.double()])
    err = ((out.double() - want).norm() / want.norm()).item()
    assert not torch.isnan(out).any()
    assert err < (1e-6 if dtype == torch.float32 else 8e-3), err


@pytest.mark.cuda
def test_pass_rejects_what_it_does_not_run(ext):
    x = randn(1, 4, 3, 3, 3, seed=1).float().cuda()
    w = randn(4, 8, 3, 3, 3, seed=2).float().cuda()
    y = F.conv_transpose3d(x, w)
    soft = torch.tensor([[int(O.SOFTMAX), 0, 1, -1, 0]], dtype=torch.int32)
    f = torch.zeros(1, 2)
    strides = torch.zeros(0, 5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="does not run SOFTMAX"):
        ext.epilogue_pass(y, None, torch.empty_like(y), [], strides, soft, f, [1, 0])
    relu = torch.tensor([[int(O.RELU), 0, -1, -1, 0]], dtype=torch.int32)
    bad = y.permute(0, 1, 4, 3, 2)  # spatial dimensions that do not collapse to one stride
    with pytest.raises(RuntimeError, match="NCDHW-contiguous or channels_last_3d"):
        ext.epilogue_pass(bad, None, torch.empty_like(y).permute(0, 1, 4, 3, 2), [], strides,
                          relu, f, [1, 0])
    with pytest.raises(RuntimeError, match="float32"):
        ext.epilogue_pass(y, None, torch.empty_like(y, dtype=torch.bfloat16), [], strides, relu,
                          f, [1, 0])


@pytest.mark.cuda
@pytest.mark.parametrize("winner", ["cudnn_pass", "cudnn_channels_last_pass",
                                    "cudnn_channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotune_keeps_a_pass_candidate_when_it_wins(autotune, monkeypatch, winner, dtype):
    """Timings rigged so that ``winner`` is fastest: the op keeps it and gives the reference's
    layout and dtype, within TF32 / bf16 error of float64; later calls reuse the choice."""
    monkeypatch.setattr(cu, "CUDNN_CHANNELS_LAST", True)
    monkeypatch.setattr(cu, "EPILOGUE_PASS", True)
    monkeypatch.setattr(cu, "CUDNN_PASS", True)
    timed = rig_autotune(monkeypatch, winner)
    x = randn(2, 16, 6, 7, 8, seed=21).to(dtype).cuda()
    w = (randn(16, 40, 3, 3, 3, seed=22) / (16 * 27) ** 0.5).to(dtype).cuda()
    b = randn(40, seed=23).to(dtype).cuda()
    side = randn(2, 40, 11, 13, 15, seed=24).to(dtype).cuda()
    program = _row(O.LOAD_TENSOR, 0) + _row(O.ADD, 0, 1) + _row(O.HARDSWISH, 2) + _row(O.MUL, 2, 3)
    args = (x, w, b, [2] * 3, [1] * 3, [0] * 3, [1] * 3, 1, program, [], [side])
    out = OP(*args)
    assert timed == [["fused", "reference", "cudnn_channels_last", "cudnn_channels_last_pass",
                      "cudnn_pass"]]
    assert list(cu.autotune_choices().values()) == [winner]
    eager = ops.reference(*args)
    assert out.shape == eager.shape and out.stride() == eager.stride()
    assert out.dtype == eager.dtype
    ref = ops.reference(*[a.double() if torch.is_tensor(a) else a for a in args])
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (2e-3 if dtype == torch.float32 else 2e-2), err
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(OP(*args), out, rtol=tol, atol=tol)
    assert len(timed) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("pass_on,cudnn_pass", [(False, True), (True, False)])
def test_pass_candidates_off(autotune, monkeypatch, pass_on, cudnn_pass):
    """EPILOGUE_PASS off: neither pass candidate; CUDNN_PASS off (the default): no
    "cudnn_pass", the channels-last candidate in both forms."""
    monkeypatch.setattr(cu, "EPILOGUE_PASS", pass_on)
    monkeypatch.setattr(cu, "CUDNN_PASS", cudnn_pass)
    monkeypatch.setattr(cu, "CUDNN_CHANNELS_LAST", True)
    seen = []
    pick = cu._pick_fastest
    monkeypatch.setattr(cu, "_pick_fastest",
                        lambda cands, *a, **k: (seen.append([n for n, _ in cands]),
                                                pick(cands, *a, **k))[1])
    x = randn(1, 8, 4, 4, 4, seed=31).float().cuda()
    w = randn(8, 16, 3, 3, 3, seed=32).float().cuda() * 0.1
    OP(x, w, None, [1] * 3, [0] * 3, [0] * 3, [1] * 3, 1, _row(O.RELU, 0), [], [])
    want = ["fused", "reference", "cudnn_channels_last"]
    assert seen == [want + (["cudnn_channels_last_pass"] if pass_on else [])]


@pytest.mark.parametrize("shape,stride,want", [
    ((2, 3, 4, 5, 6), (360, 120, 30, 6, 1), True),        # NCDHW contiguous
    ((2, 3, 4, 5, 6), (360, 1, 90, 18, 3), True),         # channels_last_3d
    ((2, 3, 4, 5, 6), (360, 120, 1, 4, 20), False),       # D and W swapped
    ((2, 3, 1, 1, 6), (18, 6, 99, 7, 1), True),           # size-1 dimensions: any stride
    ((2, 3, 4, 5, 6), (720, 240, 60, 12, 2), True),       # every other element along W
])
def test_collapses(shape, stride, want):
    assert cu._collapses(shape, stride) is want


@pytest.mark.cuda
@pytest.mark.parametrize("cout,want", [(1, False), (4, False), (8, True)])
def test_pass_needs_eight_channels(cout, want):
    """The pass candidates are not timed below 8 output channels (its tiles hold 32)."""
    x = randn(1, 8, 4, 4, 4, seed=51).float().cuda()
    w = randn(8, cout, 3, 3, 3, seed=52).float().cuda()
    plan = cu._get_plan(x, w, None, [2] * 3, [1] * 3, [1] * 3, [1] * 3, 1, _row(O.SIGMOID, 0),
                        [], [])
    assert plan.fallback is None and plan.passable is want
