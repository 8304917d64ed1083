"""Config: what the pass may fuse and how it verifies a rewrite."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, FrozenSet, Optional

import torch.nn as nn

from .patterns import FAMILIES

__all__ = ["Config", "VerificationError"]


class VerificationError(RuntimeError):
    """The optimized model's results differ from the original's on the example inputs."""


@dataclass(frozen=True)
class Config:
    """Options of :func:`ct3d_fx.optimize` and :func:`ct3d_fx.explain`.

    Attributes:
        families: op families that may join an epilogue, a subset of ``{"arithmetic",
            "activation", "clamp", "batch_norm", "dropout", "residual", "softmax",
            "layer_norm", "spatial_softmax", "pool_tail", "norm_tail"}`` ("dropout" also covers
            nn.Identity, clone,
            detach, contiguous; "residual" covers operands that come from model inputs, such as
            a skip connection; "softmax" is softmax and log_softmax over the channels;
            "layer_norm" is LayerNorm over the last dimension, W; "spatial_softmax" is
            ``y.view(n, c, -1)`` -> softmax over dim 2 -> view back (times a per-channel
            parameter) on a site's result ``y``, which then runs as ``ct3d::spatial_softmax``,
            a second kernel; "pool_tail" is nn.AvgPool3d / F.avg_pool3d (no divisor_override)
            or nn.MaxPool3d / F.max_pool3d (no dilation, no indices) with stride equal to the
            window (at most 8 per dimension), no padding and floor mode on a site's result,
            and one activation (ReLU, GELU, SiLU, Sigmoid, Tanh) that only the pool reads,
            which then run as one second kernel: ``ct3d_fx.pool_tail``; "norm_tail" is
            nn.GroupNorm / F.group_norm or nn.InstanceNorm3d / F.instance_norm without running
            statistics on a site's result, and one activation (ReLU, LeakyReLU, GELU, SiLU,
            Sigmoid, Tanh, Hardswish) that only the norm reads, which then run as the kernels
            of ``ct3d_fx.norm_tail``). The convolution and its bias are always fused.
        filter_fn: ``filter_fn(module, fqn) -> bool``; called with the ConvTranspose3d module
            (None for a functional call) and the site's FQN; False leaves the site unfused.
        verify: with example_inputs, run the original and the optimized model and compare.
        verify_tol: largest accepted max |opt - orig| / max |orig|; None picks one from the
            dtype and precision policy (float64 1e-9; float32 1e-4, or 1e-2 on CUDA with TF32
            allowed; float16/bfloat16 5e-2).
        on_verify_failure: "raise" (VerificationError) or "keep_original" (return the original
            module, with the reason in the report).

    Raises:
        ValueError: on an unknown family or on_verify_failure value, or a negative verify_tol.
    """

    families: FrozenSet[str] = field(default_factory=lambda: FAMILIES)
    filter_fn: Optional[Callable[[Optional[nn.Module], str], bool]] = None
    verify: bool = True
    verify_tol: Optional[float] = None
    on_verify_failure: str = "raise"

    def __post_init__(self):
        fam = frozenset(self.families)
        unknown = fam - FAMILIES
        if unknown:
            raise ValueError(f"Config.families: unknown {sorted(unknown)}, expected a subset of "
                             f"{sorted(FAMILIES)}")
        object.__setattr__(self, "families", fam)
        if self.on_verify_failure not in ("raise", "keep_original"):
            raise ValueError(f"Config.on_verify_failure must be 'raise' or 'keep_original', got "
                             f"{self.on_verify_failure!r}")
        if self.verify_tol is not None and not self.verify_tol >= 0:
            raise ValueError(f"Config.verify_tol must be >= 0 or None, got {self.verify_tol!r}")
