"""Host (CPU) time against GPU time of a small optimized model, to tell host-bound rows apart.

    python scripts/host_time.py [--dtype bf16|fp32] [--batch 1] [--json OUT.json] [--prof OUT.txt]
                                [--sites]

For the GAN generator of examples/ (eval mode), eager and ``ct3d_fx.optimize``: after a warm-up
(the autotune's first calls), the mean CPU time to enqueue one forward (200 forwards back to
back, one synchronize at the end, so that it measures the host when the GPU keeps up), the mean
GPU time per forward over the same loop (CUDA events around it), and the autotune's choice per
site. With --prof, torch.profiler's table (self CPU time) of 20 optimized forwards. With --sites,
per fused site (its arguments captured from one forward): GPU ms (triton's do_bench, median) of
the fused kernel (autotune off; then each of its kernels forced: direct, igemm, gemm), the
reference, the cuDNN channels_last_3d candidate and the "subpixel" candidate where they apply,
the kernel that ran and the autotune's choice. Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import ct3d_fx  # noqa: E402
from ct3d_fx import _cuda  # noqa: E402
import gan_generator  # noqa: E402


def per_forward(fn, n: int = 200) -> dict:
    """Mean host ms to enqueue one call, and mean device ms per call, over n calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) * 1e3 / n
    end.record()
    torch.cuda.synchronize()
    return {"host_ms": round(host, 4), "wall_ms": round(start.elapsed_time(end) / n, 4)}


def per_site(opt, *inputs) -> list:
    """Each fused site's candidates timed on the arguments of one forward."""
    from triton.testing import do_bench

    captured = []
    run = _cuda.run

    def capture(args):
        captured.append(args)
        return run(args)

    _cuda.run = capture
    try:
        opt(*inputs)
    finally:
        _cuda.run = run
    rows = []
    autotune = _cuda.AUTOTUNE
    choices = _cuda.autotune_choices()
    timings = _cuda.autotune_timings()
    try:
        _cuda.AUTOTUNE = False  # run() then always takes the fused kernel where it applies
        for args in captured:
            inp, w = args[0], args[1]
            plan = _cuda._get_plan(*args)
            row = {"input": list(inp.shape), "weight": list(w.shape),
                   "fallback": plan.fallback,
                   "igemm_tiles": list(getattr(plan, "igemm_tiles", None) or ()),
                   "igemm_auto": getattr(plan, "igemm_auto", None),
                   "choice": [v for k, v in choices.items() if k[0] == _cuda._key(*args)],
                   "autotune_ms": [{n: round(t, 4) for n, t in v.items()}
                                   for k, v in timings.items() if k[0] == _cuda._key(*args)]}
            bench = lambda f: round(do_bench(f, warmup=10, rep=100, return_mode="median"), 4)
            row["fused_ms"] = bench(lambda: _cuda.run(args))
            row["kernel"] = str(_cuda.LAST_KERNEL) + (
                " (wgmma)" if _cuda.LAST_KERNEL == "igemm" and _cuda.LAST_WGMMA else "")
            algo = _cuda.ALGO
            try:  # the other kernels of the fused op, forced
                for forced in ("direct", "igemm", "gemm"):
                    _cuda.ALGO = forced
                    row[f"{forced}_ms"] = bench(lambda: _cuda.run(args))
                    row[f"{forced}_kernel"] = _cuda.LAST_KERNEL
            finally:
                _cuda.ALGO = algo
            row["reference_ms"] = bench(lambda: _cuda.reference(*args))
            if _cuda._channels_last_applies(inp):
                # with the program in PyTorch ops, and with the epilogue pass where it applies
                row["cudnn_channels_last_ms"] = bench(lambda: _cuda._reference_channels_last(
                    args, plan.shape, plan.stride, plan.dtype))
                if _cuda._pass_applies(plan, inp):
                    row["cudnn_channels_last_pass_ms"] = bench(
                        lambda: _cuda._reference_channels_last(args, plan.shape, plan.stride,
                                                               plan.dtype, plan))
            if _cuda._subpixel_applies(inp, w, args[7], args[3]):
                row["subpixel_ms"] = bench(lambda: _cuda._reference_subpixel(
                    args, plan.shape, plan.stride, plan.dtype))
            if plan.fallback is None and _cuda._pass_applies(plan, inp):
                ext = _cuda._build.load()
                row["cudnn_pass_ms"] = bench(lambda: _cuda._cudnn_pass(ext, plan, args))
                y = torch.nn.functional.conv_transpose3d(inp, w, None, *args[3:6], args[7],
                                                         args[6])
                row["conv_only_ms"] = bench(lambda: torch.nn.functional.conv_transpose3d(
                    inp, w, None, *args[3:6], args[7], args[6]))
                row["pass_only_ms"] = bench(lambda: _cuda._run_pass(ext, plan, y, args[2],
                                                                     args[10], y))
            rows.append(row)
    finally:
        _cuda.AUTOTUNE = autotune
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--prof")
    ap.add_argument("--sites", action="store_true")
    a = ap.parse_args(argv)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    model, (shape,) = gan_generator.build(a.batch)
    model = model.cuda().to(dt)
    x = torch.rand(shape, device="cuda", dtype=dt)
    opt = ct3d_fx.optimize(model, x)
    res = {"device": torch.cuda.get_device_name(), "dtype": a.dtype, "batch": a.batch}
    with torch.no_grad():
        opt(x)  # the autotune's first calls
        res["eager"] = per_forward(lambda: model(x))
        res["ct3d"] = per_forward(lambda: opt(x))
        res["eager_again"] = per_forward(lambda: model(x))
        res["ct3d_again"] = per_forward(lambda: opt(x))
        res["autotune"] = sorted({v for v in _cuda.autotune_choices().values()})
        err = (opt(x).float() - model(x).float()).abs().max().item()
        res["max_abs_diff_vs_eager"] = err
        if a.sites:
            res["sites"] = per_site(opt, x)
        if a.prof:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(20):
                    opt(x)
                torch.cuda.synchronize()
            with open(a.prof, "w") as f:
                f.write(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
