"""Every spelling of every fusable op, every anchor spelling and geometry, every operand kind.

Each case builds ``ConvTranspose3d -> <one op>``, optimizes it with example inputs, checks that the
report fused exactly that chain, that one fused site replaced it in ``opt.graph`` and runs the
fused op, and that the optimized model equals the original (float64: to 1e-12; float32: no worse
than eager PyTorch against a float64 reference).
"""
from __future__ import annotations

import contextlib
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ct3d_fx
from conftest import assert_matches, optimize_checked, randn, randomize_

# nn.Dropout2d on a 5-D tensor works (channel-wise) but warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:dropout2d.*5-D input:UserWarning")

C_IN, C = 3, 4
X_SHAPE = (2, C_IN, 3, 4, 5)
Y_SHAPE = (2, C, 6, 8, 10)   # stride 2, padding 1, output_padding 1, kernel 3
DTYPES = [torch.float64, torch.float32]


class Site(nn.Module):
    """``epilogue(self, up(x), skip)``; ``skip`` is a full-shape second input.

    Holds a per-channel Parameter ``pc`` (C,1,1,1), a per-channel buffer ``bc`` (1,C,1,1,1), a
    vector Parameter ``vec`` (C,), a 0-d buffer ``s0`` and a 0-d Parameter ``p0``, and the
    modules of ``mods``.
    """

    def __init__(self, epilogue, mods=None, conv=None):
        super().__init__()
        self.up = conv if conv is not None else nn.ConvTranspose3d(
            C_IN, C, 3, stride=2, padding=1, output_padding=1)
        self.mods = nn.ModuleDict(mods or {})
        self.pc = nn.Parameter(torch.empty(C, 1, 1, 1))
        self.register_buffer("bc", torch.empty(1, C, 1, 1, 1))
        self.vec = nn.Parameter(torch.empty(C))
        self.register_buffer("s0", torch.empty(()))
        self.p0 = nn.Parameter(torch.empty(()))
        self.epilogue = epilogue

    def forward(self, x, skip):
        return self.epilogue(self, self.up(x), skip)


def build(epilogue, mods=None, dtype=torch.float64, seed=0, conv=None):
    m = randomize_(Site(epilogue, mods, conv), seed).to(dtype).eval()
    x = randn(*X_SHAPE, dtype=dtype, seed=seed + 1)
    skip = randn(*Y_SHAPE, dtype=dtype, seed=seed + 2)
    return m, (x, skip)


# (id, modules factory or None, epilogue(m, y, skip), the op's name in the report's chain, or the
# list of names after the conv when the epilogue has more than one op)
ARITH = [
    ("operator.add", None, lambda m, y, s: y + 0.5, "add"),
    ("operator.add-reversed", None, lambda m, y, s: 0.5 + y, "add"),
    ("operator.add-int", None, lambda m, y, s: y + 2, "add"),
    ("torch.add", None, lambda m, y, s: torch.add(y, 0.5), "add"),
    ("torch.add-alpha", None, lambda m, y, s: torch.add(y, m.pc, alpha=2), "add"),
    ("Tensor.add", None, lambda m, y, s: y.add(m.bc), "add"),
    ("Tensor.add_", None, lambda m, y, s: y.add_(0.25), "add_"),
    ("Tensor.add_-alpha", None, lambda m, y, s: y.add_(m.pc, alpha=-1.5), "add_"),
    ("operator.sub", None, lambda m, y, s: y - 0.5, "sub"),
    ("operator.sub-reversed", None, lambda m, y, s: 0.5 - y, "sub"),
    ("torch.sub", None, lambda m, y, s: torch.sub(y, m.pc), "sub"),
    ("torch.sub-alpha", None, lambda m, y, s: torch.sub(y, m.bc, alpha=0.5), "sub"),
    ("torch.subtract", None, lambda m, y, s: torch.subtract(y, 1.5), "subtract"),
    ("Tensor.sub", None, lambda m, y, s: y.sub(m.s0), "sub"),
    ("Tensor.subtract", None, lambda m, y, s: y.subtract(0.75), "subtract"),
    ("Tensor.sub_", None, lambda m, y, s: y.sub_(m.pc), "sub_"),
    ("Tensor.subtract_", None, lambda m, y, s: y.subtract_(1.0), "subtract_"),
    ("torch.rsub", None, lambda m, y, s: torch.rsub(y, 2.0), "rsub"),
    ("torch.rsub-alpha", None, lambda m, y, s: torch.rsub(y, m.pc, alpha=3), "rsub"),
    ("operator.mul", None, lambda m, y, s: y * 1.5, "mul"),
    ("operator.mul-reversed", None, lambda m, y, s: 1.5 * y, "mul"),
    ("torch.mul", None, lambda m, y, s: torch.mul(y, m.pc), "mul"),
    ("torch.multiply", None, lambda m, y, s: torch.multiply(y, m.p0), "multiply"),
    ("Tensor.mul", None, lambda m, y, s: y.mul(m.bc), "mul"),
    ("Tensor.multiply", None, lambda m, y, s: y.multiply(0.5), "multiply"),
    ("Tensor.mul_", None, lambda m, y, s: y.mul_(m.s0), "mul_"),
    ("Tensor.multiply_", None, lambda m, y, s: y.multiply_(3.0), "multiply_"),
    ("operator.truediv", None, lambda m, y, s: y / 1.5, "truediv"),
    ("operator.truediv-reversed", None, lambda m, y, s: 1.5 / y, "truediv"),
    ("torch.div", None, lambda m, y, s: torch.div(y, m.pc), "div"),
    ("torch.divide", None, lambda m, y, s: torch.divide(y, 3.0), "divide"),
    ("torch.true_divide", None, lambda m, y, s: torch.true_divide(y, m.bc), "true_divide"),
    ("Tensor.div", None, lambda m, y, s: y.div(m.p0), "div"),
    ("Tensor.divide", None, lambda m, y, s: y.divide(2.0), "divide"),
    ("Tensor.true_divide", None, lambda m, y, s: y.true_divide(2.0), "true_divide"),
    ("Tensor.div_", None, lambda m, y, s: y.div_(m.pc), "div_"),
    ("Tensor.divide_", None, lambda m, y, s: y.divide_(4.0), "divide_"),
    ("Tensor.true_divide_", None, lambda m, y, s: y.true_divide_(4.0), "true_divide_"),
    ("operator.neg", None, lambda m, y, s: -y, "neg"),
    ("torch.neg", None, lambda m, y, s: torch.neg(y), "neg"),
    ("torch.negative", None, lambda m, y, s: torch.negative(y), "negative"),
    ("torch.neg_", None, lambda m, y, s: torch.neg_(y), "neg_"),
    ("torch.negative_", None, lambda m, y, s: torch.negative_(y), "negative_"),
    ("Tensor.neg", None, lambda m, y, s: y.neg(), "neg"),
    ("Tensor.negative", None, lambda m, y, s: y.negative(), "negative"),
    ("Tensor.neg_", None, lambda m, y, s: y.neg_(), "neg_"),
    ("Tensor.negative_", None, lambda m, y, s: y.negative_(), "negative_"),
    ("operator.abs", None, lambda m, y, s: abs(y), "abs"),
    ("torch.abs", None, lambda m, y, s: torch.abs(y), "abs"),
    ("torch.absolute", None, lambda m, y, s: torch.absolute(y), "absolute"),
    ("torch.abs_", None, lambda m, y, s: torch.abs_(y), "abs_"),
    ("Tensor.abs", None, lambda m, y, s: y.abs(), "abs"),
    ("Tensor.absolute", None, lambda m, y, s: y.absolute(), "absolute"),
    ("Tensor.abs_", None, lambda m, y, s: y.abs_(), "abs_"),
    ("Tensor.absolute_", None, lambda m, y, s: y.absolute_(), "absolute_"),
    ("torch.square", None, lambda m, y, s: torch.square(y), "square"),
    ("torch.square_", None, lambda m, y, s: torch.square_(y), "square_"),
    ("Tensor.square", None, lambda m, y, s: y.square(), "square"),
    ("Tensor.square_", None, lambda m, y, s: y.square_(), "square_"),
    ("operator.pow", None, lambda m, y, s: y ** 2, "pow"),
    # augmented assignment (y += 1) on a Proxy falls back to the plain operator when traced
    ("operator.iadd", None, lambda m, y, s: operator.iadd(y, m.pc), "add"),
    ("operator.isub", None, lambda m, y, s: operator.isub(y, 0.5), "sub"),
    ("operator.imul", None, lambda m, y, s: operator.imul(y, m.bc), "mul"),
    ("operator.itruediv", None, lambda m, y, s: operator.itruediv(y, 3.0), "truediv"),
    ("operator.ipow", None, lambda m, y, s: operator.ipow(y, 2), "pow"),
    ("torch.pow", None, lambda m, y, s: torch.pow(y, 2), "pow"),
    ("Tensor.pow", None, lambda m, y, s: y.pow(2.0), "pow"),
    ("Tensor.pow_", None, lambda m, y, s: y.pow_(2), "pow_"),
]

