"""Forward + backward time of ct3d_fx-optimized models against eager (issue 6 measurement).

    python scripts/bwd_bench.py [--json PATH] [--only REGEX]

Suite problems whose whole epilogue is fusable and has no BatchNorm (BatchNorm in training mode
is not fused): each model in train mode, float32 (TF32 as PyTorch defaults), inputs and all
parameters requiring grad; time = median of triton.testing.do_bench over
``model(*inputs).sum().backward()``. Prints a table; --json writes the rows.
"""
import argparse
import copy
import json
import math
import re

import torch

import ct3d_fx
from ct3d_fx import bench

IDS = ["l1_72", "l1_73", "l1_77", "l2_100", "l2_20", "l2_26", "l2_74"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--only", default=".")
    a = ap.parse_args()
    from triton.testing import do_bench
    suite = {p["id"]: p for p in bench.load_suite()["problems"]}
    rows = []
    for pid in IDS:
        if not re.search(a.only, pid):
            continue
        model, shapes = bench.build_problem(suite[pid], seed=0)
        model = model.cuda().train()
        opt = ct3d_fx.optimize(copy.deepcopy(model).eval()).train()
        opt.load_state_dict(model.state_dict())
        xs = [torch.rand(s, device="cuda", requires_grad=True) for s in shapes]

        def step(m):
            def f():
                m(*xs).sum().backward()
            return f
        # gradients agree?
        for m in (model, opt):
            for p in list(m.parameters()) + xs:
                p.grad = None
        model(*xs).sum().backward()
        g_eager = [x.grad.clone() for x in xs] + [p.grad.clone() for p in model.parameters()]
        for p in list(opt.parameters()) + xs:
            p.grad = None
        opt(*xs).sum().backward()
        g_opt = [x.grad.clone() for x in xs] + [p.grad.clone() for p in opt.parameters()]
        err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g_opt, g_eager))
        t_e = do_bench(step(model), warmup=25, rep=200, return_mode="median")
        t_o = do_bench(step(opt), warmup=25, rep=200, return_mode="median")
        rows.append(dict(id=pid, eager_fwd_bwd_ms=round(t_e, 3), ct3d_fwd_bwd_ms=round(t_o, 3),
                         speedup=round(t_e / t_o, 3), max_grad_rel_l2_err=err,
                         device=torch.cuda.get_device_name(0)))
        print(f"{pid:7s} eager {t_e:8.3f} ms  ct3d {t_o:8.3f} ms  x{t_e / t_o:5.2f}  "
              f"grad rel.err {err:.2e}", flush=True)
        del model, opt, xs
        torch.cuda.empty_cache()
    if rows:
        g = math.exp(sum(math.log(r["speedup"]) for r in rows) / len(rows))
        print(f"geomean forward+backward speedup over eager: {g:.2f}x ({len(rows)} problems)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
