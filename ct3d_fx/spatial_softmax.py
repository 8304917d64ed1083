"""``ct3d::spatial_softmax``: softmax over the spatial positions of each (n, c), times an optional
per-channel weight, in CUDA (csrc/kernels_spatial_softmax.cu).

It is what ``x.view(n, c, -1).softmax(dim=2).view(x.shape) * weight`` computes, the attention
map of spatial-softmax heads; :func:`ct3d_fx.optimize` puts it after a fused site whose output
feeds that pattern (``Config.families`` "spatial_softmax"). PyTorch runs the pattern as a
softmax that reads its input three times plus an elementwise multiply (six passes over the
tensor). On compute capability 9.0 a row of up to 8 CTAs' worth (131072 float32 / 262144
half-precision elements) is read once and kept on chip by a thread-block cluster (one read, one
write); longer rows, and older GPUs, take two kernels (two reads, one write).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import _build, _cuda

__all__ = ["spatial_softmax", "reference"]

_SCHEMA = "(Tensor input, bool log, Tensor? weight) -> Tensor"
_KERNEL_DTYPES = {  # (input dtype, output dtype) pairs the kernel implements
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32)}

# Set by each CUDA call (tests read it): True when the kernel ran, False when the reference did;
# LAST_PATH: "onchip_shared" or "onchip_registers" (the one-read cluster kernels), "two_pass" or
# "reference".
LAST_KERNEL: Optional[bool] = None
LAST_PATH: Optional[str] = None
# The largest thread-block cluster (CTAs per row) of the one-read kernels, 0-8; 0 always runs
# the two-kernel form. Environment: CT3D_FX_SPATIAL_MAX_CLUSTER.
MAX_CLUSTER = int(os.environ.get("CT3D_FX_SPATIAL_MAX_CLUSTER", "8"))
# The one-read form: 1-16 stages the row in shared memory with at most that many 16-byte vectors
# per thread (4 KB of shared memory per CTA each); 0 holds it in registers. Environment:
# CT3D_FX_SPATIAL_SHARED_VECS.
SHARED_VECS = int(os.environ.get("CT3D_FX_SPATIAL_SHARED_VECS", "16"))
# Autotune choices per call signature ((max_cluster, shared_vecs) or "reference"), when
# _cuda.AUTOTUNE is on.
_choices: dict = {}
# Tests: fill the output with NaN before the kernel writes it.
POISON_OUTPUT = False


def reference(input: torch.Tensor, log: bool, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The op in PyTorch ops: ``softmax(input.reshape(n, c, -1), dim=2).view(input.shape)``
    (``log_softmax`` when ``log``), times ``weight`` when given."""
    torch._check(input.dim() >= 2, lambda: f"ct3d spatial_softmax: input must have at least 2 "
                                           f"dims (N, C, ...), got {input.dim()}-D")
    shape = input.shape
    f = F.log_softmax if log else F.softmax
    y = f(input.reshape(shape[0], shape[1], -1), dim=2).reshape(shape)
    return y if weight is None else y * weight


@torch.library.custom_op("ct3d::spatial_softmax", mutates_args=(), schema=_SCHEMA)
def spatial_softmax(input: torch.Tensor, log: bool, weight: Optional[torch.Tensor]
                    ) -> torch.Tensor:
    """Softmax (``log``: log_softmax) over all positions after the first two dims, per (n, c).

    Args:
        input: (N, C, *spatial), e.g. NCDHW (N, C, D, H, W); float32, float16, bfloat16 or
            float64.
        log: False for softmax, True for log_softmax.
        weight: None, or a tensor broadcasting against ``input`` (such as a (1, C, 1, 1, 1)
            Parameter), multiplied into the result like ``softmax(...) * weight``.

    Returns:
        A tensor of ``input``'s shape (NCDHW-contiguous from the kernel), dtype by PyTorch's
        type promotion of ``input`` and ``weight``.

    Raises:
        RuntimeError: input with fewer than 2 dims; a weight that does not broadcast, or on
            another device (as PyTorch's ops raise).

    Limitations:
        With the autotune on (``CT3D_FX_AUTOTUNE``, as for the fused conv) the first call of
        each signature times the kernel's forms (one-read in shared memory or registers, two
        kernels) against :func:`reference` and keeps the fastest. The
        CUDA kernel runs for contiguous (NCDHW) float32/float16/bfloat16 inputs with a
        weight of one value per channel (or none) and a float32 or input-dtype result; other
        calls, and CPU tensors, run :func:`reference`. The kernel computes in float32 and
        rounds once: with a float16/bfloat16 input it does not round the softmax to the input
        dtype before the multiply, as the unfused ops do.
    """
    return reference(input, log, weight)