ACT = [
    ("nn.ReLU", lambda: {"a": nn.ReLU()}, lambda m, y, s: m.mods.a(y), "ReLU"),
    ("nn.ReLU-inplace", lambda: {"a": nn.ReLU(inplace=True)}, lambda m, y, s: m.mods.a(y), "ReLU"),
    ("F.relu", None, lambda m, y, s: F.relu(y), "relu"),
    ("F.relu-inplace", None, lambda m, y, s: F.relu(y, inplace=True), "relu"),
    ("F.relu_", None, lambda m, y, s: F.relu_(y), "relu_"),
    ("torch.relu", None, lambda m, y, s: torch.relu(y), "relu"),
    ("torch.relu_", None, lambda m, y, s: torch.relu_(y), "relu_"),
    ("Tensor.relu", None, lambda m, y, s: y.relu(), "relu"),
    ("Tensor.relu_", None, lambda m, y, s: y.relu_(), "relu_"),
    ("nn.ReLU6", lambda: {"a": nn.ReLU6()}, lambda m, y, s: m.mods.a(y * 8), ["mul", "ReLU6"]),
    ("nn.ReLU6-inplace", lambda: {"a": nn.ReLU6(inplace=True)},
     lambda m, y, s: m.mods.a(y * 8), ["mul", "ReLU6"]),
    ("F.relu6", None, lambda m, y, s: F.relu6(y * 8), ["mul", "relu6"]),
    ("F.relu6-inplace", None, lambda m, y, s: F.relu6(y * 8, inplace=True), ["mul", "relu6"]),
    ("nn.LeakyReLU", lambda: {"a": nn.LeakyReLU(0.2)}, lambda m, y, s: m.mods.a(y), "LeakyReLU"),
    ("nn.LeakyReLU-inplace", lambda: {"a": nn.LeakyReLU(0.3, inplace=True)},
     lambda m, y, s: m.mods.a(y), "LeakyReLU"),
    ("F.leaky_relu", None, lambda m, y, s: F.leaky_relu(y, 0.05), "leaky_relu"),
    ("F.leaky_relu-default", None, lambda m, y, s: F.leaky_relu(y), "leaky_relu"),
    ("F.leaky_relu-inplace", None,
     lambda m, y, s: F.leaky_relu(y, negative_slope=0.3, inplace=True), "leaky_relu"),
    ("F.leaky_relu_", None, lambda m, y, s: F.leaky_relu_(y, 0.1), "leaky_relu_"),
    ("nn.PReLU-1", lambda: {"a": nn.PReLU()}, lambda m, y, s: m.mods.a(y), "PReLU"),
    ("nn.PReLU-C", lambda: {"a": nn.PReLU(C)}, lambda m, y, s: m.mods.a(y), "PReLU"),
    ("F.prelu", None, lambda m, y, s: F.prelu(y, m.vec), "prelu"),
    ("F.prelu-1", None, lambda m, y, s: F.prelu(y, m.p0.reshape(1)), "prelu"),
    ("torch.prelu", None, lambda m, y, s: torch.prelu(y, m.vec), "prelu"),
    ("Tensor.prelu", None, lambda m, y, s: y.prelu(m.vec), "prelu"),
    ("nn.ELU", lambda: {"a": nn.ELU(0.7)}, lambda m, y, s: m.mods.a(y), "ELU"),
    ("nn.ELU-inplace", lambda: {"a": nn.ELU(1.2, inplace=True)}, lambda m, y, s: m.mods.a(y),
     "ELU"),
    ("F.elu", None, lambda m, y, s: F.elu(y, 0.7), "elu"),
    ("F.elu-inplace", None, lambda m, y, s: F.elu(y, alpha=0.4, inplace=True), "elu"),
    ("F.elu_", None, lambda m, y, s: F.elu_(y, 1.5), "elu_"),
    ("nn.CELU", lambda: {"a": nn.CELU(1.3)}, lambda m, y, s: m.mods.a(y), "CELU"),
    ("nn.CELU-inplace", lambda: {"a": nn.CELU(0.6, inplace=True)}, lambda m, y, s: m.mods.a(y),
     "CELU"),
    ("F.celu", None, lambda m, y, s: F.celu(y, 1.3), "celu"),
    ("F.celu-inplace", None, lambda m, y, s: F.celu(y, 0.8, inplace=True), "celu"),
    ("F.celu_", None, lambda m, y, s: F.celu_(y, 0.8), "celu_"),
    ("torch.celu", None, lambda m, y, s: torch.celu(y, 0.9), "celu"),
    ("nn.SELU", lambda: {"a": nn.SELU()}, lambda m, y, s: m.mods.a(y), "SELU"),
    ("nn.SELU-inplace", lambda: {"a": nn.SELU(inplace=True)}, lambda m, y, s: m.mods.a(y), "SELU"),
    ("F.selu", None, lambda m, y, s: F.selu(y), "selu"),
    ("F.selu-inplace", None, lambda m, y, s: F.selu(y, inplace=True), "selu"),
    ("F.selu_", None, lambda m, y, s: F.selu_(y), "selu_"),
    ("torch.selu", None, lambda m, y, s: torch.selu(y), "selu"),
    ("nn.GELU", lambda: {"a": nn.GELU()}, lambda m, y, s: m.mods.a(y), "GELU"),
    ("nn.GELU-tanh", lambda: {"a": nn.GELU(approximate="tanh")}, lambda m, y, s: m.mods.a(y),
     "GELU"),
    ("F.gelu", None, lambda m, y, s: F.gelu(y), "gelu"),
    ("F.gelu-none", None, lambda m, y, s: F.gelu(y, approximate="none"), "gelu"),
    ("F.gelu-tanh", None, lambda m, y, s: F.gelu(y, approximate="tanh"), "gelu"),
    ("nn.SiLU", lambda: {"a": nn.SiLU()}, lambda m, y, s: m.mods.a(y), "SiLU"),
    ("nn.SiLU-inplace", lambda: {"a": nn.SiLU(inplace=True)}, lambda m, y, s: m.mods.a(y), "SiLU"),
    ("F.silu", None, lambda m, y, s: F.silu(y), "silu"),
    ("F.silu-inplace", None, lambda m, y, s: F.silu(y, inplace=True), "silu"),
    ("nn.Mish", lambda: {"a": nn.Mish()}, lambda m, y, s: m.mods.a(y), "Mish"),
    ("nn.Mish-inplace", lambda: {"a": nn.Mish(inplace=True)}, lambda m, y, s: m.mods.a(y), "Mish"),
    ("F.mish", None, lambda m, y, s: F.mish(y), "mish"),
    ("F.mish-inplace", None, lambda m, y, s: F.mish(y, inplace=True), "mish"),
    ("nn.Hardswish", lambda: {"a": nn.Hardswish()}, lambda m, y, s: m.mods.a(y * 4),
     ["mul", "Hardswish"]),
    ("nn.Hardswish-inplace", lambda: {"a": nn.Hardswish(inplace=True)},
     lambda m, y, s: m.mods.a(y * 4), ["mul", "Hardswish"]),
    ("F.hardswish", None, lambda m, y, s: F.hardswish(y * 4), ["mul", "hardswish"]),
    ("F.hardswish-inplace", None, lambda m, y, s: F.hardswish(y * 4, inplace=True),
     ["mul", "hardswish"]),
    ("nn.Hardsigmoid", lambda: {"a": nn.Hardsigmoid()}, lambda m, y, s: m.mods.a(y * 4),
     ["mul", "Hardsigmoid"]),
    ("nn.Hardsigmoid-inplace", lambda: {"a": nn.Hardsigmoid(inplace=True)},
     lambda m, y, s: m.mods.a(y * 4), ["mul", "Hardsigmoid"]),
    ("F.hardsigmoid", None, lambda m, y, s: F.hardsigmoid(y * 4), ["mul", "hardsigmoid"]),
    ("F.hardsigmoid-inplace", None, lambda m, y, s: F.hardsigmoid(y * 4, inplace=True),
     ["mul", "hardsigmoid"]),
    ("nn.Hardtanh", lambda: {"a": nn.Hardtanh(-0.5, 0.7)}, lambda m, y, s: m.mods.a(y),
     "Hardtanh"),
    ("nn.Hardtanh-inplace", lambda: {"a": nn.Hardtanh(-0.3, 0.2, inplace=True)},
     lambda m, y, s: m.mods.a(y), "Hardtanh"),
    ("F.hardtanh", None, lambda m, y, s: F.hardtanh(y, -0.5, 0.7), "hardtanh"),
    ("F.hardtanh-default", None, lambda m, y, s: F.hardtanh(y * 3), ["mul", "hardtanh"]),
    ("F.hardtanh-inplace", None, lambda m, y, s: F.hardtanh(y, min_val=-0.1, inplace=True),
     "hardtanh"),
    ("F.hardtanh_", None, lambda m, y, s: F.hardtanh_(y, -0.2, 0.4), "hardtanh_"),
    ("nn.Sigmoid", lambda: {"a": nn.Sigmoid()}, lambda m, y, s: m.mods.a(y), "Sigmoid"),
    ("torch.sigmoid", None, lambda m, y, s: torch.sigmoid(y), "sigmoid"),
    ("F.sigmoid", None, lambda m, y, s: F.sigmoid(y), "sigmoid"),
    ("torch.special.expit", None, lambda m, y, s: torch.special.expit(y), "special_expit"),
    ("torch.sigmoid_", None, lambda m, y, s: torch.sigmoid_(y), "sigmoid_"),
    ("Tensor.sigmoid", None, lambda m, y, s: y.sigmoid(), "sigmoid"),
    ("Tensor.sigmoid_", None, lambda m, y, s: y.sigmoid_(), "sigmoid_"),
    ("nn.Tanh", lambda: {"a": nn.Tanh()}, lambda m, y, s: m.mods.a(y), "Tanh"),
    ("torch.tanh", None, lambda m, y, s: torch.tanh(y), "tanh"),
    ("F.tanh", None, lambda m, y, s: F.tanh(y), "tanh"),
    ("torch.tanh_", None, lambda m, y, s: torch.tanh_(y), "tanh_"),
    ("Tensor.tanh", None, lambda m, y, s: y.tanh(), "tanh"),
    ("Tensor.tanh_", None, lambda m, y, s: y.tanh_(), "tanh_"),
    ("nn.Softplus", lambda: {"a": nn.Softplus()}, lambda m, y, s: m.mods.a(y), "Softplus"),
    ("nn.Softplus-beta", lambda: {"a": nn.Softplus(beta=2.0, threshold=0.5)},
     lambda m, y, s: m.mods.a(y), "Softplus"),
    ("F.softplus", None, lambda m, y, s: F.softplus(y, beta=0.5, threshold=0.3), "softplus"),
]

