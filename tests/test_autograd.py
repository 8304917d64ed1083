"""Autograd of ``ct3d::conv_transpose3d_epilogue`` on the CPU (reference) path.

gradcheck / gradgradcheck in float64 for every opcode, DAG programs, shared and broadcast extras
and every convolution geometry knob; what the forward saves; torch.library.opcheck with and
without requires_grad; torch.compile(fullgraph=True) forward + backward with zero graph breaks;
a small 3-D U-Net optimized with ct3d_fx.optimize trains like the original (20 Adam steps),
follows train()/eval(), and compiles without graph breaks. Shapes are tiny so that the whole
file runs in well under two minutes on two CPU cores.
"""
from __future__ import annotations

import copy
import dataclasses
import zlib
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import ct3d_fx
from ct3d_fx import ops
from ct3d_fx.ops import Opcode, _run_program

OP = torch.ops.ct3d.conv_transpose3d_epilogue
F64 = torch.float64

# Default geometry: x (2, 2, 2, 2, 2), weight (2, 2, 2, 2, 2) -> y (N, C, D, H, W) = (2, 2, 3, 3, 3)
N, C, Y_SHAPE = 2, 2, (2, 2, 3, 3, 3)


def ins(op: Opcode, a: int = -1, b: int = -1, c: int = -1, d: int = -1, e: int = -1) -> List[int]:
    return [int(op), a, b, c, d, e]


def prog(*instructions: List[int]) -> List[int]:
    return [v for i in instructions for v in i]


@dataclasses.dataclass(frozen=True)
class Extra:
    """One extras entry: a fresh random tensor, or ``same`` = index of an earlier entry."""

    shape: Tuple[int, ...] = ()
    grad: bool = True
    positive: bool = False  # values in [0.5, 1.5) (denominators, variances)
    same: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    program: List[int]
    scalars: List[float] = dataclasses.field(default_factory=list)
    extras: Tuple[Extra, ...] = ()


PER_CHANNEL = (C, 1, 1, 1)
U = ins(Opcode.SILU, 0)  # a nonlinear first step for cases that need one

