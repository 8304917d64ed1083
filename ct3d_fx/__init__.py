"""ct3d_fx: fuse ConvTranspose3d and its elementwise epilogue into one CUDA kernel.

Public API: :func:`optimize`, :func:`explain`, :func:`report`, :class:`Config`,
:class:`RewriteReport`, :class:`VerificationError`.
"""
from . import ops  # noqa: F401  (registers torch.ops.ct3d.*)
from .config import Config, VerificationError
from .fuse import explain, optimize, report
from .report import RewriteReport

__all__ = ["optimize", "explain", "report", "Config", "RewriteReport", "VerificationError"]
__version__ = "0.1.0"