CLAMP = [
    ("torch.clamp", None, lambda m, y, s: torch.clamp(y, -0.5, 0.4), "clamp"),
    ("torch.clamp-min", None, lambda m, y, s: torch.clamp(y, min=-0.2), "clamp"),
    ("torch.clamp-max", None, lambda m, y, s: torch.clamp(y, max=0.3), "clamp"),
    ("torch.clip", None, lambda m, y, s: torch.clip(y, -0.1, 0.1), "clip"),
    ("torch.clamp_", None, lambda m, y, s: torch.clamp_(y, -0.3, 0.6), "clamp_"),
    ("torch.clip_", None, lambda m, y, s: torch.clip_(y, min=0.1), "clip_"),
    ("Tensor.clamp", None, lambda m, y, s: y.clamp(-0.5, 0.5), "clamp"),
    ("Tensor.clamp-max", None, lambda m, y, s: y.clamp(max=0.0), "clamp"),
    ("Tensor.clip", None, lambda m, y, s: y.clip(0.0, 0.2), "clip"),
    ("Tensor.clamp_", None, lambda m, y, s: y.clamp_(min=-0.25), "clamp_"),
    ("Tensor.clip_", None, lambda m, y, s: y.clip_(-0.4, 0.4), "clip_"),
    ("torch.clamp_min", None, lambda m, y, s: torch.clamp_min(y, 0.1), "clamp_min"),
    ("torch.clamp_min_", None, lambda m, y, s: torch.clamp_min_(y, -0.1), "clamp_min_"),
    ("torch.clamp_max", None, lambda m, y, s: torch.clamp_max(y, 0.1), "clamp_max"),
    ("torch.clamp_max_", None, lambda m, y, s: torch.clamp_max_(y, -0.1), "clamp_max_"),
    ("Tensor.clamp_min", None, lambda m, y, s: y.clamp_min(0.2), "clamp_min"),
    ("Tensor.clamp_min_", None, lambda m, y, s: y.clamp_min_(0.2), "clamp_min_"),
    ("Tensor.clamp_max", None, lambda m, y, s: y.clamp_max(0.2), "clamp_max"),
    ("Tensor.clamp_max_", None, lambda m, y, s: y.clamp_max_(0.2), "clamp_max_"),
]