CASES = [
    Case("load_scalar_add", prog(ins(Opcode.LOAD_SCALAR, 0), ins(Opcode.ADD, 0, 1)), [0.75]),
    Case("load_tensor_per_channel_add", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.ADD, 0, 1)),
         extras=(Extra(PER_CHANNEL),)),
    Case("load_tensor_full_shape_sub", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.SUB, 1, 0)),
         extras=(Extra(Y_SHAPE),)),
    Case("load_tensor_0d_mul", prog(U, ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.MUL, 1, 2)),
         extras=(Extra(()),)),
    Case("load_tensor_last_dim_div", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.DIV, 0, 1)),
         extras=(Extra((3,), positive=True),)),
    Case("extra_enlarges_output", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.MUL, 0, 1)),
         extras=(Extra((3, 1, 1, 1, 1, 1)),)),
    Case("mul_reuses_value", prog(ins(Opcode.MUL, 0, 0))),
    Case("div_value_by_value", prog(ins(Opcode.SIGMOID, 0), ins(Opcode.LOAD_SCALAR, 0),
                                    ins(Opcode.ADD, 1, 2), ins(Opcode.DIV, 0, 3)), [0.5]),
    Case("neg", prog(ins(Opcode.NEG, 0))),
    Case("detach_stops_gradient", prog(ins(Opcode.DETACH, 0), ins(Opcode.ADD, 0, 1))),
    Case("detach_in_product", prog(ins(Opcode.SIGMOID, 0), ins(Opcode.DETACH, 1),
                                   ins(Opcode.MUL, 0, 2))),
    Case("abs", prog(ins(Opcode.ABS, 0))),
    Case("square", prog(ins(Opcode.SQUARE, 0))),
    Case("relu", prog(ins(Opcode.RELU, 0))),
    Case("leaky_relu", prog(ins(Opcode.LEAKY_RELU, 0, 0)), [0.1]),
    Case("prelu_1", prog(ins(Opcode.PRELU, 0, 0)), extras=(Extra((1,)),)),
    Case("prelu_c", prog(ins(Opcode.PRELU, 0, 0)), extras=(Extra((C,)),)),
    Case("elu", prog(ins(Opcode.ELU, 0, 0)), [0.7]),
    Case("celu", prog(ins(Opcode.CELU, 0, 0)), [1.3]),
    Case("selu", prog(ins(Opcode.SELU, 0))),
    Case("gelu_erf", prog(ins(Opcode.GELU, 0, 0))),
    Case("gelu_tanh", prog(ins(Opcode.GELU, 0, 1))),
    Case("silu", prog(ins(Opcode.SILU, 0))),
    Case("mish", prog(ins(Opcode.MISH, 0))),
    Case("hardswish", prog(ins(Opcode.HARDSWISH, 0))),
    Case("hardsigmoid", prog(ins(Opcode.HARDSIGMOID, 0))),
    Case("hardtanh", prog(ins(Opcode.HARDTANH, 0, 0, 1)), [-1.0, 1.5]),
    Case("sigmoid", prog(ins(Opcode.SIGMOID, 0))),
    Case("tanh", prog(ins(Opcode.TANH, 0))),
    Case("softplus", prog(ins(Opcode.SOFTPLUS, 0, 0, 1)), [2.0, 3.0]),
    Case("clamp_both", prog(ins(Opcode.CLAMP, 0, 0, 1)), [-0.5, 1.0]),
    Case("clamp_min", prog(ins(Opcode.CLAMP, 0, 0, -1)), [-0.5]),
    Case("clamp_max", prog(ins(Opcode.CLAMP, 0, -1, 0)), [0.5]),
    Case("batch_norm_affine", prog(ins(Opcode.BATCH_NORM, 0, 0, 1, 0)), [1e-5],
         (Extra((C,), grad=False), Extra((C,), grad=False, positive=True), Extra((C,)),
          Extra((C,)))),
    Case("batch_norm_plain", prog(ins(Opcode.BATCH_NORM, 0, 0, 0, 0)), [1e-3],
         (Extra((C,), grad=False), Extra((C,), grad=False, positive=True))),
    Case("softmax", prog(ins(Opcode.SOFTMAX, 0, 0, 1))),
    Case("log_softmax", prog(ins(Opcode.SOFTMAX, 0, 1, -4))),
    # softmax of a per-channel-scaled value, times the conv output
    Case("softmax_in_dag", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.MUL, 0, 1),
                                ins(Opcode.SOFTMAX, 2, 0, 1), ins(Opcode.MUL, 3, 0)),
         extras=(Extra(PER_CHANNEL),)),
    # LayerNorm over W (= 3): weight t0 / bias t1 or absent (-1), eps s0, size 3
    Case("layer_norm_affine", prog(ins(Opcode.LAYER_NORM, 0, 0, 1, 0, 3)), [1e-5],
         (Extra((3,)), Extra((3,)))),
    Case("layer_norm_plain", prog(ins(Opcode.LAYER_NORM, 0, -1, -1, 0, 3)), [1e-3]),
    Case("layer_norm_weight_only", prog(ins(Opcode.LAYER_NORM, 0, 0, -1, 0, 3)), [0.1],
         (Extra((3,)),)),
    Case("layer_norm_bias_only", prog(ins(Opcode.LAYER_NORM, 0, -1, 0, 0, 3)), [1e-5],
         (Extra((3,)),)),
    # LayerNorm of a per-channel-scaled value, GELU, times the conv output
    Case("layer_norm_in_dag", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.MUL, 0, 1),
                                   ins(Opcode.LAYER_NORM, 2, 1, 2, 0, 3), ins(Opcode.GELU, 3, 0),
                                   ins(Opcode.MUL, 4, 0)), [1e-5],
         (Extra(PER_CHANNEL), Extra((3,)), Extra((3,)))),
    # v1=sigmoid(v0) v2=v0*v1 v3=v2+v0 v4=t0 v5=v3*v4 v6=tanh(v5) v7=v6-v1 v8=prelu(v7, t1)
    Case("dag_reuses_values", prog(ins(Opcode.SIGMOID, 0), ins(Opcode.MUL, 0, 1),
                                   ins(Opcode.ADD, 2, 0), ins(Opcode.LOAD_TENSOR, 0),
                                   ins(Opcode.MUL, 3, 4), ins(Opcode.TANH, 5),
                                   ins(Opcode.SUB, 6, 1), ins(Opcode.PRELU, 7, 1)),
         extras=(Extra(PER_CHANNEL), Extra((C,)))),
    # The same tensor at two extras positions: its gradient must be the sum of both uses.
    Case("dag_shared_extra", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.MUL, 0, 1),
                                  ins(Opcode.LOAD_TENSOR, 1), ins(Opcode.ADD, 2, 3),
                                  ins(Opcode.ELU, 4, 0)), [1.0],
         (Extra(PER_CHANNEL), Extra(same=0))),
    # Linear epilogue: y * scale + shift (the backward uses a stand-in for y when it can).
    Case("linear_affine", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.MUL, 0, 1),
                               ins(Opcode.LOAD_TENSOR, 1), ins(Opcode.ADD, 2, 3)),
         extras=(Extra(PER_CHANNEL), Extra(Y_SHAPE))),
]


def _rand(gen: torch.Generator, shape: Sequence[int], positive: bool = False) -> torch.Tensor:
    if positive:
        return torch.rand(shape, generator=gen, dtype=F64) + 0.5
    return torch.randn(shape, generator=gen, dtype=F64)


