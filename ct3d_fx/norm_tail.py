"""The normalization tail: GroupNorm or InstanceNorm3d of a fused site's output, and the activation
after it, in CUDA (csrc/kernels_norm_tail.cu).

:func:`ct3d_fx.optimize` puts it where a fused site's result feeds ``nn.GroupNorm`` /
``F.group_norm`` or ``nn.InstanceNorm3d`` / ``F.instance_norm`` without running statistics
(and, optionally, one activation that only the norm reads): ``Config.families`` "norm_tail".
That is the decoder block of many segmentation networks (ConvTranspose3d -> GroupNorm or
InstanceNorm -> ReLU / LeakyReLU). PyTorch runs the norm as one CTA per (sample, group), slow on
large groups (about 0.7 ms for l2_61's (16, 128, 34, 34, 34) bfloat16 tensor on the H200), then
the activation as another pass. The tail reads the site's output twice (statistics, then the
normalized values) and writes its result once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _build, _cuda
from . import pool_tail as _pool_tail
from .ops import Opcode

__all__ = ["ACTIVATIONS", "reference", "run", "call"]

#: Activation name -> (opcode the kernel takes, flag): what may follow the norm in the tail,
#: the pooled tail's activations and two more; "leaky_relu" takes its negative slope as
#: ``alpha``.
ACTIVATIONS = {
    **_pool_tail.ACTIVATIONS,
    "leaky_relu": (int(Opcode.LEAKY_RELU), 0),
    "hardswish": (int(Opcode.HARDSWISH), 0),
}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHUNK = 8192  # fewest elements of a row per CTA (csrc/ct3d_params.h norm_chunk: float32)

# Set by each CUDA call (tests read it): True when the kernel ran, False when the reference did.
LAST_KERNEL: Optional[bool] = None
# Autotune choices per signature ("kernel" or "reference"), when _cuda.AUTOTUNE is on.
_choices: dict = {}
# The candidates' medians (ms per call, the autotune's own timer) behind each of _choices.
_timings: dict = {}
# Tests: fill the output with NaN before the kernel writes it.
POISON_OUTPUT = False


def _act(y: torch.Tensor, act: Optional[str], alpha: float) -> torch.Tensor:
    if act == "leaky_relu":
        return F.leaky_relu(y, alpha)
    if act == "hardswish":
        return F.hardswish(y)
    if act in _pool_tail.ACTIVATIONS:
        return _pool_tail._act(y, act)
    raise ValueError(f"ct3d norm_tail: activation must be one of "
                     f"{sorted(a for a in ACTIVATIONS if a)} or None, got {act!r}")


def reference(input: torch.Tensor, groups: Optional[int], weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], eps: float, act: Optional[str] = None,
              alpha: float = 0.01) -> torch.Tensor:
    """The tail in PyTorch ops: ``F.group_norm(input, groups, weight, bias, eps)`` (``groups``
    None: ``F.instance_norm(input, weight=weight, bias=bias, eps=eps)``, InstanceNorm without
    running statistics), then the activation ``act`` (a key of :data:`ACTIVATIONS`;
    ``alpha``: LeakyReLU's negative slope)."""
    if groups is None:
        y = F.instance_norm(input, weight=weight, bias=bias, eps=eps)
    else:
        y = F.group_norm(input, groups, weight, bias, eps)
    return _act(y, act, alpha)


def _kernel_applies(input: torch.Tensor, groups: int, weight, bias) -> bool:
    if (input.dim() != 5 or input.dtype not in _KERNEL_DTYPES or not input.is_contiguous()
            or input.numel() == 0 or not input.is_cuda):
        return False
    c = input.size(1)
    if groups < 1 or c % groups:
        return False
    s = input.size(2) * input.size(3) * input.size(4)
    if input.size(0) * c * -(-s // _CHUNK) >= 2 ** 31:
        return False
    for t in (weight, bias):
        if t is not None and (t.dim() != 1 or t.numel() != c or t.device != input.device):
            return False
    return True


def run(input: torch.Tensor, groups: Optional[int], weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor], eps: float, act: Optional[str] = None,
        alpha: float = 0.01) -> torch.Tensor:
    """The CUDA implementation: the kernels where they apply, else :func:`reference`.

    Args:
        input: (N, C, D, H, W) CUDA tensor.
        groups: number of groups, dividing C; None for InstanceNorm (C groups of one
            channel, as ``F.instance_norm`` without running statistics).
        weight, bias: None or (C,) tensors (the affine; any float dtype, used as float32).
        eps: added to the variance.
        act: a key of :data:`ACTIVATIONS`.
        alpha: the negative slope when ``act`` is "leaky_relu".

    Returns:
        (N, C, D, H, W) of ``input``'s dtype, contiguous when the kernel ran.

    Raises:
        ValueError: an unknown activation.
        RuntimeError: what ``F.group_norm`` raises for a C that ``groups`` does not divide, or
            affine tensors of the wrong size.

    Limitations:
        The kernels run for contiguous NCDHW float32/float16/bfloat16 inputs with
        N * C * ceil(D * H * W / 8192) < 2^31; other calls run :func:`reference`. Statistics
        are merged in float within a CTA and in double across CTAs (PyTorch: Welford in float),
        so the mean and variance may differ from PyTorch's in the last bits. The normalized
        value is rounded to the input dtype before the activation, as the unfused ops do; the
        activation uses the kernel's own float formulas: results may differ from PyTorch's in
        the last bit. With the autotune on (``CT3D_FX_AUTOTUNE``) the first call of each
        signature times the kernels against the reference and keeps the faster.
    """
    global LAST_KERNEL
    LAST_KERNEL = False
    if act not in ACTIVATIONS:
        _act(input, act, alpha)  # raises the ValueError
    code, flag = ACTIVATIONS[act]
    g = groups if groups is not None else (input.size(1) if input.dim() == 5 else 0)
    if not _kernel_applies(input, g, weight, bias):
        return reference(input, groups, weight, bias, eps, act, alpha)
    ext = _build.load()
    if ext is None or not hasattr(ext, "norm_tail"):
        return reference(input, groups, weight, bias, eps, act, alpha)
    def launch() -> torch.Tensor:
        # the affine as float32 (a no-op for float32 Parameters), only where the kernel runs
        w32 = None if weight is None else weight.detach().float().contiguous()
        b32 = None if bias is None else bias.detach().float().contiguous()
        out = torch.empty_like(input, memory_format=torch.contiguous_format)
        if POISON_OUTPUT:
            out.fill_(float("nan"))
        ext.norm_tail(input, out, int(g), w32, b32, float(eps), code, flag, float(alpha))
        return out

    if not POISON_OUTPUT and _cuda._tunable(input):
        key = (tuple(input.shape), input.dtype, input.device, groups, weight is None,
               bias is None, act)
        choice = _cuda._memo_pick(_choices, _timings, key, [
            ("kernel", launch),
            ("reference", lambda: reference(input, groups, weight, bias, eps, act, alpha))])
        if choice == "reference":
            return reference(input, groups, weight, bias, eps, act, alpha)
    out = launch()
    LAST_KERNEL = True
    return out


def call(input: torch.Tensor, groups: Optional[int], weight: Optional[torch.Tensor],
         bias: Optional[torch.Tensor], eps: float, act: Optional[str] = None,
         alpha: float = 0.01) -> torch.Tensor:
    """What the rewritten graph calls: :func:`run` for plain CUDA tensors when no gradient is
    needed and nothing traces or intercepts the call (torch.compile, fx, dispatch or
    torch-function modes), else :func:`reference` (PyTorch's ops, which autograd and compilers
    see as usual). Same values either way, up to the last bits."""
    from .fuse import _direct_call_ok

    extras = tuple(t for t in (weight, bias) if t is not None)
    if _direct_call_ok(input, input, None, extras):
        return run(input, groups, weight, bias, eps, act, alpha)
    return reference(input, groups, weight, bias, eps, act, alpha)
