"""The autotune's cuDNN channels_last_3d candidate (ct3d_fx/_cuda.py ``_reference_channels_last``)
on the CPU: the same values as the reference, in the layout the fused kernel allocates, with the
user's cudnn.benchmark flag left as it was. tests/test_cuda_autotune.py runs it on the GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ct3d_fx import _cuda, ops
from ct3d_fx.ops import Opcode as O


def _args(seed=0, groups=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 4, 5, generator=g, dtype=dtype)
    w = torch.randn(4, 6 // groups, 3, 2, 3, generator=g, dtype=dtype) * 0.3
    b = torch.randn(6, generator=g, dtype=dtype)
    t0 = torch.randn(6, 1, 1, 1, generator=g, dtype=dtype)
    program = [int(O.LOAD_TENSOR), 0, -1, -1, -1, -1, int(O.ADD), 0, 1, -1, -1, -1,
               int(O.LEAKY_RELU), 2, 0, -1, -1, -1]
    return (x, w, b, [2, 1, 2], [1, 0, 1], [1, 0, 0], [1, 1, 1], groups, program, [0.1], [t0])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bench_flag", [False, True])
def test_same_values_and_layout_as_the_reference(groups, bench_flag, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", bench_flag)
    args = _args(groups=groups)
    ref = ops.reference(*args)
    contiguous = torch.empty(ref.shape, dtype=ref.dtype).stride()
    out = _cuda._reference_channels_last(args, tuple(ref.shape), contiguous, ref.dtype)
    assert out.stride() == contiguous and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.backends.cudnn.benchmark is bench_flag


def test_result_dtype_and_strides_follow_the_plan(monkeypatch):
    """The result is written into the plan's allocation: here float32 with the strides of a
    channels-last output (what the kernel allocates for a channels-last input)."""
    args = _args()
    ref = ops.reference(*args)
    cl = torch.empty(ref.shape, dtype=torch.float32).contiguous(
        memory_format=torch.channels_last_3d).stride()
    out = _cuda._reference_channels_last(args, tuple(ref.shape), cl, torch.float32)
    assert out.stride() == cl and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)


def test_the_benchmark_flag_is_restored_when_the_conv_raises(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    x, w, *rest = _args()
    bad = (x, w[:, :, :, :, :1].transpose(0, 1), *rest)  # wrong C_in: conv_transpose3d raises
    with pytest.raises(RuntimeError):
        _cuda._reference_channels_last(bad, (1,), (1,), torch.float64)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("0", False)])
def test_the_candidate_is_on_unless_the_environment_turns_it_off(value, on):
    env = {k: v for k, v in os.environ.items() if k != "CT3D_FX_CUDNN_CHANNELS_LAST"}
    if value is not None:
        env["CT3D_FX_CUDNN_CHANNELS_LAST"] = value
    out = subprocess.run([sys.executable, "-c", "from ct3d_fx import _cuda; "
                          "print(_cuda.CUDNN_CHANNELS_LAST)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(on)


def test_the_candidate_applies_only_to_ncdhw_cuda_inputs(monkeypatch):
    monkeypatch.setattr(_cuda, "CUDNN_CHANNELS_LAST", True)
    assert not _cuda._channels_last_applies(torch.randn(1, 2, 3, 4, 5))  # a CPU tensor
    monkeypatch.setattr(_cuda, "CUDNN_CHANNELS_LAST", False)
    assert not _cuda._channels_last_applies(torch.randn(1, 2, 3, 4, 5))


def _bn_args(program, extras, scalars, bias=True, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 4, 5, generator=g, dtype=dtype)
    w = torch.randn(4, 6, 3, 2, 3, generator=g, dtype=dtype) * 0.3
    b = torch.randn(6, generator=g, dtype=dtype) if bias else None
    return (x, w, b, [2, 1, 2], [1, 0, 1], [1, 0, 0], [1, 1, 1], 1, program, scalars, extras)


def _stats(seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(6, generator=g, dtype=dtype)
    var = torch.rand(6, generator=g, dtype=dtype) + 0.5
    weight = torch.randn(6, generator=g, dtype=dtype)
    bias = torch.randn(6, generator=g, dtype=dtype)
    return [mean, var, weight, bias]


_I = lambda op, a=-1, b=-1, c=-1, d=-1, e=-1: [int(op), a, b, c, d, e]  # noqa: E731

# programs that are one per-channel affine map of the conv output: (program, scalars, extras)
_FOLDABLE = {
    # l2_77: (conv + bias) * 2 -> BatchNorm3d (eval, affine)
    "mul_batchnorm": (_I(O.LOAD_SCALAR, 0) + _I(O.MUL, 0, 1) + _I(O.BATCH_NORM, 2, 0, 1, 1),
                      [2.0, 1e-5], _stats()),
    "batchnorm_no_affine": (_I(O.BATCH_NORM, 0, 0, 0, 0), [1e-3], _stats()[:2]),
    # 0.5 - (conv / t) where t is a (1, C, 1, 1, 1) tensor, then + conv, then negated
    "sub_div_add_neg": (_I(O.LOAD_TENSOR, 0) + _I(O.DIV, 0, 1) + _I(O.LOAD_SCALAR, 0)
                        + _I(O.SUB, 3, 2) + _I(O.ADD, 4, 0) + _I(O.NEG, 5),
                        [0.5], [torch.rand(1, 6, 1, 1, 1, dtype=torch.float64) + 0.5]),
    # (C, 1, 1, 1) and 0-d tensors, a constant computed from two of them, detach
    "consts": (_I(O.LOAD_TENSOR, 0) + _I(O.LOAD_TENSOR, 1) + _I(O.MUL, 1, 2) + _I(O.SUB, 0, 3)
               + _I(O.DETACH, 4),
               [], [torch.randn(6, 1, 1, 1, dtype=torch.float64),
                    torch.tensor(3.0, dtype=torch.float64)]),
}

# programs that are not: (program, scalars, extras)
_NOT_FOLDABLE = {
    "relu": (_I(O.RELU, 0), [], []),
    "full_size_extra": (_I(O.LOAD_TENSOR, 0) + _I(O.ADD, 0, 1), [],
                        [torch.randn(2, 6, 6, 5, 9, dtype=torch.float64)]),
    "scalar_over_conv": (_I(O.LOAD_SCALAR, 0) + _I(O.DIV, 1, 0), [2.0], []),
    "conv_times_conv": (_I(O.MUL, 0, 0), [], []),
    "divide_by_zero_scalar": (_I(O.LOAD_SCALAR, 0) + _I(O.DIV, 0, 1), [0.0], []),
    "batchnorm_then_relu": (_I(O.BATCH_NORM, 0, 0, 0, 0) + _I(O.RELU, 1), [1e-5],
                            _stats()[:2]),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(_FOLDABLE))
def test_affine_programs_fold_into_one_pass(name, bias, monkeypatch):
    """The bias and a per-channel affine program run as one addcmul (no op of the program is
    interpreted) and give the reference's values and layout."""
    program, scalars, extras = _FOLDABLE[name]
    args = _bn_args(program, extras, scalars, bias=bias)
    ref = ops.reference(*args)
    pre = _cuda._affine_prefix(program, scalars, extras, args[2], 6, torch.float64,
                               ref.device, None)
    assert pre is not None and pre[0] * ops.INSTR_WIDTH == len(program)

    def interpreted(*a, **k):
        raise AssertionError("the folded program must not be interpreted op by op")

    monkeypatch.setattr(ops, "_run_program", interpreted)
    contiguous = torch.empty(ref.shape, dtype=ref.dtype).stride()
    out = _cuda._reference_channels_last(args, tuple(ref.shape), contiguous, ref.dtype)
    assert out.stride() == contiguous and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(_NOT_FOLDABLE))