def make_extras(case: Case, gen: torch.Generator) -> Tuple[List[torch.Tensor], list]:
    """(unique leaf tensors, layout): layout[i] is the index in the leaves of extras[i]."""
    leaves: List[torch.Tensor] = []
    layout = []
    for e in case.extras:
        if e.same is not None:
            layout.append(layout[e.same])
            continue
        layout.append(len(leaves))
        leaves.append(_rand(gen, e.shape, e.positive))
    return leaves, layout


def conv_inputs(gen, x_shape=(N, 2, 2, 2, 2), w_shape=(2, C, 2, 2, 2), bias=True, groups=1):
    """x (N, C_in, D, H, W), weight (C_in, C_out/groups, kD, kH, kW), bias (C_out,) or None."""
    x = _rand(gen, x_shape)
    w = _rand(gen, w_shape) * 0.5
    b = _rand(gen, (w_shape[1] * groups,)) if bias else None
    return x, w, b


GEOMETRY_DEFAULT = dict(stride=[1, 1, 1], padding=[0, 0, 0], output_padding=[0, 0, 0],
                        dilation=[1, 1, 1], groups=1)


def make_fn(case: Case, layout, geometry=None):
    """A function of (x, weight, bias, *unique extras) calling the op once."""
    g = dict(GEOMETRY_DEFAULT, **(geometry or {}))

    def fn(x, w, b, *leaves):
        extras = [leaves[i] for i in layout]
        return OP(x, w, b, g["stride"], g["padding"], g["output_padding"], g["dilation"],
                  g["groups"], case.program, case.scalars, extras)
    return fn


def _grad_flags(case: Case, mode: str) -> Tuple[bool, List[bool]]:
    """(conv tensors require grad, per unique extra) for a requires_grad mode."""
    uniq = [e for e in case.extras if e.same is None]
    conv = mode in ("all", "conv_only")
    extra = [e.grad and mode in ("all", "extras_only") for e in uniq]
    return conv, extra


def _modes(case: Case):
    out = ["all", "conv_only"]
    if any(e.grad for e in case.extras if e.same is None):
        out.append("extras_only")
    return out


def test_cases_cover_every_opcode():
    used = {Opcode(c.program[i]) for c in CASES for i in range(0, len(c.program), 6)}
    assert used == set(Opcode), f"opcodes without a gradcheck case: {set(Opcode) - used}"


@pytest.mark.parametrize("case,mode", [pytest.param(c, m, id=f"{c.name}-{m}")
                                       for c in CASES for m in _modes(c)])
def test_gradcheck_opcode(case: Case, mode: str):
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    x, w, b = conv_inputs(gen)
    leaves, layout = make_extras(case, gen)
    conv, extra = _grad_flags(case, mode)
    for t in (x, w, b):
        t.requires_grad_(conv)
    for t, r in zip(leaves, extra):
        t.requires_grad_(r)
    if Opcode.DETACH in case.program[::6]:
        # Finite differences see through detach (the values are the same), so gradcheck cannot
        # judge it: compare with autograd through the reference, which detaches for real.
        inputs = [t for t in (x, w, b, *leaves) if t.requires_grad]
        g = dict(GEOMETRY_DEFAULT)
        ref = ops.reference(x, w, b, g["stride"], g["padding"], g["output_padding"],
                            g["dilation"], g["groups"], case.program, case.scalars,
                            [leaves[i] for i in layout])
        out = make_fn(case, layout)(x, w, b, *leaves)
        gy = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        got = torch.autograd.grad(out, inputs, gy, allow_unused=True)
        want = torch.autograd.grad(ref, inputs, gy, allow_unused=True)
        for a, e in zip(got, want):
            if e is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        return
    assert torch.autograd.gradcheck(make_fn(case, layout), (x, w, b, *leaves))


GEOMETRIES = {
    "stride": dict(stride=[2, 1, 3]),
    "padding": dict(padding=[1, 0, 1], w=(2, C, 3, 2, 3)),
    "output_padding": dict(stride=[2, 2, 3], output_padding=[1, 0, 2]),
    "dilation": dict(dilation=[2, 1, 3]),
    "groups": dict(groups=2, x=(N, 4, 2, 2, 2), w=(4, 1, 2, 2, 2)),
    "no_bias": dict(bias=False),
    "all_at_once": dict(stride=[2, 1, 2], padding=[1, 0, 0], output_padding=[1, 0, 1],
                        dilation=[2, 1, 2], groups=2, bias=False, x=(N, 4, 2, 2, 2),
                        w=(4, 1, 3, 2, 2)),
}
GEOMETRY_PROGRAMS = {
    "empty": Case("empty", []),
    "prelu_c": Case("prelu_c", prog(ins(Opcode.PRELU, 0, 0)), extras=(Extra((C,)),)),
}


