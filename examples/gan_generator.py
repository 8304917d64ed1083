"""A 3-D GAN generator optimized with ct3d_fx.

The voxel generator of 3D-GAN (Wu et al., 2016) in the DCGAN style: a latent vector of 200
values, shaped (N, 200, 1, 1, 1), goes through five ConvTranspose3d layers (kernel 4) that grow
it to a 64^3 occupancy grid; each hidden layer is ConvTranspose3d -> BatchNorm3d -> ReLU and
the last is ConvTranspose3d -> Sigmoid. ``ct3d_fx.optimize`` turns each of the five chains into
one fused op.

Run it on its own::

    python examples/gan_generator.py                 # CUDA if available, else tiny on the CPU
    python examples/gan_generator.py --batch 8 --device cuda

It builds the generator, optimizes it, prints the rewrite report and checks the optimized
model's output against the original (float32) and a float64 copy; the exit status is 1 when
the optimized model is less accurate than allowed (see ``check``).

``python -m ct3d_fx.bench --networks gan_generator`` times it (batch 1, 2, 4, 8 by default).
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

Z_DIM = 200
#: Channels of the hidden layers, 4^3 to 32^3 voxels; the output has one channel at 64^3.
CHANNELS = (512, 256, 128, 64)
TINY_Z_DIM = 16
TINY_CHANNELS = (32, 16, 8, 4)


class Generator3D(nn.Module):
    """Latent vector to a voxel occupancy grid.

    ``forward(z)``: ``z`` (N, z_dim, 1, 1, 1), float32 (or one other float dtype), NCDHW.
    Returns occupancy probabilities in (0, 1), (N, 1, 64, 64, 64).
    """

    def __init__(self, z_dim: int = Z_DIM, channels: Sequence[int] = CHANNELS):
        super().__init__()
        layers = []
        c_prev = z_dim
        for i, c in enumerate(channels):
            # 1 -> 4 voxels for the first layer (stride 1, no padding), then doubling
            stride, padding = (1, 0) if i == 0 else (2, 1)
            layers += [nn.ConvTranspose3d(c_prev, c, 4, stride=stride, padding=padding,
                                          bias=False),
                       nn.BatchNorm3d(c), nn.ReLU(inplace=True)]
            c_prev = c
        layers += [nn.ConvTranspose3d(c_prev, 1, 4, stride=2, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def build(batch: int = 1, *, tiny: bool = False) -> Tuple[nn.Module, List[Tuple[int, ...]]]:
    """The generator (eval mode, CPU, float32, random BatchNorm statistics) and its input shape.

    Args:
        batch: N, >= 1.
        tiny: a 16-value latent and channels 32..4 (for CPU runs) instead of 200 and 512..64.
            The output is 64^3 either way.

    Returns:
        ``(model, [z_shape])``.
    """
    if batch < 1:
        raise ValueError(f"gan_generator: batch must be >= 1, got {batch}")
    z_dim, channels = (TINY_Z_DIM, TINY_CHANNELS) if tiny else (Z_DIM, CHANNELS)
    model = Generator3D(z_dim, channels).eval()
    randomize_batchnorm(model)
    return model, [(batch, z_dim, 1, 1, 1)]


def main(argv=None) -> int:
    return example_main(build, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
