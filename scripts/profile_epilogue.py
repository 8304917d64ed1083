"""One launch each of a suite problem's fused calls with and without its epilogue program.

    ncu --clock-control none -k regex:conv_transpose3d_ \
        python scripts/profile_epilogue.py ID [ID ...]

Builds the problem's model as ``python -m ct3d_fx.bench`` does (float32, TF32 as PyTorch
defaults), optimizes it, captures the fused calls of one forward (launch 1), then runs them
again with the program (launch 2) and with the program removed, convolution plus bias only
(launch 3). Under Nsight Compute, launches 2 and 3 compare what the epilogue program costs
inside the kernel.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ct3d_fx  # noqa: E402
from ct3d_fx import _cuda, bench  # noqa: E402


def main(ids) -> None:
    problems = {p["id"]: p for p in bench.load_suite()["problems"]}
    _cuda.AUTOTUNE = False
    device = torch.device("cuda")
    for pid in ids:
        torch.manual_seed(bench._seed_for(0, pid))
        model, shapes = bench.build_problem(problems[pid])
        model = model.to(device)
        inputs = [torch.rand(s, device=device) for s in shapes]
        with torch.no_grad():
            opt = ct3d_fx.optimize(copy.deepcopy(model), tuple(inputs),
                                   config=ct3d_fx.Config(verify=False))
            with bench._CaptureFused() as cap:
                opt(*inputs)
            for f, a, k in cap.calls:
                f(*a, **k)
                print(pid, "program", _cuda.LAST_KERNEL, flush=True)
                f(*(tuple(a[:8]) + ([], [], [])), **k)
                print(pid, "bare", _cuda.LAST_KERNEL, flush=True)
        torch.cuda.synchronize()
        del model, opt, inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:] or ["l2_100"])