@pytest.mark.parametrize("program", list(GEOMETRY_PROGRAMS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_gradcheck_geometry(geometry: str, program: str):
    spec = dict(GEOMETRIES[geometry])
    x_shape = spec.pop("x", (N, 2, 2, 2, 2))
    w_shape = spec.pop("w", (2, C, 2, 2, 2))
    bias = spec.pop("bias", True)
    gen = torch.Generator().manual_seed(7)
    x, w, b = conv_inputs(gen, x_shape, w_shape, bias, spec.get("groups", 1))
    case = GEOMETRY_PROGRAMS[program]
    leaves, layout = make_extras(case, gen)
    inputs = [t.requires_grad_() for t in (x, w, b, *leaves) if t is not None]
    fn = make_fn(case, layout, spec)
    if b is None:
        assert torch.autograd.gradcheck(lambda x, w, *e: fn(x, w, None, *e), inputs)
    else:
        assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_channels_last_input():
    gen = torch.Generator().manual_seed(3)
    x, w, b = conv_inputs(gen)
    x = x.to(memory_format=torch.channels_last_3d)
    case = GEOMETRY_PROGRAMS["prelu_c"]
    leaves, layout = make_extras(case, gen)
    inputs = [t.requires_grad_() for t in (x, w, b, *leaves)]
    assert torch.autograd.gradcheck(make_fn(case, layout), inputs)


# Double backward: a smaller geometry, y = (1, 2, 3, 2, 3).
GRADGRAD = ["dag_reuses_values", "linear_affine", "batch_norm_affine", "prelu_c", "softplus",
            "layer_norm_affine"]


@pytest.mark.parametrize("name", GRADGRAD + ["empty"])
def test_gradgradcheck(name: str):
    case = GEOMETRY_PROGRAMS["empty"] if name == "empty" else \
        next(c for c in CASES if c.name == name)
    case = dataclasses.replace(case, extras=tuple(
        dataclasses.replace(e, shape=(1, 2, 3, 2, 3)) if e.shape == Y_SHAPE else e
        for e in case.extras))
    gen = torch.Generator().manual_seed(11)
    x, w, b = conv_inputs(gen, (1, 2, 2, 1, 2), (2, C, 2, 2, 2))
    leaves, layout = make_extras(case, gen)
    _, extra = _grad_flags(case, "all")
    for t in (x, w, b):
        t.requires_grad_()
    for t, r in zip(leaves, extra):
        t.requires_grad_(r)
    assert torch.autograd.gradgradcheck(make_fn(case, layout), (x, w, b, *leaves))


@pytest.mark.parametrize("program,needs,expected", [
    # Nonlinear epilogue: y is recomputed in backward, so input, weight, bias are kept.
    ("silu", "x", ["x", "w", "b"]),
    # Empty program: grad_input needs only the weight, grad_weight only the input.
    ("empty", "x", [None, "w", None]),
    ("empty", "w", ["x", None, None]),
    ("empty", "b", [None, None, None]),
    # y * scale + shift: d/dinput, d/dweight never read y's values, d/dscale does.
    ("linear", "xwb", ["x", "w", None, "t", "t"]),
    ("linear", "t", ["x", "w", "b", "t", "t"]),
    # y + shift: no gradient reads y's values.
    ("shift", "xwb", ["x", "w", None, "t"]),
    ("shift", "t", [None, None, None, "t"]),
])
def test_saves_only_what_backward_needs(program, needs, expected):
    gen = torch.Generator().manual_seed(5)
    x, w, b = conv_inputs(gen)
    case = {"silu": Case("silu", prog(U)), "empty": Case("empty", []),
            "linear": next(c for c in CASES if c.name == "linear_affine"),
            "shift": next(c for c in CASES if c.name == "load_tensor_full_shape_sub")}[program]
    leaves, layout = make_extras(case, gen)
    for name, t in (("x", x), ("w", w), ("b", b)):
        t.requires_grad_(name in needs)
    for t in leaves:
        t.requires_grad_("t" in needs)
    out = make_fn(case, layout)(x, w, b, *leaves)
    names = {x.data_ptr(): "x", w.data_ptr(): "w", b.data_ptr(): "b"}
    got = [None if s is None else names.get(s.data_ptr(), "t") for s in out.grad_fn.saved_tensors]
    assert got == expected
    grads = torch.autograd.grad(out.square().sum(), [t for t in (x, w, b, *leaves)
                                                     if t.requires_grad])
    ref_inputs = [t.detach().requires_grad_(t.requires_grad) for t in (x, w, b, *leaves)]
    ref = _reference(case, layout, *ref_inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), [t for t in ref_inputs if t.requires_grad])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv_needs,extra_needs,expected", [
    (True, [False, False], True),     # d/dx reads x
    (False, [True, False], True),     # d/dweight reads the normalized x
    (False, [True, True], True),
    (False, [False, True], False),    # d/dbias is the sum of the output gradient
    (False, [False, False], False),
])
def test_layer_norm_needs_conv_output(conv_needs, extra_needs, expected):
    from ct3d_fx._autograd import _needs_conv_output
    program = prog(ins(Opcode.LAYER_NORM, 0, 0, 1, 0, 3))
    assert _needs_conv_output(program, conv_needs, extra_needs) is expected
    # absent weight/bias (-1) are not looked up; a later nonlinear op on the result reads y
    plain = prog(ins(Opcode.LAYER_NORM, 0, -1, -1, 0, 3))
    assert _needs_conv_output(plain, conv_needs, []) is conv_needs
    later = prog(ins(Opcode.LAYER_NORM, 0, 0, 1, 0, 3), ins(Opcode.TANH, 1))
    assert _needs_conv_output(later, conv_needs, extra_needs) is (conv_needs or any(extra_needs))


