"""A 3-D U-Net decoder optimized with ct3d_fx.

The decoder of an nnU-Net-style 3-D segmentation network: each stage upsamples with
ConvTranspose3d (kernel 2, stride 2) -> BatchNorm3d -> PReLU, concatenates the encoder's skip
features of the same resolution, and mixes them with Conv3d -> BatchNorm3d -> PReLU. A 1x1x1
Conv3d head gives the class logits. ``ct3d_fx.optimize`` fuses each stage's
ConvTranspose3d -> BatchNorm3d -> PReLU into one op; the concatenation and the Conv3d stay as
they are.

Run it on its own::

    python examples/unet_decoder.py                 # CUDA if available, else a tiny CPU version
    python examples/unet_decoder.py --batch 2 --device cuda

It builds the decoder, optimizes it, prints the rewrite report and checks the optimized
model's output against the original (float32) and a float64 copy; the exit status is 1 when
the optimized model is less accurate than allowed (see ``check``).

``python -m ct3d_fx.bench --networks unet_decoder`` times it (batch 1, 2, 4, 8 by default).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

try:
    import ct3d_fx  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ct3d_fx.bench import example_main, randomize_batchnorm

#: Encoder channels per level, full resolution first (nnU-Net's 3d_fullres defaults).
FEATURES = (32, 64, 128, 256, 320)
#: Patch edge in voxels at full resolution (divisible by 2 ** (len(FEATURES) - 1)).
SIZE = 128
TINY_FEATURES = (4, 8, 8, 16, 16)
TINY_SIZE = 16
N_CLASSES = 3


class UpStage(nn.Module):
    """One decoder stage: upsample, concatenate the skip, mix.

    ``forward(x, skip)``: ``x`` (N, c_in, D, H, W), ``skip`` (N, c_out, 2D, 2H, 2W), same float
    dtype and device; returns (N, c_out, 2D, 2H, 2W).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(c_in, c_out, kernel_size=2, stride=2)
        self.up_norm = nn.BatchNorm3d(c_out)
        self.up_act = nn.PReLU(c_out)
        self.conv = nn.Conv3d(2 * c_out, c_out, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm3d(c_out)
        self.act = nn.PReLU(c_out)

    def forward(self, x, skip):
        x = self.up_act(self.up_norm(self.up(x)))
        x = torch.cat([x, skip], dim=1)
        return self.act(self.norm(self.conv(x)))


class UNetDecoder(nn.Module):
    """The decoder half of a 3-D U-Net.

    ``forward(x, skip3, skip2, skip1, skip0)``: ``x`` is the bottleneck, (N, F[4], S/16, S/16,
    S/16); ``skipK`` the encoder features of level K, (N, F[K], S/2**K, ...), where ``F`` is
    ``features`` and S the patch edge. All float32 (or one other float dtype), NCDHW, one device.
    Returns the logits, (N, n_classes, S, S, S).
    """

    def __init__(self, features: Sequence[int] = FEATURES, n_classes: int = N_CLASSES):
        super().__init__()
        f = list(features)
        self.stage3 = UpStage(f[4], f[3])
        self.stage2 = UpStage(f[3], f[2])
        self.stage1 = UpStage(f[2], f[1])
        self.stage0 = UpStage(f[1], f[0])
        self.head = nn.Conv3d(f[0], n_classes, kernel_size=1)

    def forward(self, x, skip3, skip2, skip1, skip0):
        x = self.stage3(x, skip3)
        x = self.stage2(x, skip2)
        x = self.stage1(x, skip1)
        x = self.stage0(x, skip0)
        return self.head(x)


def build(batch: int = 1, *, tiny: bool = False) -> Tuple[nn.Module, List[Tuple[int, ...]]]:
    """The decoder (eval mode, CPU, float32, random BatchNorm statistics) and its input shapes.

    Args:
        batch: N, >= 1.
        tiny: small channels and a 16^3 patch (for CPU runs) instead of nnU-Net's sizes
            (channels 32..320, a 128^3 patch).

    Returns:
        ``(model, shapes)``: shapes of ``x, skip3, skip2, skip1, skip0``, in that order.
    """
    if batch < 1:
        raise ValueError(f"unet_decoder: batch must be >= 1, got {batch}")
    features, size = (TINY_FEATURES, TINY_SIZE) if tiny else (FEATURES, SIZE)
    model = UNetDecoder(features).eval()
    randomize_batchnorm(model)
    shapes = [(batch, features[4]) + (size // 16,) * 3]
    for level in (3, 2, 1, 0):
        shapes.append((batch, features[level]) + (size // 2 ** level,) * 3)
    return model, shapes


def main(argv=None) -> int:
    return example_main(build, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