NORM_DROPOUT = [
    ("nn.BatchNorm3d", lambda: {"a": nn.BatchNorm3d(C)}, lambda m, y, s: m.mods.a(y),
     "BatchNorm3d"),
    ("nn.BatchNorm3d-no-affine", lambda: {"a": nn.BatchNorm3d(C, affine=False, eps=1e-3)},
     lambda m, y, s: m.mods.a(y), "BatchNorm3d"),
    ("F.batch_norm", lambda: {"a": nn.BatchNorm3d(C, eps=1e-2)},
     lambda m, y, s: F.batch_norm(y, m.mods.a.running_mean, m.mods.a.running_var,
                                  m.mods.a.weight, m.mods.a.bias, False, 0.1, 1e-2),
     "batch_norm"),
    ("F.batch_norm-no-affine", lambda: {"a": nn.BatchNorm3d(C)},
     lambda m, y, s: F.batch_norm(y, m.mods.a.running_mean, m.mods.a.running_var,
                                  training=False), "batch_norm"),
    ("nn.Dropout", lambda: {"a": nn.Dropout(0.3)}, lambda m, y, s: m.mods.a(y), "Dropout"),
    ("nn.Dropout-inplace", lambda: {"a": nn.Dropout(0.3, inplace=True)},
     lambda m, y, s: m.mods.a(y), "Dropout"),
    ("nn.Dropout3d", lambda: {"a": nn.Dropout3d(0.5)}, lambda m, y, s: m.mods.a(y), "Dropout3d"),
    ("nn.Dropout2d", lambda: {"a": nn.Dropout2d(0.5)}, lambda m, y, s: m.mods.a(y), "Dropout2d"),
    ("nn.SyncBatchNorm", lambda: {"a": nn.SyncBatchNorm(C)}, lambda m, y, s: m.mods.a(y),
     "SyncBatchNorm"),
    ("nn.AlphaDropout", lambda: {"a": nn.AlphaDropout(0.2)}, lambda m, y, s: m.mods.a(y),
     "AlphaDropout"),
    ("nn.FeatureAlphaDropout", lambda: {"a": nn.FeatureAlphaDropout(0.2)},
     lambda m, y, s: m.mods.a(y), "FeatureAlphaDropout"),
    ("F.dropout", None, lambda m, y, s: F.dropout(y, 0.3, training=False), "dropout"),
    ("F.dropout3d", None, lambda m, y, s: F.dropout3d(y, 0.3, training=False), "dropout3d"),
    ("F.alpha_dropout", None, lambda m, y, s: F.alpha_dropout(y, 0.3, training=False),
     "alpha_dropout"),
    ("F.feature_alpha_dropout", None,
     lambda m, y, s: F.feature_alpha_dropout(y, 0.3, training=False), "feature_alpha_dropout"),
    ("nn.Identity", lambda: {"a": nn.Identity()}, lambda m, y, s: m.mods.a(y), "Identity"),
    ("Tensor.clone", None, lambda m, y, s: y.clone() * 2, ["clone", "mul"]),
    ("torch.clone", None, lambda m, y, s: torch.clone(y) * 2, ["clone", "mul"]),
    ("Tensor.detach", None, lambda m, y, s: y.detach() * 2, ["detach", "mul"]),
    ("torch.detach", None, lambda m, y, s: torch.detach(y) * 2, ["detach", "mul"]),
    ("Tensor.contiguous", None, lambda m, y, s: y.contiguous() * 2, ["contiguous", "mul"]),
    ("operator.pos", None, lambda m, y, s: (+y) * 2, ["pos", "mul"]),
]