@pytest.mark.parametrize("needs,saved", [
    ("bias", [None, None, None, "t", "t"]),        # y is not recomputed: a stand-in serves
    ("weight", ["x", "w", "b", "t", "t"]),
    ("conv", ["x", "w", "b", "t", "t"]),
])
def test_layer_norm_backward_saves_and_matches(needs, saved):
    """Only the LN bias needs a gradient: no recomputation of y; every case equals eager."""
    gen = torch.Generator().manual_seed(53)
    x, w, b = conv_inputs(gen)
    case = next(c for c in CASES if c.name == "layer_norm_affine")
    lw, lb = _rand(gen, (3,)), _rand(gen, (3,))
    for t in (x, w, b):
        t.requires_grad_(needs == "conv")
    lw.requires_grad_(needs == "weight")
    lb.requires_grad_(needs == "bias")
    out = make_fn(case, [0, 1])(x, w, b, lw, lb)
    names = {x.data_ptr(): "x", w.data_ptr(): "w", b.data_ptr(): "b"}
    got = [None if t is None else names.get(t.data_ptr(), "t") for t in out.grad_fn.saved_tensors]
    assert got == saved
    wrt = [t for t in (x, w, b, lw, lb) if t.requires_grad]
    gy = torch.randn(out.shape, generator=gen, dtype=F64)
    grads = torch.autograd.grad(out, wrt, gy)
    ref_in = [t.detach().requires_grad_(t.requires_grad) for t in (x, w, b, lw, lb)]
    ref = _reference(case, [0, 1], *ref_in)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_in if t.requires_grad], gy)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def _reference(case: Case, layout, x, w, b, *leaves, geometry=None):
    """Eager autograd through F.conv_transpose3d and the reference interpreter."""
    g = dict(GEOMETRY_DEFAULT, **(geometry or {}))
    y = F.conv_transpose3d(x, w, b, g["stride"], g["padding"], g["output_padding"],
                           g["groups"], g["dilation"])
    return _run_program(y, case.program, case.scalars, [leaves[i] for i in layout])


@pytest.mark.parametrize("shape,out_dtype", [((), torch.float32), ((1,), F64)])
def test_float32_input_with_float64_extra_matches_eager(shape, out_dtype):
    """Type promotion: a float64 0-d tensor keeps the float32 output, a (1,) one promotes it."""
    gen = torch.Generator().manual_seed(13)
    x, w, b = (t.float().requires_grad_() for t in conv_inputs(gen))
    s = (torch.rand(shape, generator=gen, dtype=F64) + 1).requires_grad_()
    case = Case("mul_extra", prog(ins(Opcode.LOAD_TENSOR, 0), ins(Opcode.MUL, 0, 1),
                                  ins(Opcode.GELU, 2, 0)), extras=(Extra(shape),))
    out = make_fn(case, [0])(x, w, b, s)
    assert out.dtype == out_dtype
    grads = torch.autograd.grad(out.sum(), (x, w, b, s))
    ref_in = [t.detach().requires_grad_() for t in (x, w, b, s)]
    ref_grads = torch.autograd.grad(_reference(case, [0], *ref_in).sum(), ref_in)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r)


def test_batch_norm_running_stat_requiring_grad_raises_like_pytorch():
    gen = torch.Generator().manual_seed(17)
    x, w, b = conv_inputs(gen)
    mean, var = _rand(gen, (C,)).requires_grad_(), _rand(gen, (C,), positive=True)
    program = prog(ins(Opcode.BATCH_NORM, 0, 0, 0, 0))
    with pytest.raises(RuntimeError, match="running_mean"):
        F.batch_norm(x, mean, var, None, None, False, 0.0, 1e-5)
    with pytest.raises(RuntimeError, match=r"BATCH_NORM\) running_mean extras\[0\] requires grad"):
        OP(x, w, b, [1] * 3, [0] * 3, [0] * 3, [1] * 3, 1, program, [1e-5], [mean, var])
    # Without grad mode nothing is recorded, so the same call is fine.
    with torch.no_grad():
        OP(x, w, b, [1] * 3, [0] * 3, [0] * 3, [1] * 3, 1, program, [1e-5], [mean, var])


