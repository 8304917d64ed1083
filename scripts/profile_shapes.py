"""One launch of the fused op per (suite shape, kernel), for Nsight Compute.

    ncu --clock-control none -k regex:conv_transpose3d_ \
        python scripts/profile_shapes.py [ID:ALGO ...]

    python scripts/profile_shapes.py --site [ID:ALGO ...]

ID is a suite problem (benchmarks/suite.json; the convolution alone, float32, TF32 as PyTorch
defaults), ALGO one of auto, gemm, direct, igemm (``ct3d_fx._cuda.ALGO``), optionally followed by
``:N``, an ``IGEMM_CONFIGS`` id for igemm. With ``--site`` each launch is the problem's own fused
call instead (its epilogue program included: the suite model optimized, the fused op's calls
captured during one forward: scripts/time_kernels.py ``site_calls``), run once, then again between
cudaProfilerStart and cudaProfilerStop (``ncu --profile-from-start off`` profiles only those).
Default: l2_58 and l2_20 with both kernels. Prints the kernel that ran for each launch.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ct3d_fx import _cuda, bench  # noqa: E402
from time_kernels import site_calls  # noqa: E402  (scripts/: this file's folder)

OP = torch.ops.ct3d.conv_transpose3d_epilogue.default


def main(specs, site: bool = False) -> None:
    problems = {p["id"]: p for p in bench.load_suite()["problems"]}
    _cuda.AUTOTUNE = False
    for spec in specs:
        pid, algo, *cfg = spec.split(":")
        if site:
            calls = site_calls(problems[pid], torch.device("cuda"), torch.float32)
            _cuda.ALGO = algo
            _cuda.IGEMM_CONFIG = int(cfg[0]) if cfg else None
            _cuda._plans.clear()
            with torch.no_grad():
                for f, a, k in calls:  # plans the calls and packs the weights
                    f(*a, **k)
                torch.cuda.synchronize()
                # only these launches when ncu runs with --profile-from-start off
                torch.cuda.cudart().cudaProfilerStart()
                for f, a, k in calls:
                    f(*a, **k)
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
            print(f"{pid}:{algo} site ran {_cuda.LAST_KERNEL}", flush=True)
            del calls
            continue
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
    argv = sys.argv[1:]
    site = "--site" in argv
    argv = [a for a in argv if a != "--site"]
    main(argv or ["l2_58:direct", "l2_58:gemm", "l2_20:direct", "l2_20:gemm"], site)