def test_other_programs_are_not_folded(name):
    program, scalars, extras = _NOT_FOLDABLE[name]
    args = _bn_args(program, extras, scalars)
    pre = _cuda._affine_prefix(program, scalars, extras, args[2], 6, torch.float64,
                               torch.device("cpu"), None)
    assert pre is None or pre[0] * ops.INSTR_WIDTH != len(program)
    ref = ops.reference(*args)
    out = _cuda._reference_channels_last(args, tuple(ref.shape), ref.stride(), ref.dtype)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_folded_float32_program_into_a_float32_output():
    """float32 conv output, float32 scale and shift: within float32 rounding of the reference."""
    program, scalars, extras = _FOLDABLE["mul_batchnorm"]
    args = _bn_args(program, [t.float() for t in extras], scalars, dtype=torch.float32)
    ref = ops.reference(*args)
    out = _cuda._reference_channels_last(args, tuple(ref.shape), ref.stride(), ref.dtype)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# programs whose first k instructions fold (the rest reads no value before k): (program,
# scalars, extras, k); k None: no prefix may fold
_PREFIXES = {
    # GAN generator: BatchNorm3d -> ReLU
    "batchnorm_relu": (_I(O.BATCH_NORM, 0, 0, 1, 0) + _I(O.RELU, 1), [1e-5], _stats(), 1),
    # l2_26 style: + per-channel tensor -> hardswish -> * scalar (re-reading nothing before)
    "add_hardswish_mul": (_I(O.LOAD_TENSOR, 0) + _I(O.ADD, 0, 1) + _I(O.HARDSWISH, 2)
                          + _I(O.LOAD_SCALAR, 0) + _I(O.MUL, 3, 4), [0.75],
                          [torch.randn(6, 1, 1, 1, dtype=torch.float64)], 2),
    # a residual read of the conv output after the affine part: relu(2 * conv) + conv
    "residual": (_I(O.LOAD_SCALAR, 0) + _I(O.MUL, 0, 1) + _I(O.RELU, 2) + _I(O.ADD, 3, 0),
                 [2.0], [], None),
    # a residual read of an affine value before the last: (conv * 2) -> * 3 -> relu, + (conv * 2)
    "inner_residual": (_I(O.LOAD_SCALAR, 0) + _I(O.MUL, 0, 1) + _I(O.LOAD_SCALAR, 1)
                       + _I(O.MUL, 2, 3) + _I(O.RELU, 4) + _I(O.ADD, 5, 2), [2.0, 3.0], [], 2),
    # a float32 tensor in the prefix of a float64 conv: not folded (a prefix of mixed dtypes
    # could end in another dtype than the conv output's)
    "mixed_dtype": (_I(O.LOAD_TENSOR, 0) + _I(O.MUL, 0, 1) + _I(O.RELU, 2), [],
                    [torch.rand(6, 1, 1, 1, dtype=torch.float32) + 0.5], None),
}