# ---------------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake tensor, AOT dispatch with dynamic shapes.

OPCHECK_SAMPLES = {
    "prelu_c": (next(c for c in CASES if c.name == "prelu_c"), {}),
    "batch_norm_affine": (next(c for c in CASES if c.name == "batch_norm_affine"), {}),
    "dag_full_shape_shared": (next(c for c in CASES if c.name == "dag_shared_extra"), {}),
    "linear_full_shape": (next(c for c in CASES if c.name == "linear_affine"), {}),
    "scalar_0d": (next(c for c in CASES if c.name == "load_tensor_0d_mul"), {}),
    "empty_geometry": (Case("empty", []), dict(stride=[2, 1, 2], output_padding=[1, 0, 0],
                                               dilation=[1, 2, 1])),
}


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
def test_opcheck(sample: str, requires_grad: bool):
    case, geometry = OPCHECK_SAMPLES[sample]
    g = dict(GEOMETRY_DEFAULT, **geometry)
    gen = torch.Generator().manual_seed(19)
    x, w, b = conv_inputs(gen)
    leaves, layout = make_extras(case, gen)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    _, extra = _grad_flags(case, "all")
    for t, r in zip(leaves, extra):
        t.requires_grad_(requires_grad and r)
    args = (x, w, b, g["stride"], g["padding"], g["output_padding"], g["dilation"], g["groups"],
            case.program, case.scalars, [leaves[i] for i in layout])
    torch.library.opcheck(OP.default, args)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): forward and backward, zero graph breaks, grads equal eager.