@spatial_softmax.register_fake
def _fake(input, log, weight):
    return reference(input, log, weight)


def _per_channel(input: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """``weight`` as C float32 values on input's device when it multiplies each channel by one
    value and leaves the output shape as is, else None."""
    c, k = input.shape[1], 1 - (input.dim() - weight.dim())
    if (weight.dtype == torch.float32 and weight.device == input.device and k >= 0
            and weight.shape[k] == c and weight.numel() == c):
        return weight.reshape(c)  # (1, C, 1, 1, 1) float32, the common case: a view, no kernel
    try:
        shape = torch.broadcast_shapes(input.shape, weight.shape)
    except RuntimeError:
        return None
    if shape != input.shape:
        return None
    if weight.device != input.device and not (weight.dim() == 0 and weight.device.type == "cpu"):
        return None
    we = weight.expand(input.shape)
    if any(d != 1 and input.shape[d] != 1 and we.stride(d) != 0 for d in range(input.dim())):
        return None
    for d in range(input.dim() - 1, 1, -1):
        we = we.select(d, 0)
    return we.select(0, 0).to(device=input.device, dtype=torch.float32).contiguous()


@spatial_softmax.register_kernel("cuda")
def _cuda_impl(input, log, weight):
    return run(input, log, weight)


def run(input: torch.Tensor, log: bool, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The CUDA implementation: the kernel where it applies, else :func:`reference`."""
    global LAST_KERNEL, LAST_PATH
    LAST_KERNEL, LAST_PATH = False, "reference"
    if input.dim() < 2 or input.numel() == 0 or not input.is_contiguous():
        return reference(input, log, weight)
    out_dtype = input.dtype if weight is None else torch.result_type(input, weight)
    if (input.dtype, out_dtype) not in _KERNEL_DTYPES:
        return reference(input, log, weight)
    wc = None
    if weight is not None:
        wc = _per_channel(input, weight)
        if wc is None:
            return reference(input, log, weight)
    ext = _build.load()
    if ext is None:
        return reference(input, log, weight)

    def kernel(max_cluster, shared_vecs):
        out = torch.empty(input.shape, dtype=out_dtype, device=input.device)
        if POISON_OUTPUT:
            out.fill_(float("nan"))
        ran = ext.spatial_softmax(input, out, wc, bool(log), int(max_cluster), int(shared_vecs))
        return out, ran

    form = (MAX_CLUSTER, SHARED_VECS)
    if not POISON_OUTPUT and _cuda._tunable(input):
        # once per signature, as the conv's autotune: the one-read forms (where the row fits in
        # a cluster, else they run the two kernels), the two kernels, or PyTorch's ops, whichever
        # is fastest (tensors that stay in L2 and are host-bound favour PyTorch's)
        key = (tuple(input.shape), input.dtype, input.device, out_dtype, bool(log),
               wc is not None, form)
        choice = _choices.get(key)
        if choice is None:
            forms = [(MAX_CLUSTER, v) for v in (16, 8, 0)] if MAX_CLUSTER > 0 else []
            cands = [(f, (lambda f=f: kernel(*f))) for f in forms + [(0, 0)]]
            cands.append(("reference", lambda: reference(input, log, weight)))
            choice = _cuda._pick_fastest(cands)
            if len(_choices) >= 1024:
                _choices.clear()
            _choices[key] = choice
        if choice == "reference":
            return reference(input, log, weight)
        form = choice
    out, ran = kernel(*form)
    LAST_KERNEL = True
    LAST_PATH = "two_pass" if ran >= 0 else ("onchip_shared" if form[1] > 0
                                             else "onchip_registers")
    return out


# --- autograd: recompute the reference in backward (the kernel saves nothing but its inputs) --
def _setup_context(ctx, inputs, output):
    input, log, weight = inputs
    ctx.log = bool(log)
    ctx.save_for_backward(input, weight)


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = weight is not None and ctx.needs_input_grad[2]
    create = torch.is_grad_enabled()  # double backward: keep the graph through the recompute
    with torch.enable_grad():
        x = input if create and input.requires_grad else input.detach().requires_grad_(need_x)
        w = weight
        if weight is not None and not (create and weight.requires_grad):
            w = weight.detach().requires_grad_(need_w)
        out = reference(x, ctx.log, w)
        targets = [t for t, n in ((x, need_x), (w, need_w)) if n]
        grads = list(torch.autograd.grad(out, targets, grad, create_graph=create)) \
            if targets else []
    gx = grads.pop(0) if need_x else None
    gw = grads.pop(0) if need_w else None
    return gx, None, gw


spatial_softmax.register_autograd(_backward, setup_context=_setup_context)
