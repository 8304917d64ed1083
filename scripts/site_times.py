"""Each fused site's candidates, timed on suite problems (what the autotune chooses between).

    python scripts/site_times.py --only REGEX [--dtype fp32|bf16] [--json OUT.json]

For every suite problem whose id matches REGEX: the model (benchmarks/suite.json, eval mode, on
the GPU in the dtype; float32 with PyTorch's TF32 defaults), ``ct3d_fx.optimize``, one forward
(the autotune's choice), then per fused site ``host_time.per_site``: GPU ms (triton's do_bench,
median) of the fused kernel and each of its kernels forced, the reference (cuDNN + PyTorch ops),
the cuDNN channels_last_3d candidate with PyTorch ops and with the epilogue pass, the
"cudnn_pass" candidate, the conv and the pass alone, and the autotune's choice. Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import ct3d_fx  # noqa: E402
from ct3d_fx import bench  # noqa: E402
from host_time import per_site  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", required=True)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    out = {"device": torch.cuda.get_device_name(), "dtype": a.dtype, "problems": {}}
    for entry in bench.load_suite()["problems"]:
        if not re.search(a.only, entry["id"]):
            continue
        model, shapes = bench.build_problem(entry, seed=0)
        model = model.cuda().to(dt)
        inputs = [torch.rand(s, device="cuda").to(dt) for s in shapes]
        opt = ct3d_fx.optimize(model, tuple(inputs), config=ct3d_fx.Config(verify=False))
        with torch.no_grad():
            opt(*inputs)
            sites = per_site(opt, *inputs)
        out["problems"][entry["id"]] = sites
        for s in sites:
            times = {k: v for k, v in s.items() if k.endswith("_ms")}
            print(entry["id"], a.dtype, "choice", s["choice"], json.dumps(times), flush=True)
        del model, opt, inputs
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
