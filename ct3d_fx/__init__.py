"""ct3d_fx: fuse ConvTranspose3d and its elementwise epilogue into one CUDA kernel.

Public API: :func:`optimize`, :func:`explain`, :func:`report`, :class:`Config`,
:class:`RewriteReport`.
"""
from . import ops  # noqa: F401  (registers torch.ops.ct3d.*)

__version__ = "0.1.0"
