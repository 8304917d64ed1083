"""The pooled tail: ``avg_pool3d`` or ``max_pool3d`` (kernel == stride, no padding) of a fused
site's output and the activation after it, in one CUDA pass (csrc/kernels_pool_tail.cu).

:func:`ct3d_fx.optimize` puts it where a fused site's result feeds ``nn.AvgPool3d`` /
``F.avg_pool3d`` (and, optionally, one activation that only the pool reads): ``Config.families``
"pool_tail". PyTorch runs the pool as its own kernel, slower than a copy on large NCDHW tensors
(0.67 ms, 1.8 TB/s, on l2_3's 1.07 GB float32 conv output on the H200), then the activation as
another pass. The kernel reads the conv output once and writes the pooled, activated tensor once.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _build, _cuda
from .ops import Opcode

__all__ = ["ACTIVATIONS", "reference", "call", "run"]

#: Activation name -> (opcode the kernel takes, flag): what may follow the pool in the tail.
ACTIVATIONS = {
    None: (0, 0),
    "relu": (int(Opcode.RELU), 0),
    "gelu": (int(Opcode.GELU), 0),
    "gelu_tanh": (int(Opcode.GELU), 1),
    "silu": (int(Opcode.SILU), 0),
    "sigmoid": (int(Opcode.SIGMOID), 0),
    "tanh": (int(Opcode.TANH), 0),
}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_K = 8  # per dimension (csrc/kernels_pool_tail.cu)

# Set by each CUDA call (tests read it): True when the kernel ran, False when the reference did.
LAST_KERNEL: Optional[bool] = None
# Autotune choices per signature ("kernel" or "reference"), when _cuda.AUTOTUNE is on.
_choices: dict = {}
# The candidates' medians (ms per call, the autotune's own timer) behind each of _choices.
_timings: dict = {}
# Tests: fill the output with NaN before the kernel writes it.
POISON_OUTPUT = False


def _act(y: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    if act is None:
        return y
    if act == "relu":
        return torch.relu(y)
    if act in ("gelu", "gelu_tanh"):
        return F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    if act == "silu":
        return F.silu(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    if act == "tanh":
        return torch.tanh(y)
    raise ValueError(f"ct3d pool_tail: activation must be one of "
                     f"{sorted(a for a in ACTIVATIONS if a)} or None, got {act!r}")


_POOLS = {"avg": F.avg_pool3d, "max": F.max_pool3d}


def reference(input: torch.Tensor, kernel: Sequence[int], act: Optional[str],
              mode: str = "avg") -> torch.Tensor:
    """The tail in PyTorch ops: ``F.avg_pool3d(input, kernel)`` (``mode`` "max":
    ``F.max_pool3d``; stride = kernel, no padding, floor mode), then the activation ``act`` (a
    key of :data:`ACTIVATIONS`)."""
    if mode not in _POOLS:
        raise ValueError(f"ct3d pool_tail: mode must be 'avg' or 'max', got {mode!r}")
    return _act(_POOLS[mode](input, tuple(kernel)), act)


def run(input: torch.Tensor, kernel: Sequence[int], act: Optional[str],
        mode: str = "avg") -> torch.Tensor:
    """The CUDA implementation: the kernel where it applies, else :func:`reference`.

    Args:
        input: (N, C, D, H, W) CUDA tensor.
        kernel: (kD, kH, kW) window, also the stride.
        act: a key of :data:`ACTIVATIONS`.
        mode: "avg" (avg_pool3d) or "max" (max_pool3d: a NaN in the window gives NaN, as in
            PyTorch).

    Returns:
        (N, C, D // kD, H // kH, W // kW) of ``input``'s dtype, contiguous when the kernel ran.

    Limitations:
        The kernel runs for contiguous NCDHW float32/float16/bfloat16 inputs and windows of at
        most 8 per dimension; other calls run :func:`reference`. With the autotune on
        (``CT3D_FX_AUTOTUNE``) the first call of each signature times the kernel against the
        reference and keeps the faster. The kernel rounds the pooled value to the input dtype
        before the activation, as the unfused ops do, but computes the activation with its own
        formulas (float32): results may differ from PyTorch's in the last bit.
    """
    global LAST_KERNEL
    LAST_KERNEL = False
    kd, kh, kw = (int(k) for k in kernel)
    code, flag = ACTIVATIONS[act]
    if mode not in _POOLS:
        raise ValueError(f"ct3d pool_tail: mode must be 'avg' or 'max', got {mode!r}")
    if (input.dim() != 5 or input.dtype not in _KERNEL_DTYPES or not input.is_contiguous()
            or not all(1 <= k <= _MAX_K for k in (kd, kh, kw))
            or min(input.shape[2] // kd, input.shape[3] // kh, input.shape[4] // kw) < 1
            or input.numel() == 0):
        return reference(input, kernel, act, mode)
    ext = _build.load()
    if ext is None or not hasattr(ext, "pool_tail"):
        return reference(input, kernel, act, mode)
    shape = (*input.shape[:2], input.shape[2] // kd, input.shape[3] // kh, input.shape[4] // kw)

    def launch() -> torch.Tensor:
        out = torch.empty(shape, dtype=input.dtype, device=input.device)
        if POISON_OUTPUT:
            out.fill_(float("nan"))
        ext.pool_tail(input, out, kd, kh, kw, code, flag, mode == "max")
        return out

    if not POISON_OUTPUT and _cuda._tunable(input):
        key = (tuple(input.shape), input.dtype, input.device, (kd, kh, kw), act, mode)
        choice = _cuda._memo_pick(_choices, _timings, key, [
            ("kernel", launch), ("reference", lambda: reference(input, kernel, act, mode))])
        if choice == "reference":
            return reference(input, kernel, act, mode)
    out = launch()
    LAST_KERNEL = True
    return out


def call(input: torch.Tensor, kernel: Tuple[int, int, int], act: Optional[str],
         mode: str = "avg") -> torch.Tensor:
    """What the rewritten graph calls: :func:`run` for plain CUDA tensors when no gradient is
    needed and nothing traces or intercepts the call (torch.compile, fx, dispatch or
    torch-function modes), else :func:`reference` (PyTorch's ops, which autograd and compilers
    see as usual). Same values either way, up to the last bit of the activation."""
    from .fuse import _direct_call_ok

    if _direct_call_ok(input, input, None, ()):
        return run(input, kernel, act, mode)
    return reference(input, kernel, act, mode)