# softmax over the channels (C = 4 <= SOFTMAX_MAX_CHANNELS, groups 1); scaled so the rows
# are not nearly uniform
SOFTMAX = [
    ("F.softmax", None, lambda m, y, s: F.softmax(y * 3, dim=1), ["mul", "softmax"]),
    ("F.softmax-neg-dim", None, lambda m, y, s: F.softmax(y * 3, -4), ["mul", "softmax"]),
    ("torch.softmax", None, lambda m, y, s: torch.softmax(y * 3, 1), ["mul", "softmax"]),
    ("Tensor.softmax", None, lambda m, y, s: (y * 3).softmax(dim=1), ["mul", "softmax"]),
    ("nn.Softmax", lambda: {"a": nn.Softmax(dim=1)}, lambda m, y, s: m.mods.a(y * 3),
     ["mul", "Softmax"]),
    ("F.log_softmax", None, lambda m, y, s: F.log_softmax(y * 3, dim=1), ["mul", "log_softmax"]),
    ("torch.log_softmax", None, lambda m, y, s: torch.log_softmax(y * 3, 1),
     ["mul", "log_softmax"]),
    ("Tensor.log_softmax", None, lambda m, y, s: (y * 3).log_softmax(1), ["mul", "log_softmax"]),
    ("nn.LogSoftmax", lambda: {"a": nn.LogSoftmax(dim=-4)}, lambda m, y, s: m.mods.a(y * 3),
     ["mul", "LogSoftmax"]),
    ("F.softmax-then-ops", None,
     lambda m, y, s: torch.sigmoid(F.softmax(torch.relu(y) + m.pc, dim=1)) * s,
     ["relu", "add", "softmax", "sigmoid", "mul"]),
]

# LayerNorm over the last dimension (W = 10 of Y_SHAPE); the functional spellings use the weight and
# bias of the (randomized) module ``a``
W = Y_SHAPE[-1]
_LN = lambda: {"a": nn.LayerNorm(W)}  # noqa: E731
LAYER_NORM = [
    ("nn.LayerNorm", _LN, lambda m, y, s: m.mods.a(y), "LayerNorm"),
    ("nn.LayerNorm-no-affine", lambda: {"a": nn.LayerNorm(W, eps=1e-3, elementwise_affine=False)},
     lambda m, y, s: m.mods.a(y), "LayerNorm"),
    ("nn.LayerNorm-no-bias", lambda: {"a": nn.LayerNorm([W], bias=False)},
     lambda m, y, s: m.mods.a(y), "LayerNorm"),
    ("nn.LayerNorm-then-ops", _LN, lambda m, y, s: F.gelu(m.mods.a(y)) * m.pc,
     ["LayerNorm", "gelu", "mul"]),
    ("F.layer_norm", _LN,
     lambda m, y, s: F.layer_norm(y, (W,), m.mods.a.weight, m.mods.a.bias, 1e-3), "layer_norm"),
    ("F.layer_norm-kwargs", _LN,
     lambda m, y, s: F.layer_norm(y, [W], weight=m.mods.a.weight, bias=m.mods.a.bias, eps=0.25),
     "layer_norm"),
    ("F.layer_norm-no-affine", None, lambda m, y, s: F.layer_norm(y * 3, (W,)),
     ["mul", "layer_norm"]),
    ("F.layer_norm-weight-only", _LN, lambda m, y, s: F.layer_norm(y, (W,), m.mods.a.weight),
     "layer_norm"),
    ("F.layer_norm-bias-only", _LN,
     lambda m, y, s: F.layer_norm(y, (W,), bias=m.mods.a.bias, eps=1e-2), "layer_norm"),
    ("F.layer_norm-weight-expression", _LN,
     lambda m, y, s: F.layer_norm(y, (W,), m.mods.a.weight * 2 + 1, m.mods.a.bias.neg()),
     "layer_norm"),
    ("F.layer_norm-in-dag", None,
     lambda m, y, s: torch.sigmoid(F.layer_norm(torch.relu(y) + s, (W,))) * y,
     ["relu", "add", "layer_norm", "sigmoid", "mul"]),
    ("torch.layer_norm", _LN,
     lambda m, y, s: torch.layer_norm(y, [W], m.mods.a.weight, m.mods.a.bias, 1e-5, True),
     "layer_norm"),
    ("torch.layer_norm-cudnn-disabled", _LN,
     lambda m, y, s: torch.layer_norm(y, (W,), None, m.mods.a.bias, 0.5, False), "layer_norm"),
    ("torch.layer_norm-kwargs", None,
     lambda m, y, s: torch.layer_norm(y, normalized_shape=(W,), eps=1e-3, cudnn_enable=False),
     "layer_norm"),
]

SPELLINGS = ARITH + ACT + CLAMP + NORM_DROPOUT + SOFTMAX + LAYER_NORM


def _chain(case):
    tail = case[3]
    return ["ConvTranspose3d", *([tail] if isinstance(tail, str) else tail)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SPELLINGS, ids=[c[0] for c in SPELLINGS])
def test_spelling_fused_and_equal(case, dtype):
    cid, mods, fn, _ = case
    m, inputs = build(fn, mods() if mods else None, dtype)
    if "BatchNorm" in cid or "batch_norm" in cid:   # random statistics, not the init values
        randomize_(m.mods, seed=7)
    opt = optimize_checked(m, inputs, chain=_chain(case))
    site = opt.ct3d_report.sites[0]
    assert site.fqn == "up" and site.kind == "module"
    assert site.ops_fused == len(site.chain) - 1
    assert site.output_shape == list(Y_SHAPE) and site.dtype == str(dtype)
    assert site.stop == "the result is a graph output", site.stop
    assert_matches(opt, m, inputs, what=cid)
    # fresh inputs, not only the example inputs the pass verified with
    fresh = (randn(*X_SHAPE, dtype=dtype, seed=11), randn(*Y_SHAPE, dtype=dtype, seed=12))
    assert_matches(opt, m, fresh, what=f"{cid} (fresh inputs)")