@pytest.mark.parametrize("name", sorted(_PREFIXES))
def test_affine_prefix_then_the_rest_op_by_op(name):
    program, scalars, extras, k = _PREFIXES[name]
    args = _bn_args(program, extras, scalars)
    pre = _cuda._affine_prefix(program, scalars, extras, args[2], 6, torch.float64,
                               torch.device("cpu"), torch.float64)
    assert (None if pre is None else pre[0]) == k
    ref = ops.reference(*args)
    out = _cuda._reference_channels_last(args, tuple(ref.shape), ref.stride(), ref.dtype)
    assert out.dtype == ref.dtype and out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_shift_values_renumbers_value_fields_only():
    program = (_I(O.LOAD_SCALAR, 0) + _I(O.MUL, 0, 1) + _I(O.LEAKY_RELU, 2, 0)
               + _I(O.ADD, 3, 2) + _I(O.BATCH_NORM, 4, 1, 1, 0))
    assert _cuda._shift_values(program, 2) == (
        _I(O.LEAKY_RELU, 0, 0) + _I(O.ADD, 1, 0) + _I(O.BATCH_NORM, 2, 1, 1, 0))


def test_bias_alone_folds_into_the_layout_copy(monkeypatch):
    args = _bn_args([], [], [])
    ref = ops.reference(*args)
    monkeypatch.setattr(ops, "_run_program", lambda *a: pytest.fail("nothing to interpret"))
    out = _cuda._reference_channels_last(args, tuple(ref.shape), ref.stride(), ref.dtype)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
