"""Every argument error of the fused op, and errors through an optimized model naming the site."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import ct3d_fx
from ct3d_fx.ops import Opcode, check_args
from conftest import randn, randomize_

OP = torch.ops.ct3d.conv_transpose3d_epilogue
F64 = torch.float64


def ins(op, a=-1, b=-1, c=-1, d=-1, e=-1):
    return [int(op), a, b, c, d, e]


def base():
    """Valid arguments: x (2, 4, 3, 3, 3), weight (4, 3, 2, 2, 2) with groups 2 -> C_out 6."""
    return dict(input=randn(2, 4, 3, 3, 3, seed=1), weight=randn(4, 3, 2, 2, 2, seed=2),
                bias=randn(6, seed=3), stride=[2, 2, 2], padding=[0, 0, 0],
                output_padding=[1, 1, 1], dilation=[1, 1, 1], groups=2,
                program=ins(Opcode.LOAD_TENSOR, 0) + ins(Opcode.MUL, 0, 1) + ins(Opcode.RELU, 2),
                scalars=[0.5], extras=[randn(6, 1, 1, 1, seed=4)])


def call(**kw):
    a = base()
    a.update(kw)
    return OP(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
              a["output_padding"], a["dilation"], a["groups"], a["program"], a["scalars"],
              a["extras"])


def test_base_arguments_are_valid():
    out = call()
    assert out.shape == (2, 6, 7, 7, 7)
    assert torch.isfinite(out).all() and (out > 0).any()


# (id, changed arguments, exception, message pattern)
ARG_ERRORS = [
    ("input-4d", {"input": randn(4, 3, 3, 3)}, ValueError,
     r"input must be 5-D \(N, C_in, D, H, W\), got 4-D shape \(4, 3, 3, 3\)"),
    ("input-6d", {"input": randn(1, 2, 4, 3, 3, 3)}, ValueError, r"input must be 5-D .* got 6-D"),
    ("weight-4d", {"weight": randn(4, 3, 2, 2)}, ValueError,
     r"weight must be 5-D \(C_in, C_out/groups, kD, kH, kW\), got 4-D"),
    ("channels", {"input": randn(2, 3, 3, 3, 3)}, ValueError,
     r"input has 3 channels, expected 4 \(weight.size\(0\)\)"),
    ("groups-0", {"groups": 0}, ValueError, r"groups must be >= 1, got 0"),
    ("groups-not-dividing", {"groups": 3}, ValueError,
     r"weight.size\(0\)=4 \(C_in\) must be divisible by groups=3"),
    ("input-int", {"input": torch.ones(2, 4, 3, 3, 3, dtype=torch.int64)}, TypeError,
     r"input must be a floating-point tensor, got torch.int64"),
    ("weight-dtype", {"weight": randn(4, 3, 2, 2, 2, dtype=torch.float32)}, TypeError,
     r"weight dtype torch.float32 must match input dtype torch.float64"),
    ("bias-dtype", {"bias": randn(6, dtype=torch.float32)}, TypeError,
     r"bias dtype torch.float32 must match input dtype torch.float64"),
    ("bias-shape", {"bias": randn(3)}, ValueError,
     r"bias must be 1-D with 6 elements \(C_out\), got shape \(3,\)"),
    ("bias-2d", {"bias": randn(6, 1)}, ValueError, r"bias must be 1-D with 6 elements"),
    ("stride-0", {"stride": [1, 0, 1], "output_padding": [0]}, ValueError,
     r"stride must be positive, got \[1, 0, 1\]"),
    ("stride-negative", {"stride": [-1], "output_padding": [0]}, ValueError,
     r"stride must be positive"),
    ("stride-len-2", {"stride": [2, 2]}, ValueError, r"stride must have 1 or 3 elements, got 2"),
    ("dilation-0", {"dilation": [0, 1, 1]}, ValueError, r"dilation must be positive"),
    ("padding-negative", {"padding": [0, -1, 0]}, ValueError,
     r"padding must be non-negative, got \[0, -1, 0\]"),
    ("padding-len-4", {"padding": [0, 0, 0, 0]}, ValueError, r"padding must have 1 or 3"),
    ("output-padding-negative", {"output_padding": [-1, 0, 0]}, ValueError,
     r"output_padding must be non-negative"),
    ("output-padding-too-large", {"output_padding": [2, 1, 1]}, ValueError,
     r"output_padding must be smaller than either stride or dilation, got "
     r"output_padding=\[2, 1, 1\], stride=\[2, 2, 2\], dilation=\[1, 1, 1\]"),
    ("output-padding-equal-stride-1", {"stride": [1], "output_padding": [1]}, ValueError,
     r"output_padding must be smaller than either stride or dilation"),
    ("output-size-not-positive", {"padding": [4, 0, 0], "output_padding": [0]}, ValueError,
     r"output spatial size \[-2, 6, 6\] is not positive for input \(2, 4, 3, 3, 3\)"),
]

PROGRAM_ERRORS = [
    ("length", [int(Opcode.RELU), 0, -1], r"program length must be a multiple of 6, got 3"),
    ("ends-with-load", ins(Opcode.LOAD_SCALAR, 0), r"computed from the convolution output"),
    ("unknown-opcode", ins(99, 0), r"program instruction 0: unknown opcode 99"),
    ("value-ahead", ins(Opcode.RELU, 1), r"instruction 0 \(RELU\) field 1: value number must be "
                                         r"in \[0, 0\], got 1"),
    ("value-negative", ins(Opcode.RELU, 0) + ins(Opcode.ADD, 1, -1),
     r"instruction 1 \(ADD\) field 2: value number must be in \[0, 1\], got -1"),
    ("scalar-index", ins(Opcode.LEAKY_RELU, 0, 3),
     r"instruction 0 \(LEAKY_RELU\) field 2: scalar index must be in \[0, 1\), got 3"),
    ("clamp-index", ins(Opcode.CLAMP, 0, -2, 0),
     r"instruction 0 \(CLAMP\) field 2: scalar index must be -1 or in \[0, 1\), got -2"),
    ("extra-index", ins(Opcode.PRELU, 0, 1),
     r"instruction 0 \(PRELU\) field 2: extra-tensor index must leave 1 tensor\(s\) in "
     r"\[0, 1\), got 1"),
    ("batch-norm-extras", ins(Opcode.BATCH_NORM, 0, 0, 1, 0),
     r"instruction 0 \(BATCH_NORM\) field 2: extra-tensor index must leave 4 tensor\(s\)"),
    ("flag", ins(Opcode.GELU, 0, 2), r"instruction 0 \(GELU\) field 2: flag must be 0 or 1, got 2"),
    ("unused-field", ins(Opcode.RELU, 0, 0),
     r"instruction 0 \(RELU\) field 2: unused field must be -1, got 0"),
    ("layer-norm-weight-index", ins(Opcode.LAYER_NORM, 0, 1, -1, 0, 7),
     r"instruction 0 \(LAYER_NORM\) field 2: extra-tensor index must be -1 or in \[0, 1\), "
     r"got 1"),
    ("layer-norm-bias-index", ins(Opcode.LAYER_NORM, 0, 0, -2, 0, 7),
     r"instruction 0 \(LAYER_NORM\) field 3: extra-tensor index must be -1 or in \[0, 1\), "
     r"got -2"),
    ("layer-norm-eps-index", ins(Opcode.LAYER_NORM, 0, -1, -1, -1, 7),
     r"instruction 0 \(LAYER_NORM\) field 4: scalar index must be in \[0, 1\), got -1"),
    ("layer-norm-size-0", ins(Opcode.LAYER_NORM, 0, -1, -1, 0, 0),
     r"instruction 0 \(LAYER_NORM\) field 5: size must be positive, got 0"),
    ("layer-norm-size-negative", ins(Opcode.LAYER_NORM, 0, -1, -1, 0, -1),
     r"instruction 0 \(LAYER_NORM\) field 5: size must be positive, got -1"),
    ("layer-norm-of-extra", ins(Opcode.LOAD_TENSOR, 0) + ins(Opcode.LAYER_NORM, 1, -1, -1, 0, 1)
     + ins(Opcode.ADD, 2, 0),
     r"instruction 1 \(LAYER_NORM\): operand v1 is an extra tensor, expected a value computed "
     r"from the convolution output"),
]


@pytest.mark.parametrize("case", ARG_ERRORS, ids=[c[0] for c in ARG_ERRORS])
def test_argument_errors(case):
    _, kw, exc, pattern = case
    with pytest.raises(exc, match=pattern) as err:
        call(**kw)
    assert str(err.value).startswith("ct3d: ")


@pytest.mark.parametrize("case", PROGRAM_ERRORS, ids=[c[0] for c in PROGRAM_ERRORS])
def test_program_errors(case):
    _, program, pattern = case
    with pytest.raises(ValueError, match=pattern) as err:
        call(program=program)
    assert str(err.value).startswith("ct3d: ")


@pytest.mark.parametrize("weight,bias", [(-1, -1), (0, -1), (-1, 1), (0, 1)])
def test_layer_norm_program_accepts_absent_weight_and_bias(weight, bias):
    """LAYER_NORM's weight and bias fields take -1 (absent) or an extras index; the op computes
    F.layer_norm over the last dimension (W = 7 here) with them."""
    from ct3d_fx.ops import check_program, describe_program
    w, b = randn(7, seed=5), randn(7, seed=6)
    program = ins(Opcode.LAYER_NORM, 0, weight, bias, 0, 7) + ins(Opcode.RELU, 1)
    check_program(program, 1, 2)
    text = describe_program(program, [1e-3])
    assert text.startswith(f"v1=LAYER_NORM(v0, {'-' if weight < 0 else 't0'}, "
                           f"{'-' if bias < 0 else 't1'}, 0.001, 7)"), text
    out = call(program=program, scalars=[1e-3], extras=[w, b])
    y = torch.nn.functional.conv_transpose3d(base()["input"], base()["weight"], base()["bias"],
                                             2, 0, 1, 2)
    want = torch.relu(torch.nn.functional.layer_norm(y, (7,), w if weight >= 0 else None,
                                                     b if bias >= 0 else None, 1e-3))
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["weight", "bias", "extras"])
def test_device_errors(which):
    """check_args (which the CPU and CUDA implementations run first) rejects mixed devices.

    Mixing the CPU with the meta device stands in for CPU/CUDA on a machine without a GPU.
    """
    a = base()
    if which == "extras":
        a["extras"] = [a["extras"][0].to("meta")]
        pattern = r"ct3d: extras\[0\] is on meta, expected cpu"
    else:
        a[which] = a[which].to("meta")
        pattern = rf"ct3d: {which} is on meta, expected cpu"
    with pytest.raises(RuntimeError, match=pattern):
        check_args(**a)


def test_zero_dim_cpu_extra_is_allowed_with_any_device():
    a = base()
    a["extras"] = [torch.tensor(2.0, dtype=F64)]
    check_args(**a)
    a["input"] = a["input"].to("meta")
    a["weight"] = a["weight"].to("meta")
    a["bias"] = a["bias"].to("meta")
    check_args(**a)


@pytest.mark.cuda
def test_device_errors_cuda():
    a = base()
    with pytest.raises(RuntimeError, match=r"ct3d: weight is on cuda:0, expected cpu"):
        call(weight=a["weight"].cuda())
    with pytest.raises(RuntimeError, match=r"ct3d: (weight is on cpu|extras\[0\] is on cpu)"):
        call(input=a["input"].cuda(), bias=a["bias"].cuda())


# --------------------------------------------------------------------------------------------
# Through an optimized model: the error names the site
# --------------------------------------------------------------------------------------------
class SizedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.Sequential(nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x, skip):
        return self.dec[1](self.dec[0](x, output_size=skip.shape[2:])) + skip


def _opt():
    m = randomize_(SizedNet()).double().eval()
    x = randn(1, 3, 2, 3, 3, seed=1)
    skip = randn(1, 2, 4, 6, 5, seed=2)
    opt = ct3d_fx.optimize(m, (x, skip))
    assert opt.ct3d_report.sites[0].chain == ["ConvTranspose3d", "ReLU", "add"]
    return opt, x, skip


SITE_ERRORS = [
    ("channels", lambda x, s: (randn(1, 5, 2, 3, 3), s), ValueError,
     "ct3d_fx site 'dec.0': input has 5 channels, expected 3"),
    ("dtype", lambda x, s: (x.float(), s), TypeError,
     "ct3d_fx site 'dec.0': ct3d: weight dtype torch.float64 must match input dtype "
     "torch.float32"),
    ("int-input", lambda x, s: (x.long(), s), TypeError,
     "ct3d_fx site 'dec.0': ct3d: input must be a floating-point tensor, got torch.int64"),
    ("output-size", lambda x, s: (x, randn(1, 2, 9, 6, 5)), ValueError,
     "ct3d_fx site 'dec.0': requested an output size of"),
    ("side-input-channels", lambda x, s: (x, randn(1, 3, 4, 6, 5)), RuntimeError,
     "ct3d_fx site 'dec.0': The size of tensor a (2) must match the size of tensor b (3)"),
]


@pytest.mark.parametrize("case", SITE_ERRORS, ids=[c[0] for c in SITE_ERRORS])
def test_errors_through_optimized_model_name_the_site(case):
    _, make_inputs, exc, message = case
    opt, x, skip = _opt()
    with pytest.raises(exc, match=re.escape(message)):
        opt(*make_inputs(x, skip))


def test_unbatched_input_runs_unfused_like_the_original():
    """A 4-D (unbatched) input is valid for nn.ConvTranspose3d: the site runs the original ops."""
    m = randomize_(nn.Sequential(nn.ConvTranspose3d(3, 2, 2, stride=2), nn.Tanh())).double()
    m.eval()
    opt = ct3d_fx.optimize(m, (randn(1, 3, 2, 2, 2),))
    x = randn(3, 2, 2, 2, seed=5)
    torch.testing.assert_close(opt(x), m(x), rtol=0, atol=0)
