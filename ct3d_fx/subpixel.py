"""ConvTranspose3d as one stride-1 conv3d over its output phases ("sub-pixel" form).

A transposed convolution with stride s writes output voxel o = s * t + r (phase r in [0, s) per
dimension) from the input voxels t + delta, one delta per tap k whose (r + padding - k *
dilation) is a multiple of s, delta = (r + padding - k * dilation) / s. So every phase is a
plain correlation of the input with a small kernel over the deltas, and all s_D * s_H * s_W
phases of all output channels are one ``F.conv3d`` with C_out * s_D * s_H * s_W output channels
over the deltas' range E (per dimension), followed by interleaving the phases into the output
(a pixel shuffle in 3-D). Taps that a phase does not use are zeros in the conv3d weight: it does
E^3 * s^3 / K^3 times the transposed conv's multiply-adds (3.4x for kernel 4, stride 2, padding
1), on cuDNN's regular conv3d kernels.

Where C_out is small (the GAN generator's 1-channel last layer, segmentation heads) cuDNN's
transposed-conv kernels and the fused kernel's tiles are mostly idle, and the conv3d form gives
cuDNN s^3 times as many output channels to fill them; the autotune (ct3d_fx/_cuda.py) times it
against the other candidates and keeps it only where it is faster.

Groups: with g groups, output channel j * (C_out / g) + c reads the input channels of group j
only, and so does each of its s_D * s_H * s_W phases; the conv3d output channels of group j
(co * s_D * s_H * s_W + phase for co of group j) are then the contiguous block
[j * (C_out / g) * s^3, (j + 1) * (C_out / g) * s^3), so the whole call stays one ``F.conv3d``
with ``groups=g``. Where the per-group C_out is small (l1_72: 8 per group) it gives cuDNN s^3
times as many output channels per group.

Shapes: input (N, C_in, D, H, W), weight (C_in, C_out / g, kD, kH, kW) (ConvTranspose3d's
layout; g divides C_in), NCDHW; the conv3d weight is (C_out * s_D * s_H * s_W, C_in / g, E_D,
E_H, E_W); any float dtype the conv3d takes; the result is NCDHW contiguous, as
F.conv_transpose3d's.
Limitations: 5-D inputs only; the weight for conv3d is rebuilt per call unless the caller
caches it (``subpixel_weight``).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["SubpixelDim", "subpixel_dims", "subpixel_weight", "conv_transpose3d_subpixel"]


class SubpixelDim(NamedTuple):
    """One spatial dimension of the sub-pixel form."""

    stride: int          # s: phases
    out: int             # output extent O
    phases: int          # T = ceil(O / s): outputs per phase (the last ones may lie past O)
    span: int            # E: conv3d kernel extent (deltas from dmin to dmin + E - 1)
    dmin: int            # smallest delta
    pad: int             # conv3d padding (both sides)
    start: int           # first conv3d output of phase index 0 (crop start)
    taps: List[List[int]]  # taps[r][e]: the transposed conv's tap k for phase r, delta dmin + e, or -1


def subpixel_dims(in_sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], output_padding: Sequence[int],
                  dilation: Sequence[int]) -> List[SubpixelDim]:
    """The sub-pixel geometry of each of the three spatial dimensions."""
    dims = []
    for i, k, s, p, op, dl in zip(in_sizes, kernel, stride, padding, output_padding, dilation):
        out = (i - 1) * s - 2 * p + dl * (k - 1) + op + 1
        deltas = [[(r + p - kk * dl) // s if (r + p - kk * dl) % s == 0 else None
                   for kk in range(k)] for r in range(s)]
        used = [d for row in deltas for d in row if d is not None]
        dmin, dmax = min(used), max(used)  # tap 0 always lands in phase (p mod s)
        span = dmax - dmin + 1
        phases = -(-out // s)
        pad = max(0, -dmin, phases + span - 1 + dmin - i)
        taps = [[-1] * span for _ in range(s)]
        for r in range(s):
            for kk, d in enumerate(deltas[r]):
                if d is not None:
                    taps[r][d - dmin] = kk
        dims.append(SubpixelDim(s, out, phases, span, dmin, pad, dmin + pad, taps))
    return dims


def subpixel_weight(weight: torch.Tensor, dims: Sequence[SubpixelDim], *,
                    groups: int = 1) -> torch.Tensor:
    """The conv3d weight for ``groups`` groups, (C_out * sD * sH * sW, C_in / groups, E_D, E_H,
    E_W) with C_out = weight.size(1) * groups: output channel
    co * sD * sH * sW + (rd * sH + rh) * sW + rw holds phase (rd, rh, rw) of channel co, and
    for co = j * (C_out / groups) + c its C_in / groups input channels are those of group j
    (input channels [j * C_in / groups, (j + 1) * C_in / groups)); the values are the
    transposed conv's weights (``weight``: (C_in, C_out / groups, kD, kH, kW)), copied (no
    arithmetic), zeros for unused taps; same dtype and device as ``weight``. Raises ValueError
    where ``groups`` is below 1 or does not divide C_in."""
    cin, cpg = weight.shape[:2]
    if groups < 1 or cin % groups:
        raise ValueError(f"subpixel_weight: groups must be at least 1 and divide C_in "
                         f"(weight.size(0)), got groups={groups} and C_in={cin}")
    cin_g, cout = cin // groups, cpg * groups
    dd, dh, dw = dims
    w2 = weight.new_zeros((cout, dd.stride, dh.stride, dw.stride, cin_g, dd.span, dh.span,
                           dw.span))
    # (C_out, C_in / groups, kD, kH, kW): channel j * cpg + c, the input channels of group j
    wt = weight.reshape(groups, cin_g, cpg, *weight.shape[2:]).transpose(1, 2).reshape(
        cout, cin_g, *weight.shape[2:])
    for rd in range(dd.stride):
        for ed, kd in enumerate(dd.taps[rd]):
            if kd < 0:
                continue
            for rh in range(dh.stride):
                for eh, kh in enumerate(dh.taps[rh]):
                    if kh < 0:
                        continue
                    for rw in range(dw.stride):
                        for ew, kw in enumerate(dw.taps[rw]):
                            if kw >= 0:
                                w2[:, rd, rh, rw, :, ed, eh, ew] = wt[:, :, kd, kh, kw]
    return w2.reshape(cout * dd.stride * dh.stride * dw.stride, cin_g, dd.span, dh.span,
                      dw.span)


def conv_transpose3d_subpixel(input: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], stride: Sequence[int],
                              padding: Sequence[int], output_padding: Sequence[int],
                              dilation: Sequence[int],
                              weight2: Optional[torch.Tensor] = None,
                              dims: Optional[Sequence[SubpixelDim]] = None, *,
                              groups: int = 1) -> torch.Tensor:
    """``F.conv_transpose3d(input, weight, bias, stride, padding, output_padding, groups,
    dilation)`` computed as one ``F.conv3d(..., groups=groups)`` over the output phases and a
    phase interleave.

    ``input``: (N, C_in, D, H, W); ``weight``: (C_in, C_out / groups, kD, kH, kW); ``bias``:
    (C_out,) or None. ``weight2``: ``subpixel_weight(weight, dims, groups=groups)`` when the
    caller keeps it; ``dims``: ``subpixel_dims`` of this call when the caller has them (else
    computed). Returns an NCDHW tensor of the transposed conv's shape and the conv3d's dtype
    (contiguous unless an extent is not a multiple of its stride: then a view of a contiguous
    one). Raises ValueError for a non-5-D input or weight, a weight whose C_in does not match
    the input's, ``groups`` below 1 or not dividing C_in, or a ``weight2`` whose shape is not
    (C_out * sD * sH * sW, C_in / groups, E_D, E_H, E_W)."""
    if input.dim() != 5 or weight.dim() != 5 or input.size(1) != weight.size(0):
        raise ValueError(f"conv_transpose3d_subpixel: input (N, C_in, D, H, W) and weight "
                         f"(C_in, C_out / groups, kD, kH, kW) with the same C_in "
                         f"(input.size(1) == weight.size(0)), got input {tuple(input.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if groups < 1 or input.size(1) % groups:
        raise ValueError(f"conv_transpose3d_subpixel: groups must be at least 1 and divide "
                         f"C_in, got groups={groups} and C_in={input.size(1)} (input "
                         f"{tuple(input.shape)}, weight {tuple(weight.shape)})")
    if dims is None:
        dims = subpixel_dims(input.shape[2:], weight.shape[2:], stride, padding,
                             output_padding, dilation)
    cout = weight.size(1) * groups
    s3 = dims[0].stride * dims[1].stride * dims[2].stride
    if weight2 is None:
        weight2 = subpixel_weight(weight, dims, groups=groups)
    else:
        expected = (cout * s3, input.size(1) // groups) + tuple(d.span for d in dims)
        if tuple(weight2.shape) != expected:
            raise ValueError(f"conv_transpose3d_subpixel: weight2 must be (C_out * sD * sH * "
                             f"sW, C_in / groups, E_D, E_H, E_W) = {expected} for groups="
                             f"{groups}, got {tuple(weight2.shape)}")
    b2 = None if bias is None else bias.repeat_interleave(s3)
    z = F.conv3d(input, weight2, b2, 1, [d.pad for d in dims], 1, groups)
    dd, dh, dw = dims
    z = z[:, :, dd.start:dd.start + dd.phases, dh.start:dh.start + dh.phases,
          dw.start:dw.start + dw.phases]
    n = input.size(0)
    z = z.reshape(n, cout, dd.stride, dh.stride, dw.stride, dd.phases, dh.phases, dw.phases)
    full = torch.empty((n, cout, dd.phases * dd.stride, dh.phases * dh.stride,
                        dw.phases * dw.stride), dtype=z.dtype, device=z.device)
    full.view(n, cout, dd.phases, dd.stride, dh.phases, dh.stride, dw.phases,
              dw.stride).copy_(z.permute(0, 1, 5, 2, 6, 3, 7, 4))
    return full[:, :, :dd.out, :dh.out, :dw.out]