# --------------------------------------------------------------------------------------------
# Operands of binary ops
# --------------------------------------------------------------------------------------------
OPERANDS = {
    "python-float": lambda m, s: 0.75,
    "python-int": lambda m, s: 3,
    "0-d-buffer": lambda m, s: m.s0,
    "0-d-parameter": lambda m, s: m.p0,
    "param-(C,1,1,1)": lambda m, s: m.pc,
    "buffer-(1,C,1,1,1)": lambda m, s: m.bc,
    "vec-view-(C,1,1,1)": lambda m, s: m.vec.view(C, 1, 1, 1),
    "vec-view-(1,C,1,1,1)": lambda m, s: m.vec.view(1, -1, 1, 1, 1),
    "vec-reshape": lambda m, s: m.vec.reshape(1, C, 1, 1, 1),
    "vec-indexed": lambda m, s: m.vec[:, None, None, None],
    "param-expression": lambda m, s: m.pc * 2 + 1,
    "side-input-full": lambda m, s: s,
    "side-input-channel-slice": lambda m, s: s[:, :, :1, :1, :1],
}
BINOPS = {
    "add": (operator.add, "add"), "sub": (operator.sub, "sub"), "mul": (operator.mul, "mul"),
    "div": (operator.truediv, "truediv"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["conv-first", "operand-first"])
@pytest.mark.parametrize("op", list(BINOPS))
@pytest.mark.parametrize("operand", list(OPERANDS))
def test_binary_operand(operand, op, reverse, dtype):
    fn, name = BINOPS[op]
    get = OPERANDS[operand]
    if reverse:
        epi = lambda m, y, s: fn(get(m, s), y)  # noqa: E731
    else:
        epi = lambda m, y, s: fn(y, get(m, s))  # noqa: E731
    m, inputs = build(epi, dtype=dtype, seed=3)
    opt = optimize_checked(m, inputs, chain=["ConvTranspose3d", name])
    assert_matches(opt, m, inputs, what=f"{operand} {op} reverse={reverse}")


# --------------------------------------------------------------------------------------------
# Anchors: spellings and geometry
# --------------------------------------------------------------------------------------------
# (kernel, stride, padding, output_padding, dilation, groups, C_in, C_out, input spatial)
GEOMETRY = [
    (1, 1, 0, 0, 1, 1, 2, 3, (3, 3, 3)),
    (2, 2, 0, 0, 1, 1, 3, 2, (2, 3, 4)),
    (3, 2, 1, 1, 1, 1, 3, 4, (3, 2, 3)),
    ((2, 3, 1), (1, 2, 3), (0, 1, 0), (0, 1, 2), 1, 1, 2, 2, (3, 3, 2)),
    (3, 1, 2, 0, 2, 1, 2, 3, (4, 3, 3)),
    (2, 2, (1, 0, 1), 1, 2, 1, 2, 2, (3, 3, 3)),
    (3, 2, 1, 0, 1, 2, 4, 6, (2, 3, 3)),
    ((1, 3, 2), 3, (0, 1, 1), (2, 0, 1), (1, 1, 2), 3, 6, 3, (2, 2, 3)),
    (4, 1, 0, 0, 1, 4, 4, 4, (1, 2, 3)),
]


class Functional(nn.Module):
    """conv_transpose3d through ``fn`` (F.conv_transpose3d or torch.conv_transpose3d)."""

    def __init__(self, fn, conv, kwargs_style):
        super().__init__()
        self.fn, self.conv, self.kwargs_style = fn, conv, kwargs_style
        self.scale = nn.Parameter(torch.empty(conv.out_channels, 1, 1, 1))

    def forward(self, x):
        c = self.conv
        if self.kwargs_style:
            y = self.fn(x, c.weight, bias=c.bias, stride=c.stride, padding=c.padding,
                        output_padding=c.output_padding, groups=c.groups, dilation=c.dilation)
        else:
            y = self.fn(x, c.weight, c.bias, c.stride, c.padding, c.output_padding, c.groups,
                        c.dilation)
        return F.silu(y * self.scale)


class Module(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.scale = nn.Parameter(torch.empty(conv.out_channels, 1, 1, 1))

    def forward(self, x):
        return F.silu(self.conv(x) * self.scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("anchor", ["nn.ConvTranspose3d", "F.conv_transpose3d",
                                    "F.conv_transpose3d-kwargs", "torch.conv_transpose3d"])
@pytest.mark.parametrize("geom", GEOMETRY, ids=[f"g{i}" for i in range(len(GEOMETRY))])
def test_anchor_geometry(geom, anchor, bias, dtype):
    k, st, pa, op, di, g, cin, cout, sp = geom
    conv = nn.ConvTranspose3d(cin, cout, k, stride=st, padding=pa, output_padding=op, groups=g,
                              dilation=di, bias=bias)
    if anchor == "nn.ConvTranspose3d":
        m, chain0, kind = Module(conv), "ConvTranspose3d", "module"
    else:
        fn = torch.conv_transpose3d if anchor.startswith("torch") else F.conv_transpose3d
        m, chain0, kind = Functional(fn, conv, anchor.endswith("kwargs")), "conv_transpose3d", \
            "function"
    m = randomize_(m, seed=5).to(dtype).eval()
    x = randn(2, cin, *sp, dtype=dtype, seed=6)
    opt = optimize_checked(m, (x,), chain=[chain0, "mul", "silu"])
    assert opt.ct3d_report.sites[0].kind == kind
    assert_matches(opt, m, (x,), what=f"{anchor} {geom}")
    assert_matches(opt, m, (randn(1, cin, *sp, dtype=dtype, seed=8),), what="batch 1")


class OutputSize(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.up = nn.ConvTranspose3d(3, 2, 3, stride=(2, 3, 2), padding=1)
        self.size = size

    def forward(self, x):
        return torch.relu(self.up(x, output_size=self.size))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [[5, 7, 7], [6, 9, 8], [2, 2, 6, 8, 7], (5, 8, 8)], ids=str)
def test_anchor_output_size(size, dtype):
    m = randomize_(OutputSize(size)).to(dtype).eval()
    x = randn(2, 3, 3, 3, 4, dtype=dtype, seed=2)
    opt = optimize_checked(m, (x,), chain=["ConvTranspose3d", "relu"])
    out = opt(x)
    assert list(out.shape[2:]) == list(size)[-3:]
    assert opt.ct3d_report.sites[0].output_shape == [2, 2, *list(size)[-3:]]
    assert_matches(opt, m, (x,), what=f"output_size={size}")


class OutputSizeFromSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1)

    def forward(self, x, skip):
        return torch.relu(self.up(x, output_size=skip.shape)) + skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_anchor_output_size_from_tensor_shape(dtype):
    """``output_size=skip.shape`` (the U-Net idiom) is only known at run time."""
    m = randomize_(OutputSizeFromSkip()).to(dtype).eval()
    x = randn(2, 3, 3, 3, 4, dtype=dtype, seed=2)
    for spatial in [(5, 5, 7), (6, 6, 8), (5, 6, 8)]:
        skip = randn(2, 2, *spatial, dtype=dtype, seed=sum(spatial))
        opt = optimize_checked(m, (x, skip), chain=["ConvTranspose3d", "relu", "add"])
        assert_matches(opt, m, (x, skip), what=f"output_size={spatial}")
    # the same optimized module serves every output size
    for spatial in [(5, 5, 7), (6, 6, 8)]:
        skip = randn(2, 2, *spatial, dtype=dtype, seed=1)
        assert_matches(opt, m, (x, skip), what=f"reused at output_size={spatial}")


def test_several_sites_and_shared_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ConvTranspose3d(3, 3, 2, stride=2)
            self.b = nn.ConvTranspose3d(3, 2, 3, padding=1)

        def forward(self, x):
            y = torch.tanh(self.a(x))
            y = F.gelu(self.a(y) - 0.5)      # the same module twice
            return self.b(y) * 2.0

    m = randomize_(Net()).double().eval()
    x = randn(1, 3, 2, 2, 3)
    opt = optimize_checked(m, (x,), sites=3)
    chains = [s.chain for s in opt.ct3d_report.sites]
    assert chains == [["ConvTranspose3d", "tanh"], ["ConvTranspose3d", "sub", "gelu"],
                      ["ConvTranspose3d", "mul"]]
    assert [s.fqn for s in opt.ct3d_report.sites] == ["a", "a", "b"]
    assert_matches(opt, m, (x,))


def test_every_table_spelling_is_tested():
    """Each row of patterns.supported_table() has a case above (new spellings need a test)."""
    from ct3d_fx import patterns
    tested = {c[0].split("-")[0] for c in SPELLINGS}
    # nn.Dropout1d takes 2-D/3-D inputs only: it cannot follow a ConvTranspose3d in eager either
    tested.add("nn.Dropout1d")
    spellings = {sp for _, _, sps in patterns.supported_table() for sp in sps.split(", ")}
    aliases = {"F.relu_": "torch.relu_", "F.selu_": "torch.selu_", "F.celu_": "torch.celu_",
               "F.sigmoid": "torch.sigmoid", "F.tanh": "torch.tanh"}
    tested |= {aliases.get(t, t) for t in tested}
    missing = sorted(spellings - tested)
    assert not missing, f"spellings without a test: {missing}"


# --------------------------------------------------------------------------------------------
# softmax: only over the channels of an ungrouped conv whose C_out the tile holds
# --------------------------------------------------------------------------------------------
class _SoftmaxSite(nn.Module):
    def __init__(self, c_out, groups=1, functional=False, fn=None):
        super().__init__()
        self.up = nn.ConvTranspose3d(4, c_out, 3, stride=2, padding=1, groups=groups)
        self.functional = functional
        self.fn = fn or (lambda y: F.softmax(y, dim=1))

    def forward(self, x):
        if self.functional:
            y = F.conv_transpose3d(x, self.up.weight, self.up.bias, 2, 1, 0, self.up.groups)
        else:
            y = self.up(x)
        return self.fn(y)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("c_out,groups,why", [
    (64, 1, None),
    (65, 1, "spans C_out=65 channels; the fused kernel holds at most 64"),
    (8, 2, "spans the channels of a grouped ConvTranspose3d (groups=2)"),
])
def test_softmax_needs_all_channels_in_one_tile(c_out, groups, why, functional):
    m = randomize_(_SoftmaxSite(c_out, groups, functional), seed=3).double().eval()
    x = randn(1, 4, 2, 3, 2, dtype=torch.float64, seed=4)
    opt = optimize_checked(m, (x,))
    site = opt.ct3d_report.sites[0]
    anchor = "conv_transpose3d" if functional else "ConvTranspose3d"
    if why is None:
        assert site.chain == [anchor, "softmax"], site.chain
    else:
        assert site.chain == [anchor] and why in site.stop, site.stop
    assert_matches(opt, m, (x,), what=f"C_out={c_out} groups={groups}")


@pytest.mark.parametrize("fn,why", [
    (lambda y: F.softmax(y, dim=2), "softmax(dim=2) is not over the channels"),
    (lambda y: y.softmax(-1), "softmax(dim=-1) is not over the channels"),
    (lambda y: F.softmax(y, dim=1, dtype=torch.float64), "softmax(dtype=torch.float64) is not "
     "supported"),
    (lambda y: nn.functional.softmax(y, None), "implicit dim"),
], ids=["dim2", "last-dim", "dtype", "implicit-dim"])
def test_softmax_over_other_dims_stops_the_chain(fn, why):
    m = randomize_(_SoftmaxSite(6, fn=fn), seed=5).double().eval()
    x = randn(2, 4, 2, 3, 2, dtype=torch.float64, seed=6)
    with pytest.warns(UserWarning) if "implicit" in why else contextlib.nullcontext():
        opt = optimize_checked(m, (x,))
    site = opt.ct3d_report.sites[0]
    assert site.chain == ["ConvTranspose3d"] and why in site.stop, site.stop
    with pytest.warns(UserWarning) if "implicit" in why else contextlib.nullcontext():
        assert_matches(opt, m, (x,), what=why)


def test_softmax_on_unbatched_input_runs_the_original_ops():
    """dim=1 of a 4-D (unbatched) conv output is D, not the channels: the site runs unfused."""
    m = randomize_(_SoftmaxSite(6), seed=7).double().eval()
    opt = optimize_checked(m, (randn(2, 4, 2, 3, 2, dtype=torch.float64, seed=8),))
    x4 = randn(4, 3, 2, 3, dtype=torch.float64, seed=9)
    torch.testing.assert_close(opt(x4), m(x4), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# LayerNorm: only over the last dimension (W), only after an ungrouped conv
# --------------------------------------------------------------------------------------------
class _LayerNormSite(nn.Module):
    """ConvTranspose3d(4, 6, 3, stride 2, padding 1, output_padding 1): W_out = 10 for W = 5."""

    def __init__(self, fn=None, groups=1, functional=False, ln=None):
        super().__init__()
        self.up = nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                     groups=groups)
        self.ln = ln if ln is not None else nn.LayerNorm(10)
        self.functional = functional
        self.fn = fn or (lambda m, y: m.ln(y))

    def forward(self, x):
        if self.functional:
            y = F.conv_transpose3d(x, self.up.weight, self.up.bias, 2, 1, 1, self.up.groups)
        else:
            y = self.up(x)
        return self.fn(self, y)


def _ln_input(seed=4, n=2):
    return randn(n, 4, 3, 4, 5, dtype=torch.float64, seed=seed)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("groups,why", [
    (1, None),
    (2, "spans the W positions of a row of a grouped ConvTranspose3d (groups=2)"),
])
@pytest.mark.parametrize("spelling", ["nn.LayerNorm", "F.layer_norm"])
def test_layer_norm_needs_an_ungrouped_conv(spelling, groups, why, functional):
    fn = None if spelling == "nn.LayerNorm" else \
        (lambda m, y: F.layer_norm(y, (10,), m.ln.weight, m.ln.bias))
    m = randomize_(_LayerNormSite(fn, groups, functional), seed=3).double().eval()
    x = _ln_input()
    opt = optimize_checked(m, (x,))
    site = opt.ct3d_report.sites[0]
    anchor = "conv_transpose3d" if functional else "ConvTranspose3d"
    name = "LayerNorm" if spelling == "nn.LayerNorm" else "layer_norm"
    if why is None:
        assert site.chain == [anchor, name], site.chain
        assert site.stop == "the result is a graph output", site.stop
    else:
        assert site.chain == [anchor] and why in site.stop, site.stop
        assert site.stop.startswith(name), site.stop
    assert_matches(opt, m, (x,), what=f"{spelling} groups={groups}")


@pytest.mark.parametrize("fn,ln,why", [
    (lambda m, y: F.layer_norm(y, (8, 10)), None,
     "layer_norm over normalized_shape=(8, 10) (2 dims) is not fused: only a LayerNorm over the "
     "last dimension (W) is"),
    (lambda m, y: torch.layer_norm(F.relu(y), [6, 8, 10]), None,
     "layer_norm over normalized_shape=(6, 8, 10) (3 dims) is not fused"),
    (None, nn.LayerNorm((8, 10)),
     "LayerNorm over normalized_shape=(8, 10) (2 dims) is not fused: only a LayerNorm over the "
     "last dimension (W) is"),
    (None, nn.LayerNorm([8, 10], elementwise_affine=False), "(2 dims) is not fused"),
    (lambda m, y: F.layer_norm(y, m.ln.weight.shape), None,   # a shape read when it runs
     "layer_norm normalized_shape=getattr_1 is not constant ints"),
    (lambda m, y: F.layer_norm(y, (10,), eps=torch.tensor(1e-3, dtype=torch.float64)), None,
     "layer_norm eps=_tensor_constant0 is not a Python number"),
], ids=["F-2-dims", "torch-3-dims", "module-2-dims", "module-2-dims-no-affine", "runtime-shape",
        "tensor-eps"])
def test_layer_norm_over_more_dims_stops_the_chain(fn, ln, why):
    m = randomize_(_LayerNormSite(fn, ln=ln), seed=5).double().eval()
    x = _ln_input(seed=6)
    opt = optimize_checked(m, (x,))
    site = opt.ct3d_report.sites[0]
    assert site.chain[0] == "ConvTranspose3d" and "layer_norm" not in site.chain
    assert "LayerNorm" not in site.chain and why in site.stop, site.stop
    assert why in str(opt.ct3d_report)
    assert_matches(opt, m, (x,), what=why)


def test_layer_norm_family_can_be_disabled():
    m = randomize_(_LayerNormSite(), seed=7).double().eval()
    x = _ln_input(seed=8)
    cfg = ct3d_fx.Config(families=ct3d_fx.Config().families - {"layer_norm"})
    opt = optimize_checked(m, (x,), chain=["ConvTranspose3d"], config=cfg)
    assert opt.ct3d_report.sites[0].stop == \
        "LayerNorm (family 'layer_norm') is disabled by Config.families"
    assert_matches(opt, m, (x,))


class _LayerNormOfSideInput(nn.Module):
    """LayerNorms of a value that does not come from the conv (a side input) next to one that
    does."""

    def __init__(self, where):
        super().__init__()
        self.up = nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.ln = nn.LayerNorm(10)
        self.ln_skip = nn.LayerNorm(10)
        self.where = where

    def forward(self, x, skip):
        y = self.up(x)
        if self.where == "operand":          # LN(skip) is an operand of the chain's add
            return F.silu(y + self.ln_skip(skip))
        if self.where == "input":            # LN of (conv output + side input)
            return self.ln(y + skip) * 2.0
        # LN(skip), then LN of the chain: two LayerNorms, one fused
        return self.ln(y * self.ln_skip(skip))


@pytest.mark.parametrize("where,chain", [
    ("operand", ["ConvTranspose3d", "add", "silu"]),
    ("input", ["ConvTranspose3d", "add", "LayerNorm", "mul"]),
    ("both", ["ConvTranspose3d", "mul", "LayerNorm"]),
])
def test_layer_norm_of_a_side_input(where, chain):
    m = randomize_(_LayerNormOfSideInput(where), seed=9).double().eval()
    xs = (_ln_input(seed=10), randn(2, 6, 6, 8, 10, dtype=torch.float64, seed=11))
    opt = optimize_checked(m, xs, chain=chain)
    site = opt.ct3d_report.sites[0]
    # LN(skip) does not depend on the conv output: it stays in the graph and arrives as an extra
    lns = [n for n in opt.graph.nodes if n.op == "call_module" and n.target == "ln_skip"]
    assert len(lns) == (0 if where == "input" else 1), opt.code
    n_ln = sum(1 for i in range(0, len(site.program), 6) if site.program[i] == 42)
    assert n_ln == (0 if where == "operand" else 1), site.program
    assert_matches(opt, m, xs, what=where)
    fresh = (_ln_input(seed=12), randn(2, 6, 6, 8, 10, dtype=torch.float64, seed=13))
    assert_matches(opt, m, fresh, what=f"{where} (fresh inputs)")


def test_layer_norm_on_unbatched_input_runs_the_original_ops():
    m = randomize_(_LayerNormSite(), seed=14).double().eval()
    opt = optimize_checked(m, (_ln_input(seed=15),))
    x4 = randn(4, 3, 4, 5, dtype=torch.float64, seed=16)
    torch.testing.assert_close(opt(x4), m(x4), rtol=1e-12, atol=1e-12)


def test_layer_norm_check_rejects_non_number_eps_and_non_graph_weight():
    from ct3d_fx import patterns
    spec = patterns._SPECS[("call_function", F.layer_norm)]
    ok = {"normalized_shape": (10,), "weight": None, "bias": None, "eps": 1e-5}
    assert spec.check(ok, None) is None and spec.spans_w and not spec.spans_channels
    assert "eps='x' is not a Python number" in spec.check(dict(ok, eps="x"), None)
    assert "eps=True is not a Python number" in spec.check(dict(ok, eps=True), None)
    assert "weight=" in spec.check(dict(ok, weight=torch.ones(10)), None)
    assert "is not constant ints" in spec.check(dict(ok, normalized_shape=10), None)
    assert "is not a positive size" in spec.check(dict(ok, normalized_shape=(0,)), None)
