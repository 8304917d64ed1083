"""One launch of the fused op per (suite shape, kernel), for Nsight Compute.

    ncu --clock-control none -k regex:conv_transpose3d_ \
        python scripts/profile_shapes.py [ID:ALGO ...]

ID is a suite problem (benchmarks/suite.json; the convolution alone, float32, TF32 as PyTorch
defaults), ALGO one of auto, gemm, direct, igemm (``ct3d_fx._cuda.ALGO``), optionally followed by
``:N``, an ``IGEMM_CONFIGS`` id for igemm. Default: l2_58 and l2_20 with both kernels. Prints the
kernel that ran for each launch.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ct3d_fx import _cuda, bench  # noqa: E402

OP = torch.ops.ct3d.conv_transpose3d_epilogue.default


def main(specs) -> None:
    problems = {p["id"]: p for p in bench.load_suite()["problems"]}
    _cuda.AUTOTUNE = False
    for spec in specs:
        pid, algo, *cfg = spec.split(":")
        ct = problems[pid]["ct"]
        xs = problems[pid]["x"]
        k = ct["k"] if isinstance(ct["k"], list) else [ct["k"]] * 3
        g = ct["groups"]
        x = torch.rand(xs, device="cuda")
        w = torch.randn(ct["in"], ct["out"] // g, *k, device="cuda") / math.sqrt(
            ct["in"] / g * math.prod(k))
        b = torch.randn(ct["out"], device="cuda") if ct["bias"] else None
        trip = [(v if isinstance(v, list) else [v] * 3)
                for v in (ct["stride"], ct["padding"], ct["output_padding"], ct["dilation"])]
        _cuda.ALGO = algo
        _cuda.IGEMM_CONFIG = int(cfg[0]) if cfg else None
        _cuda._plans.clear()
        OP(x, w, b, *trip, g, [], [], [])
        torch.cuda.synchronize()
        print(f"{pid}:{algo} ran {_cuda.LAST_KERNEL}", flush=True)
        del x, w, b


if __name__ == "__main__":
    main(sys.argv[1:] or ["l2_58:direct", "l2_58:gemm", "l2_20:direct", "l2_20:gemm"])
