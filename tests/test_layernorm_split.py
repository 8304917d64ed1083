"""Calls whose LayerNorm the kernel cannot run (ct3d_fx/_cuda.py ``_layernorm_split``).

Exact FP32 (no W-line tiles there) and W lines the tiles cannot hold still run the conv and the
ops before the LayerNorm in the fused kernel; the LayerNorm and the ops after it run in PyTorch.
These CPU tests check the program cut: the prefix's result followed by the suffix is the whole
program's result, bit for bit (the same PyTorch ops on the same values), and the calls the cut
must refuse. tests/test_cuda_kernel.py runs the cut calls on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from ct3d_fx import _cuda, ops
from ct3d_fx.ops import Opcode as O

LN_W = 9  # W_out of the calls below: odd, so the W-line tiles (W stride 2) cannot hold it


def _row(op, a=-1, b=-1, c=-1, d=-1, e=-1):
    return [int(op), a, b, c, d, e]


def _call(program_rows, seed=0):
    """(args, extras) of a CPU call with W_out = 9; extras: a per-channel tensor t0, the
    LayerNorm weight t1 and bias t2; scalars: eps 1e-5, then 0.5 and -0.25."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 2, 3, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, 3, 3, 3, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(6, generator=g, dtype=torch.float64)
    extras = [torch.randn(6, 1, 1, 1, generator=g, dtype=torch.float64),
              torch.rand(LN_W, generator=g, dtype=torch.float64) + 0.5,
              torch.randn(LN_W, generator=g, dtype=torch.float64)]
    program = [v for r in program_rows for v in r]
    args = (x, w, b, [2, 2, 2], [1, 1, 1], [0, 0, 0], [1, 1, 1], 1, program, [1e-5, 0.5, -0.25],
            extras)
    assert ops.output_shape(x, w, *args[3:8])[4] == LN_W
    ops.check_args(*args)
    return args


LN = _row(O.LAYER_NORM, 0, 1, 2, 0, LN_W)


def _ln(a, weight=1, bias=2):
    return _row(O.LAYER_NORM, a, weight, bias, 0, LN_W)


CUT = {
    # LayerNorm of the conv output, then gelu and a scalar multiply (KernelBench l2_34)
    "ln_first": [LN, _row(O.GELU, 1, 0), _row(O.LOAD_SCALAR, 1), _row(O.MUL, 2, 3)],
    # a per-channel add, then the LayerNorm without affine (l2_3)
    "add_then_ln": [_row(O.LOAD_TENSOR, 0), _row(O.ADD, 0, 1), _ln(2, -1, -1)],
    # the operand is not the last value before the LayerNorm (a DETACH names it), and a scalar
    # loaded before the LayerNorm is read after it (loaded again in the suffix)
    "operand_not_last": [_row(O.LOAD_SCALAR, 1), _row(O.MUL, 0, 1), _row(O.RELU, 2),
                         _row(O.SIGMOID, 2), _ln(2), _row(O.MUL, 5, 1), _row(O.ADD, 6, 5)],
    # a per-channel tensor loaded before and added after, then a second LayerNorm
    "tensor_after": [_row(O.LOAD_TENSOR, 0), _row(O.TANH, 0), _ln(2, 1, -1), _row(O.ADD, 3, 1),
                     _ln(4, -1, 2), _row(O.LOAD_SCALAR, 2), _row(O.SUB, 5, 6)],
}


@pytest.mark.parametrize("name", sorted(CUT))
def test_prefix_then_suffix_is_the_whole_program(name):
    args = _call(CUT[name])
    split = _cuda._layernorm_split(args[8])
    assert split is not None
    prefix, suffix = split
    assert not any(prefix[i] == O.LAYER_NORM for i in range(0, len(prefix), 6))
    assert suffix[0] == O.LAYER_NORM
    ops.check_program(prefix, len(args[9]), len(args[10]))
    ops.check_program(suffix, len(args[9]), len(args[10]))
    whole = ops.reference(*args)
    y = ops.reference(*args[:8], prefix, *args[9:])
    assert torch.equal(ops._run_program(y, suffix, args[9], args[10]), whole)
    # the CPU path of the cut call (no extension: the prefix runs the reference)
    assert torch.equal(_cuda._run_split(args, split), whole)


def test_cut_shapes():
    prefix, suffix = _cuda._layernorm_split(_call(CUT["ln_first"])[8])
    assert prefix == [] and suffix == [v for r in CUT["ln_first"] for v in r]
    prefix, suffix = _cuda._layernorm_split(_call(CUT["operand_not_last"])[8])
    rows = CUT["operand_not_last"]
    assert prefix == [v for r in rows[:4] for v in r] + _row(O.DETACH, 2)
    # suffix: LN(0), the scalar reloaded (value 2), MUL(1, 2), then ADD of the LN's result
    assert suffix == (_ln(0) + _row(O.LOAD_SCALAR, 1) + _row(O.MUL, 1, 2)
                      + _row(O.ADD, 3, 1))


@pytest.mark.parametrize("rows", [
    [_row(O.RELU, 0)],                                        # no LayerNorm
    [_row(O.RELU, 0), _ln(1), _row(O.ADD, 2, 0)],             # reads the conv output after it
    [_row(O.RELU, 0), _row(O.TANH, 0), _ln(1), _row(O.MUL, 3, 2)],  # a computed earlier value
], ids=["no_ln", "conv_output_after", "computed_value_after"])
def test_cut_refuses(rows):
    assert _cuda._layernorm_split(_call(rows)[8]) is None


def test_blocked_plan_keeps_the_cut():
    """A LayerNorm the W-line tiles cannot hold (odd W_out): the plan names the reason and
    carries the cut; the prefix alone plans as an ordinary fused call."""
    args = _call(CUT["add_then_ln"])
    args = tuple(t.float() if isinstance(t, torch.Tensor) else t for t in args[:3]) + args[3:10] \
        + ([t.float() for t in args[10]],)
    plan = _cuda._make_plan(*args)
    assert plan.fallback is not None and "needs an even W_out" in plan.fallback
    assert plan.ln_split == _cuda._layernorm_split(args[8])
    prefix_plan = _cuda._make_plan(*args[:8], plan.ln_split[0], *args[9:])
    assert prefix_plan.fallback is None and not prefix_plan.wline
