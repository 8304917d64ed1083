"""The table of fusable ops: every spelling of an epilogue op -> one epilogue opcode.

Epilogue ops are elementwise, except softmax and log_softmax over the channels (dim=1), which
the kernel computes per output voxel from the C_out values its tile holds, and LayerNorm over
the last dimension (W), which it computes per row of W values when its tile holds whole rows.

A spelling is an ``nn.Module`` class (``call_module``), a function (``call_function``: torch.*,
torch.nn.functional.*, operator.*) or a Tensor method name (``call_method``). Each maps to an
:class:`OpSpec` that names the op, its family (for ``Config.families``), how to bind its arguments,
which arguments are tensor operands, when it cannot be fused (a readable reason) and how to encode
it into the epilogue program (see :mod:`ct3d_fx.ops`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import Opcode

__all__ = ["OpSpec", "FAMILIES", "lookup", "is_anchor", "describe", "supported_table"]

FAMILIES = frozenset({"arithmetic", "activation", "clamp", "batch_norm", "dropout", "residual",
                      "softmax", "layer_norm", "spatial_softmax", "pool_tail", "norm_tail"})


@dataclass(frozen=True)
class OpSpec:
    """How one spelling of an elementwise op is checked and encoded.

    ``bind(*args, **kwargs)`` returns the arguments by name. ``operands`` names the arguments that
    are tensors of the chain (or external tensors for binary ops). ``check(bound, module)`` returns
    a reason when this use cannot be fused. ``encode(e, bound, module)`` emits instructions through
    the emitter ``e`` and returns the resulting value number (``None`` for identities: the value of
    the first operand passes through).
    """

    name: str
    family: str
    bind: Callable[..., Dict[str, Any]]
    operands: Tuple[str, ...]
    encode: Callable[[Any, Dict[str, Any], Optional[nn.Module]], Optional[int]]
    check: Optional[Callable[[Dict[str, Any], Optional[nn.Module]], Optional[str]]] = None
    inplace: bool = False
    mode_dependent: bool = False   # reads module.training at run time (BatchNorm, Dropout)
    alias: bool = False            # may return its input itself (detach, eval Dropout, Identity)
    spans_channels: bool = False   # combines the channels of a voxel (softmax over dim 1): the
    #                                pass checks the conv's groups and C_out (fuse.py)
    spans_w: bool = False          # combines the W positions of a row (LayerNorm over the last
    #                                dim): the pass checks the conv's groups (fuse.py)


def _binder(fn):
    def bind(*args, **kwargs):
        import inspect
        ba = inspect.signature(fn).bind(*args, **kwargs)
        ba.apply_defaults()
        return dict(ba.arguments)
    return bind


# --- signatures (names follow torch's own) -----------------------------------------------------
def _s_unary(input, inplace=False): ...
def _s_unary_noinplace(input): ...
def _s_binary(input, other, alpha=1, out=None): ...
def _s_div(input, other, rounding_mode=None, out=None): ...
def _s_rsub(input, other, alpha=1): ...
def _s_pow(input, exponent): ...
def _s_leaky(input, negative_slope=0.01, inplace=False): ...
def _s_elu(input, alpha=1.0, inplace=False): ...
def _s_gelu(input, approximate="none"): ...
def _s_hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False): ...
def _s_softplus(input, beta=1.0, threshold=20.0): ...
def _s_clamp(input, min=None, max=None, out=None): ...
def _s_clamp_min(input, min): ...
def _s_clamp_max(input, max): ...
def _s_prelu(input, weight): ...
def _s_dropout(input, p=0.5, training=True, inplace=False): ...
def _s_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                  momentum=0.1, eps=1e-5): ...
def _s_softmax(input, dim=None, _stacklevel=3, dtype=None): ...
def _s_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...
def _s_torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-05,
                        cudnn_enable=True): ...
def _s_module(input): ...
def _s_identity(input, *args, **kwargs): ...


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _unary(opcode):
    def enc(e, b, m):
        return e.emit(opcode, e.value(b["input"]))
    return enc


def _identity(e, b, m):
    return None


def _binary(opcode, reverse=False):
    """``input (op) alpha * other``; reversed (rsub): ``other (op) alpha * input``."""
    def enc(e, b, m):
        x, y = e.value(b["input"]), e.value(b["other"])
        alpha = b.get("alpha", 1)
        if alpha != 1:  # MUL takes two value numbers: the scalar is loaded first
            if reverse:
                x = e.emit(Opcode.MUL, x, e.value(alpha))
            else:
                y = e.emit(Opcode.MUL, y, e.value(alpha))
        return e.emit(opcode, y, x) if reverse else e.emit(opcode, x, y)
    return enc


def _check_binary(b, m):
    if b.get("out") is not None:
        return "out= is not supported"
    alpha = b.get("alpha", 1)
    if not _num(alpha):
        return f"alpha={alpha!r} is not a Python number"
    for k in ("input", "other"):
        if not (_num(b[k]) or isinstance(b[k], torch.fx.Node)):
            return f"operand {k}={b[k]!r} is not a tensor or a Python number"
    return None


def _check_div(b, m):
    if b.get("rounding_mode") is not None:
        return f"div(rounding_mode={b['rounding_mode']!r}) is not true division"
    return _check_binary(b, m)


def _enc_pow(e, b, m):
    return e.emit(Opcode.SQUARE, e.value(b["input"]))


def _check_pow(b, m):
    if not isinstance(b["input"], torch.fx.Node):
        return "pow with a tensor exponent is not supported"
    if b["exponent"] != 2:
        return f"pow(exponent={b['exponent']!r}) is not supported (only 2)"
    return None


def _enc_scalar_op(opcode, *names):
    def enc(e, b, m):
        return e.emit(opcode, e.value(b["input"]), *[e.scalar(b[n]) for n in names])
    return enc


def _check_scalars(*names):
    def check(b, m):
        for n in names:
            if not _num(b[n]):
                return f"{n}={b[n]!r} is not a Python number"
        return None
    return check


def _enc_gelu(e, b, m):
    return e.emit(Opcode.GELU, e.value(b["input"]), 1 if b["approximate"] == "tanh" else 0)


def _check_gelu(b, m):
    if b["approximate"] not in ("none", "tanh"):
        return f"gelu(approximate={b['approximate']!r}) is unknown"
    return None


def _enc_clamp(e, b, m):
    lo, hi = b.get("min"), b.get("max")
    return e.emit(Opcode.CLAMP, e.value(b["input"]),
                  -1 if lo is None else e.scalar(lo), -1 if hi is None else e.scalar(hi))


def _check_clamp(b, m):
    if b.get("out") is not None:
        return "out= is not supported"
    for k in ("min", "max"):
        if k in b and b[k] is not None and not _num(b[k]):
            return f"clamp with a tensor {k} is not supported"
    if b.get("min") is None and b.get("max") is None:
        return "clamp needs min or max"
    return None


def _enc_relu6(e, b, m):
    return e.emit(Opcode.HARDTANH, e.value(b["input"]), e.scalar(0.0), e.scalar(6.0))


def _enc_prelu(e, b, m):
    w = b["weight"] if m is None else m.weight
    return e.emit(Opcode.PRELU, e.value(b["input"]), e.tensor(w))


def _check_prelu(b, m):
    if m is None and not isinstance(b["weight"], torch.fx.Node):
        return "prelu weight is not a graph value"
    return None


def _check_dropout_fn(b, m):
    if b["training"] is not False:
        return "dropout with training=True is random (pass training=False or use nn.Dropout)"
    return None


def _check_dropout_mod(b, m):
    if m.training:
        return f"{type(m).__name__} in training mode is random (call model.eval() first)"
    return None


def _enc_bn_mod(e, b, m):
    affine = m.weight is not None
    t = e.tensor(m.running_mean)
    e.tensor(m.running_var)
    if affine:
        e.tensor(m.weight)
        e.tensor(m.bias)
    eps = e.scalar(float(m.eps))
    return e.emit(Opcode.BATCH_NORM, e.value(b["input"]), t, 1 if affine else 0, eps)


def _check_bn_mod(b, m):
    name = type(m).__name__
    if m.training:
        return f"{name} in training mode uses batch statistics"
    if not m.track_running_stats or m.running_mean is None:
        return f"{name} without running statistics (track_running_stats=False) uses batch statistics"
    if (m.weight is None) != (m.bias is None):
        return f"{name} with only one of weight/bias is not supported"
    return None


def _enc_bn_fn(e, b, m):
    affine = b["weight"] is not None
    t = e.tensor(b["running_mean"])
    e.tensor(b["running_var"])
    if affine:
        e.tensor(b["weight"])
        e.tensor(b["bias"])
    return e.emit(Opcode.BATCH_NORM, e.value(b["input"]), t, 1 if affine else 0,
                  e.scalar(float(b["eps"])))


def _check_bn_fn(b, m):
    if b["training"] is not False:
        return "batch_norm with training=True uses batch statistics"
    for k in ("running_mean", "running_var"):
        if not isinstance(b[k], torch.fx.Node):
            return f"batch_norm {k}={b[k]!r} is not a tensor"
    if (b["weight"] is None) != (b["bias"] is None):
        return "batch_norm with only one of weight/bias is not supported"
    if not _num(b["eps"]):
        return f"batch_norm eps={b['eps']!r} is not a Python number"
    return None


def _softmax_dim_reason(name, dim):
    if dim is None:
        return f"{name} with an implicit dim (dim=None) is not supported: pass dim=1"
    if dim not in (1, -4):
        return (f"{name}(dim={dim!r}) is not over the channels (dim=1 of the 5-D output), "
                f"so it is not a per-voxel epilogue")
    return None


def _check_softmax(name):
    def check(b, m):
        if b.get("dtype") is not None:
            return f"{name}(dtype={b['dtype']}) is not supported"
        return _softmax_dim_reason(name, b["dim"])
    return check


def _enc_softmax(log):
    def enc(e, b, m):
        dim = b["dim"] if m is None else m.dim
        return e.emit(Opcode.SOFTMAX, e.value(b["input"]), 1 if log else 0, int(dim))
    return enc


def _check_softmax_mod(b, m):
    return _softmax_dim_reason(type(m).__name__, m.dim)


def _ln_shape(shape) -> Optional[Tuple[int, ...]]:
    """``normalized_shape`` as a tuple of ints, None when it is not constant ints (e.g.
    ``x.shape[-1:]`` computed at run time; a bare int, which F.layer_norm refuses)."""
    if isinstance(shape, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in shape):
        return tuple(shape)
    return None


def _ln_shape_reason(name, shape) -> Optional[str]:
    ns = _ln_shape(shape)
    if ns is None:
        return (f"{name} normalized_shape={_fmt(shape)} is not constant ints (e.g. computed at "
                f"run time)")
    if len(ns) != 1:
        return (f"{name} over normalized_shape={ns} ({len(ns)} dims) is not fused: only a "
                f"LayerNorm over the last dimension (W) is")
    if ns[0] < 1:
        return f"{name} over normalized_shape={ns} is not a positive size"
    return None


def _check_ln_fn(b, m):
    r = _ln_shape_reason("layer_norm", b["normalized_shape"])
    if r:
        return r
    for k in ("weight", "bias"):
        if b[k] is not None and not isinstance(b[k], torch.fx.Node):
            return f"layer_norm {k}={b[k]!r} is not a graph value"
    if not _num(b["eps"]):
        return f"layer_norm eps={_fmt(b['eps'])} is not a Python number"
    return None


def _enc_ln(e, b, m):
    """LAYER_NORM: the weight and bias (a module's own Parameters, or graph values) become extras,
    so the optimized model reads the same tensors at every call."""
    if m is None:
        w, bias, eps, ns = b["weight"], b["bias"], b["eps"], b["normalized_shape"]
    else:
        w, bias, eps, ns = m.weight, m.bias, m.eps, m.normalized_shape
    x = e.value(b["input"])
    wi = -1 if w is None else e.tensor(w)
    bi = -1 if bias is None else e.tensor(bias)
    return e.emit(Opcode.LAYER_NORM, x, wi, bi, e.scalar(float(eps)), int(_ln_shape(ns)[0]))


def _check_ln_mod(b, m):
    name = type(m).__name__
    r = _ln_shape_reason(name, m.normalized_shape)
    if r:
        return r
    if not _num(m.eps):
        return f"{name} eps={m.eps!r} is not a Python number"
    for k in ("weight", "bias"):
        t = getattr(m, k, None)
        if t is not None and not isinstance(t, torch.Tensor):
            return f"{name}.{k} is not a tensor"
    return None


# --- module encoders (arguments come from the module's attributes) -----------------------------
def _mod_scalar(opcode, *attrs):
    def enc(e, b, m):
        return e.emit(opcode, e.value(b["input"]), *[e.scalar(float(getattr(m, a))) for a in attrs])
    return enc


def _enc_gelu_mod(e, b, m):
    return e.emit(Opcode.GELU, e.value(b["input"]), 1 if m.approximate == "tanh" else 0)


def _check_gelu_mod(b, m):
    return _check_gelu({"approximate": m.approximate}, m)


_SPECS: Dict[Tuple[str, Any], OpSpec] = {}


def _add(keys, spec: OpSpec):
    for k in keys:
        _SPECS[k] = spec


def _fn(*fns):
    return [("call_function", f) for f in fns]


def _meth(*names):
    return [("call_method", n) for n in names]


def _mod(*classes):
    return [("call_module", c) for c in classes]


def _both(name, fam, bind, ops, enc, check=None, *, fns=(), inplace_fns=(), meths=(),
          inplace_meths=()):
    base = OpSpec(name, fam, bind, ops, enc, check)
    inpl = OpSpec(name + "_", fam, bind, ops, enc, check, inplace=True)
    _add(_fn(*fns) + _meth(*meths), base)
    _add(_fn(*inplace_fns) + _meth(*inplace_meths), inpl)


# arithmetic (binary ops take scalars, per-channel tensors, full-shape tensors, chain values)
_bin = _binder(_s_binary)
_both("add", "arithmetic", _bin, ("input", "other"), _binary(Opcode.ADD), _check_binary,
      fns=(torch.add, operator.add), inplace_fns=(operator.iadd,), meths=("add",),
      inplace_meths=("add_",))
_both("sub", "arithmetic", _bin, ("input", "other"), _binary(Opcode.SUB), _check_binary,
      fns=(torch.sub, torch.subtract, operator.sub), inplace_fns=(operator.isub,),
      meths=("sub", "subtract"), inplace_meths=("sub_", "subtract_"))
_both("mul", "arithmetic", _bin, ("input", "other"), _binary(Opcode.MUL), _check_binary,
      fns=(torch.mul, torch.multiply, operator.mul), inplace_fns=(operator.imul,),
      meths=("mul", "multiply"), inplace_meths=("mul_", "multiply_"))
_both("div", "arithmetic", _binder(_s_div), ("input", "other"), _binary(Opcode.DIV), _check_div,
      fns=(torch.div, torch.divide, torch.true_divide, operator.truediv),
      inplace_fns=(operator.itruediv,), meths=("div", "divide", "true_divide"),
      inplace_meths=("div_", "divide_", "true_divide_"))
_add(_fn(torch.rsub),
     OpSpec("rsub", "arithmetic", _binder(_s_rsub), ("input", "other"),
            _binary(Opcode.SUB, reverse=True), _check_binary))
_both("neg", "arithmetic", _binder(_s_unary_noinplace), ("input",), _unary(Opcode.NEG),
      fns=(torch.neg, torch.negative, operator.neg), inplace_fns=(torch.neg_, torch.negative_),
      meths=("neg", "negative"), inplace_meths=("neg_", "negative_"))
_both("abs", "arithmetic", _binder(_s_unary_noinplace), ("input",), _unary(Opcode.ABS),
      fns=(torch.abs, torch.absolute, operator.abs), inplace_fns=(torch.abs_,),
      meths=("abs", "absolute"), inplace_meths=("abs_", "absolute_"))
_both("square", "arithmetic", _binder(_s_unary_noinplace), ("input",), _unary(Opcode.SQUARE),
      fns=(torch.square,), inplace_fns=(torch.square_,), meths=("square",),
      inplace_meths=("square_",))
_both("pow", "arithmetic", _binder(_s_pow), ("input",), _enc_pow, _check_pow,
      fns=(torch.pow, operator.pow), inplace_fns=(operator.ipow,), meths=("pow",),
      inplace_meths=("pow_",))

# activations
_un = _binder(_s_unary)
_un1 = _binder(_s_unary_noinplace)
for _name, _opc, _fns, _ifns, _meths, _imeths, _bindf in [
    ("relu", Opcode.RELU, (torch.relu, F.relu), (torch.relu_, F.relu_), ("relu",), ("relu_",), _un),
    ("selu", Opcode.SELU, (torch.selu, F.selu), (torch.selu_, F.selu_), (), (), _un),
    ("silu", Opcode.SILU, (F.silu,), (), (), (), _un),
    ("mish", Opcode.MISH, (F.mish,), (), (), (), _un),
    ("hardswish", Opcode.HARDSWISH, (F.hardswish,), (), (), (), _un),
    ("hardsigmoid", Opcode.HARDSIGMOID, (F.hardsigmoid,), (), (), (), _un),
    ("sigmoid", Opcode.SIGMOID, (torch.sigmoid, F.sigmoid, torch.special.expit),
     (torch.sigmoid_,), ("sigmoid",),
     ("sigmoid_",), _un1),
    ("tanh", Opcode.TANH, (torch.tanh, F.tanh), (torch.tanh_,), ("tanh",), ("tanh_",), _un1),
]:
    _both(_name, "activation", _bindf, ("input",), _unary(_opc), fns=_fns, inplace_fns=_ifns,
          meths=_meths, inplace_meths=_imeths)


_both("relu6", "activation", _un, ("input",), _enc_relu6, fns=(F.relu6,))
_both("leaky_relu", "activation", _binder(_s_leaky), ("input",),
      _enc_scalar_op(Opcode.LEAKY_RELU, "negative_slope"), _check_scalars("negative_slope"),
      fns=(F.leaky_relu,), inplace_fns=(F.leaky_relu_,))
_both("elu", "activation", _binder(_s_elu), ("input",), _enc_scalar_op(Opcode.ELU, "alpha"),
      _check_scalars("alpha"), fns=(F.elu,), inplace_fns=(F.elu_,))
_both("celu", "activation", _binder(_s_elu), ("input",), _enc_scalar_op(Opcode.CELU, "alpha"),
      _check_scalars("alpha"), fns=(F.celu, torch.celu), inplace_fns=(F.celu_,))
_both("gelu", "activation", _binder(_s_gelu), ("input",), _enc_gelu, _check_gelu,
      fns=(F.gelu,))
_both("hardtanh", "activation", _binder(_s_hardtanh), ("input",),
      _enc_scalar_op(Opcode.HARDTANH, "min_val", "max_val"), _check_scalars("min_val", "max_val"),
      fns=(F.hardtanh,), inplace_fns=(F.hardtanh_,))
_both("softplus", "activation", _binder(_s_softplus), ("input",),
      _enc_scalar_op(Opcode.SOFTPLUS, "beta", "threshold"), _check_scalars("beta", "threshold"),
      fns=(F.softplus,))
_both("prelu", "activation", _binder(_s_prelu), ("input",), _enc_prelu, _check_prelu,
      fns=(F.prelu, torch.prelu), meths=("prelu",))

# clamp
_both("clamp", "clamp", _binder(_s_clamp), ("input",), _enc_clamp, _check_clamp,
      fns=(torch.clamp, torch.clip), inplace_fns=(torch.clamp_, torch.clip_),
      meths=("clamp", "clip"), inplace_meths=("clamp_", "clip_"))
_both("clamp_min", "clamp", _binder(_s_clamp_min), ("input",),
      lambda e, b, m: _enc_clamp(e, {"input": b["input"], "min": b["min"]}, m),
      lambda b, m: _check_clamp({"min": b["min"]}, m),
      fns=(torch.clamp_min,), inplace_fns=(torch.clamp_min_,), meths=("clamp_min",),
      inplace_meths=("clamp_min_",))
_both("clamp_max", "clamp", _binder(_s_clamp_max), ("input",),
      lambda e, b, m: _enc_clamp(e, {"input": b["input"], "max": b["max"]}, m),
      lambda b, m: _check_clamp({"max": b["max"]}, m),
      fns=(torch.clamp_max,), inplace_fns=(torch.clamp_max_,), meths=("clamp_max",),
      inplace_meths=("clamp_max_",))

# identities: dropout in eval mode, clone/detach/contiguous
_add(_fn(F.dropout, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout),
     OpSpec("dropout", "dropout", _binder(_s_dropout), ("input",), _identity, _check_dropout_fn,
            alias=True))
_add(_meth("clone") + _fn(torch.clone),
     OpSpec("identity", "dropout", _binder(_s_identity), ("input",), _identity))
_add(_meth("contiguous") + _fn(operator.pos),
     OpSpec("identity", "dropout", _binder(_s_identity), ("input",), _identity, alias=True))
# detach: the same values, but no gradient flows through it (a DETACH instruction, which the
# CUDA kernel folds away and autograd respects)
_add(_meth("detach") + _fn(torch.detach),
     OpSpec("detach", "dropout", _binder(_s_identity), ("input",), _unary(Opcode.DETACH),
            alias=True))

# batch norm (functional, eval)
_add(_fn(F.batch_norm),
     OpSpec("batch_norm", "batch_norm", _binder(_s_batch_norm), ("input",), _enc_bn_fn,
            _check_bn_fn))

# softmax over the channels (one voxel's C_out values, all in the kernel's tile)
for _name, _log, _fns, _meth_name in [
        ("softmax", False, (F.softmax, torch.softmax), "softmax"),
        ("log_softmax", True, (F.log_softmax, torch.log_softmax), "log_softmax")]:
    _add(_fn(*_fns) + _meth(_meth_name),
         OpSpec(_name, "softmax", _binder(_s_softmax), ("input",), _enc_softmax(_log),
                _check_softmax(_name), spans_channels=True))

# LayerNorm over the last dimension (W: one row of the conv output, all in the kernel's tile when
# it holds whole rows)
_add(_fn(F.layer_norm),
     OpSpec("layer_norm", "layer_norm", _binder(_s_layer_norm), ("input",), _enc_ln, _check_ln_fn,
            spans_w=True))
_add(_fn(torch.layer_norm),
     OpSpec("layer_norm", "layer_norm", _binder(_s_torch_layer_norm), ("input",), _enc_ln,
            _check_ln_fn, spans_w=True))

# modules
_m = _binder(_s_module)
for _cls, _opc in [(nn.ReLU, Opcode.RELU), (nn.SELU, Opcode.SELU), (nn.SiLU, Opcode.SILU),
                   (nn.Mish, Opcode.MISH), (nn.Hardswish, Opcode.HARDSWISH),
                   (nn.Hardsigmoid, Opcode.HARDSIGMOID), (nn.Sigmoid, Opcode.SIGMOID),
                   (nn.Tanh, Opcode.TANH)]:
    _add(_mod(_cls), OpSpec(_cls.__name__, "activation", _m, ("input",), _unary(_opc)))
_add(_mod(nn.ReLU6), OpSpec("ReLU6", "activation", _m, ("input",), _enc_relu6))
_add(_mod(nn.LeakyReLU), OpSpec("LeakyReLU", "activation", _m, ("input",),
                                _mod_scalar(Opcode.LEAKY_RELU, "negative_slope")))
_add(_mod(nn.ELU), OpSpec("ELU", "activation", _m, ("input",), _mod_scalar(Opcode.ELU, "alpha")))
_add(_mod(nn.CELU), OpSpec("CELU", "activation", _m, ("input",),
                           _mod_scalar(Opcode.CELU, "alpha")))
_add(_mod(nn.GELU), OpSpec("GELU", "activation", _m, ("input",), _enc_gelu_mod, _check_gelu_mod))
_add(_mod(nn.Hardtanh), OpSpec("Hardtanh", "activation", _m, ("input",),
                               _mod_scalar(Opcode.HARDTANH, "min_val", "max_val")))
_add(_mod(nn.Softplus), OpSpec("Softplus", "activation", _m, ("input",),
                               _mod_scalar(Opcode.SOFTPLUS, "beta", "threshold")))
_add(_mod(nn.PReLU), OpSpec("PReLU", "activation", _m, ("input",), _enc_prelu))
_add(_mod(nn.BatchNorm3d, nn.SyncBatchNorm),
     OpSpec("BatchNorm3d", "batch_norm", _m, ("input",), _enc_bn_mod, _check_bn_mod,
            mode_dependent=True))
_add(_mod(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
          nn.FeatureAlphaDropout),
     OpSpec("Dropout", "dropout", _m, ("input",), _identity, _check_dropout_mod,
            mode_dependent=True, alias=True))
_add(_mod(nn.Softmax), OpSpec("Softmax", "softmax", _m, ("input",), _enc_softmax(False),
                             _check_softmax_mod, spans_channels=True))
_add(_mod(nn.LogSoftmax), OpSpec("LogSoftmax", "softmax", _m, ("input",), _enc_softmax(True),
                                _check_softmax_mod, spans_channels=True))
_add(_mod(nn.LayerNorm), OpSpec("LayerNorm", "layer_norm", _m, ("input",), _enc_ln,
                                _check_ln_mod, spans_w=True))
_add(_mod(nn.Identity), OpSpec("Identity", "dropout", _binder(_s_identity), ("input",),
                               _identity, alias=True))

# ReLU(inplace=True) and friends are in-place modules but their input is overwritten only when
# inplace is set; the matcher asks `module_inplace(m)`.
_INPLACE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish,
                    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Dropout, nn.Dropout1d,
                    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def module_inplace(m: nn.Module) -> bool:
    """True for activation/dropout modules constructed with ``inplace=True``."""
    return isinstance(m, _INPLACE_MODULES) and bool(getattr(m, "inplace", False))


def lookup(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> Optional[OpSpec]:
    """The OpSpec for ``node``, or None when it is not a fusable elementwise op."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None:
            return None
        spec = _SPECS.get(("call_module", type(m)))
        if spec is None:
            # subclasses that keep the base forward behave like the base
            for base in type(m).__mro__[1:]:
                s = _SPECS.get(("call_module", base))
                if s is not None and type(m).forward is base.forward:
                    spec = s
                    break
        return spec
    if node.op in ("call_function", "call_method"):
        try:
            return _SPECS.get((node.op, node.target))
        except TypeError:  # unhashable target
            return None
    return None


def is_anchor(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """True for ConvTranspose3d calls: nn.ConvTranspose3d modules, F/torch.conv_transpose3d."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, nn.ConvTranspose3d) and (
            type(m).forward is nn.ConvTranspose3d.forward)
    if node.op == "call_function":
        return node.target in (F.conv_transpose3d, torch.conv_transpose3d)
    return False


def _fmt(v) -> str:
    if isinstance(v, torch.fx.Node):
        return v.name
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)


def _defaults(fn) -> Dict[str, Any]:
    """Keyword defaults of a Python function (empty for builtins without a signature)."""
    import inspect
    try:
        ps = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in ps if p.default is not inspect.Parameter.empty}


def describe(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> str:
    """A short description of any node for reports: ``softmax(dim=1)``, ``GroupNorm``, ..."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return type(m).__name__ if m is not None else str(node.target)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_method":
        name = str(node.target)
    elif node.op == "output":
        return "the graph output"
    else:
        return node.name
    extra = [_fmt(a) for a in node.args[1:] if not isinstance(a, torch.fx.Node)]
    # F.softmax(x, dim=1) traces with every keyword (_stacklevel=3, dtype=None): show only
    # the ones the caller changed
    dflt = _defaults(node.target) if node.op == "call_function" else {}
    extra += [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()
              if not k.startswith("_") and not (k in dflt and _same(dflt[k], v))]
    return f"{name}({', '.join(extra)})" if extra else name


def _same(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # tensors and other values without a plain truth value
        return False


def supported_table():
    """Rows (family, op name, spellings) of every fusable spelling, for docs and the README."""
    rows: Dict[Tuple[str, str], list] = {}
    for (kind, target), spec in _SPECS.items():
        if kind == "call_module":
            sps = [f"nn.{target.__name__}"]
        elif kind == "call_method":
            sps = [f"Tensor.{target}"]
        else:  # every public name of the function (F.relu_ and torch.relu_ are one object)
            name = getattr(target, "__name__", str(target))
            homes = [("operator", operator, name), ("F", F, name), ("torch", torch, name),
                     ("torch.special", torch.special, name.replace("special_", "", 1))]
            sps = [f"{pre}.{n}" for pre, mod, n in homes if getattr(mod, n, None) is target]
            sps = sps or [f"torch.{name}"]
        rows.setdefault((spec.family, spec.name.rstrip("_")), []).extend(sps)
    return [(f, n, ", ".join(sorted(set(s)))) for (f, n), s in sorted(rows.items())]
