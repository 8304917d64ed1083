"""CUDA implementation of ``ct3d::conv_transpose3d_epilogue`` (registered for "cuda").

Builds the extension in csrc/ at the first call (see ``_build``); when it cannot be built, or a
call is outside what the kernel covers, it runs the reference and says so once.
"""
from __future__ import annotations

import torch

from . import _build
from .ops import check_args, conv_transpose3d_epilogue, reference


@conv_transpose3d_epilogue.register_kernel("cuda")
def _cuda_impl(input, weight, bias, stride, padding, output_padding, dilation, groups,
               program, scalars, extras):
    check_args(input, weight, bias, stride, padding, output_padding, dilation, groups,
               program, scalars, extras)
    ext = _build.load()
    if ext is None:
        return reference(input, weight, bias, stride, padding, output_padding, dilation,
                         groups, program, scalars, extras)
    raise NotImplementedError("CUDA kernel not written yet")  # the kernel issue replaces this