def _recording_backend():
    """An aot_eager-like torch.compile backend that keeps the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


@pytest.mark.parametrize("mode", ["all", "extras_only"])
@pytest.mark.parametrize("name", ["dag_reuses_values", "batch_norm_affine", "linear_affine"])
def test_compile_fullgraph_forward_backward(name: str, mode: str):
    case = next(c for c in CASES if c.name == name)
    gen = torch.Generator().manual_seed(23)
    x, w, b = conv_inputs(gen)
    leaves, layout = make_extras(case, gen)
    conv, extra = _grad_flags(case, mode)
    for t in (x, w, b):
        t.requires_grad_(conv)
    for t, r in zip(leaves, extra):
        t.requires_grad_(r)
    inputs = (x, w, b, *leaves)
    wrt = [t for t in inputs if t.requires_grad]
    fn = make_fn(case, layout)

    def loss_fn(*args):
        return (fn(*args) * torch.linspace(-1, 1, 3, dtype=F64)).sum()

    torch._dynamo.reset()
    counters.clear()
    backend, graphs = _recording_backend()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(*inputs), wrt)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    # The backward was traced too: the transposed convolution's gradients are in its graph.
    assert len(graphs["backward"]) == 1
    assert "aten.convolution_backward" in graphs["backward"][0].code or mode == "extras_only"
    want = torch.autograd.grad(loss_fn(*inputs), wrt)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


class _Decoder(torch.nn.Module):
    """A parameterised block calling the op: conv_transpose3d + BN(eval, affine) + PReLU."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(29)
        self.weight = torch.nn.Parameter(_rand(gen, (2, C, 2, 2, 2)) * 0.5)
        self.bias = torch.nn.Parameter(_rand(gen, (C,)))
        self.bn_weight = torch.nn.Parameter(_rand(gen, (C,)))
        self.bn_bias = torch.nn.Parameter(_rand(gen, (C,)))
        self.register_buffer("running_mean", _rand(gen, (C,)))
        self.register_buffer("running_var", _rand(gen, (C,), positive=True))
        self.prelu = torch.nn.Parameter(_rand(gen, (C,)) * 0.3)
        self.program = prog(ins(Opcode.BATCH_NORM, 0, 0, 1, 0), ins(Opcode.PRELU, 1, 4))

    def forward(self, x):
        return OP(x, self.weight, self.bias, [2, 2, 2], [0] * 3, [1, 0, 1], [1] * 3, 1,
                  self.program, [1e-5], [self.running_mean, self.running_var, self.bn_weight,
                                         self.bn_bias, self.prelu])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_module_training_step(backend: str):
    """A compiled module's SGD step equals the eager module's (params, grads, loss)."""
    eager, compiled_mod = _Decoder(), _Decoder()
    x = _rand(torch.Generator().manual_seed(31), (N, 2, 2, 3, 2))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_mod, fullgraph=True, backend=backend)
    for model, fwd in ((eager, eager), (compiled_mod, compiled)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            fwd(x).square().mean().backward()
            opt.step()
    assert dict(counters["graph_break"]) == {}
    for (name, p), q in zip(eager.named_parameters(), compiled_mod.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name}.grad: {m}")


# ---------------------------------------------------------------------------------------------
# Whole model: ct3d_fx.optimize(model) trains like the original (CPU, float64). The CUDA file
# runs the same helpers on the GPU in float32 and float64.

class TinyUNet3d(torch.nn.Module):
    """A two-level 3-D U-Net with two fusable ConvTranspose3d sites.

    ``forward(x)``: x (N, 2, D, H, W) with D, H, W even; returns (N, 3, D, H, W), x's dtype.
    Site ``up``: ConvTranspose3d(stride 2) -> [BatchNorm3d when ``norm``] -> PReLU(C) -> + skip
    (a full-shape side input). Site ``up2``: grouped ConvTranspose3d(k3, pad 1) -> * 0.5 -> GELU.
    """

    def __init__(self, c: int = 4, norm: bool = False):
        super().__init__()
        nn = torch.nn
        self.enc = nn.Conv3d(2, c, 3, padding=1)
        self.down = nn.Conv3d(c, 2 * c, 2, stride=2)
        self.mid = nn.Conv3d(2 * c, 2 * c, 3, padding=1)
        self.up = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.up_norm = nn.BatchNorm3d(c) if norm else nn.Identity()
        self.up_act = nn.PReLU(c)
        self.up2 = nn.ConvTranspose3d(c, c, 3, padding=1, groups=2)
        self.head = nn.Conv3d(c, 3, 1)

    def forward(self, x):
        e = F.silu(self.enc(x))
        m = F.leaky_relu(self.mid(torch.relu(self.down(e))), 0.1)
        u = self.up_act(self.up_norm(self.up(m))) + e
        u = F.gelu(self.up2(u) * 0.5)
        return self.head(u)


def make_unet(norm: bool = False, dtype=F64, device="cpu", seed: int = 37) -> TinyUNet3d:
    """A TinyUNet3d with random weights, PReLU slopes and BatchNorm statistics/affine."""
    torch.manual_seed(seed)
    model = TinyUNet3d(norm=norm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.up_act.weight.copy_(torch.rand(model.up_act.weight.shape, generator=gen) * 0.4)
        if norm:
            bn = model.up_norm
            for t, lo in ((bn.weight, 0.5), (bn.bias, -0.5), (bn.running_mean, -0.3),
                          (bn.running_var, 0.5)):
                t.copy_(torch.rand(t.shape, generator=gen) + lo)
    return model.to(device=device, dtype=dtype)


class FusedOpCounter(TorchDispatchMode):
    """Counts calls of the fused op that reach the kernels (forward and backward recompute)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is OP.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def fused_sites(gm) -> List[str]:
    return [s.fqn for s in gm.ct3d_report.sites if s.status == "fused"]


def train_side_by_side(eager, optimized, params_eager, params_opt, x, target, steps: int,
                       lr: float = 1e-2) -> Tuple[List[float], List[float]]:
    """Adam on each model for ``steps`` steps on the same batch; the two loss curves."""
    opt_e = torch.optim.Adam(params_eager, lr=lr)
    opt_o = torch.optim.Adam(params_opt, lr=lr)
    losses_e, losses_o = [], []
    for _ in range(steps):
        for model, opt, losses in ((eager, opt_e, losses_e), (optimized, opt_o, losses_o)):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses_e, losses_o


def test_optimized_unet_trains_like_eager_with_original_parameters():
    """20 Adam steps: the optimizer holds the ORIGINAL model's parameters and trains the
    optimized module; losses and final weights equal eager's (float64)."""
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(2, 2, 8, 8, 8, generator=gen, dtype=F64)
    target = torch.randn(2, 3, 8, 8, 8, generator=gen, dtype=F64)
    model = make_unet()
    eager = copy.deepcopy(model)
    optimized = ct3d_fx.optimize(model, (x,))
    assert fused_sites(optimized) == ["up", "up2"], str(optimized.ct3d_report)
    with FusedOpCounter() as count:
        optimized(x).sum().backward()
    assert count.calls == 4  # 2 sites x (forward + recompute in backward)
    for p in model.parameters():
        p.grad = None
    losses_e, losses_o = train_side_by_side(eager, optimized, list(eager.parameters()),
                                            list(model.parameters()), x, target, steps=20)
    torch.testing.assert_close(losses_o, losses_e, rtol=1e-9, atol=0)
    assert losses_o[-1] < 0.9 * losses_o[0], losses_o  # it did train
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-12, atol=1e-12)


def test_optimized_unet_follows_train_and_eval():
    """BatchNorm site: fused in eval, unfused (batch statistics) in train, like the original."""
    gen = torch.Generator().manual_seed(43)
    x = torch.randn(2, 2, 8, 8, 8, generator=gen, dtype=F64)
    model = make_unet(norm=True).eval()
    eager = copy.deepcopy(model)
    optimized = ct3d_fx.optimize(model, (x,))
    assert fused_sites(optimized) == ["up", "up2"], str(optimized.ct3d_report)
    for mode in ("train", "eval", "train", "eval"):
        getattr(optimized, mode)()
        getattr(eager, mode)()
        with FusedOpCounter() as count:
            out_o = optimized(x)
        out_e = eager(x)
        assert count.calls == (1 if mode == "train" else 2), mode
        torch.testing.assert_close(out_o, out_e, rtol=1e-10, atol=1e-12)
        go = torch.autograd.grad(out_o.square().sum(), list(model.parameters()))
        ge = torch.autograd.grad(out_e.square().sum(), list(eager.parameters()))
        for (name, _), a, b in zip(eager.named_parameters(), go, ge):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11,
                                       msg=lambda m: f"{mode} {name}.grad: {m}")
        for name, buf in eager.named_buffers():
            torch.testing.assert_close(model.get_buffer(name), buf, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{mode} buffer {name}: {m}")


def test_compile_optimized_unet_fullgraph():
    """torch.compile(optimize(model), fullgraph=True): no graph break, grads equal eager's."""
    gen = torch.Generator().manual_seed(47)
    x = torch.randn(2, 2, 8, 8, 8, generator=gen, dtype=F64)
    model = make_unet(norm=True).eval()
    eager = copy.deepcopy(model)
    optimized = ct3d_fx.optimize(model, (x,))
    torch._dynamo.reset()
    counters.clear()
    backend, graphs = _recording_backend()
    compiled = torch.compile(optimized, fullgraph=True, backend=backend)
    compiled(x).square().mean().backward()
    assert dict(counters["graph_break"]) == {}
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1
    assert "ct3d.conv_transpose3d_epilogue" in graphs["forward"][0].code
    eager(x).square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}.grad: {m}")


# ---------------------------------------------------------------------------------------------
# LayerNorm over W through ct3d_fx.optimize: the gradients of the input, the conv's weight and
# bias and the LayerNorm's own weight and bias equal the original model's (the CPU path is the
# reference, so this checks the encoding and which gradients read y).

class _ConvLayerNorm(torch.nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        nn = torch.nn
        self.up = nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.ln = nn.LayerNorm(10, eps=1e-3)
        self.scale = nn.Parameter(torch.empty(6, 1, 1, 1))
        self.spelling = spelling

    def forward(self, x):
        y = self.up(x)
        if self.spelling == "module":
            y = self.ln(y)
        else:
            y = F.layer_norm(y, (10,), self.ln.weight, self.ln.bias, 1e-3)
        return F.gelu(y) * self.scale


@pytest.mark.parametrize("spelling", ["module", "functional"])
@pytest.mark.parametrize("wrt", ["all", "ln.weight", "ln.bias", "input"])
def test_optimized_layer_norm_gradients_equal_eager(wrt: str, spelling: str):
    gen = torch.Generator().manual_seed(59)
    model = _ConvLayerNorm(spelling).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
    eager = copy.deepcopy(model)
    x = torch.randn(2, 4, 3, 4, 5, generator=gen, dtype=F64)
    optimized = ct3d_fx.optimize(model, (x,))
    site = optimized.ct3d_report.sites[0]
    name = "LayerNorm" if spelling == "module" else "layer_norm"
    assert site.chain == ["ConvTranspose3d", name, "gelu", "mul"], str(optimized.ct3d_report)
    for m in (model, eager):
        for n, p in m.named_parameters():
            p.requires_grad_(wrt == "all" or n == wrt)
    xo = x.clone().requires_grad_(wrt in ("all", "input"))
    xe = x.clone().requires_grad_(wrt in ("all", "input"))
    gy = torch.randn(2, 6, 6, 8, 10, generator=gen, dtype=F64)
    with FusedOpCounter() as count:
        out = optimized(xo)
        (out * gy).sum().backward()
    # the forward and the recomputation of y (also for the LN bias alone: gelu's derivative
    # reads the LayerNorm's output)
    assert count.calls == 2
    (eager(xe) * gy).sum().backward()
    assert (xo.grad is None) == (xe.grad is None)
    if xe.grad is not None:
        torch.testing.assert_close(xo.grad, xe.grad, rtol=1e-10, atol=1e-12)
    for (n, p), q in zip(eager.named_parameters(), model.parameters()):
        assert (q.grad is None) == (p.grad is None), n
        if p.grad is not None:
            assert p.grad.abs().max() > 0, n
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{n}.grad: {m}")
