"""Times the fused op's kernels on the benchmark suite, one call per kernel choice.

    python scripts/time_kernels.py [--dtype fp32|fp32-exact|bf16|fp16] [--only REGEX]
                                   [--algos auto,gemm,direct,direct_staged] [--json PATH]
                                   [--bare]

For each suite problem (benchmarks/suite.json, the published sizes) this builds the model the
way ``python -m ct3d_fx.bench`` does, optimizes it, captures the calls of the fused op during
one forward, and times those calls (``ct3d_fx.bench.time_ms``: triton's do_bench median, L2
flushed) with the per-shape autotune off and ``ct3d_fx._cuda.ALGO`` set to each of ``--algos``
("auto": the kernel _cuda.py and launch_conv pick; "gemm": the strided-input implicit GEMM;
"igemm" or "igemm:N": the channels-last implicit GEMM, with tile configuration N of
``_cuda.IGEMM_CONFIGS``; "direct": the direct FP32 kernel where it applies; "direct_staged":
its staged-input form where that applies, else as "direct"); a choice that runs a kernel already
timed for the problem reuses that time. ``--bare`` also times the first choice with each call's epilogue program
removed (convolution plus bias only, column ``bare_ms``): the difference is what the
epilogue costs inside the fused kernel. Every choice's output is compared with the first one's (relative
L2 difference) so a broken kernel cannot time well unnoticed.

The "before" column and the floor come from the committed benchmark of the same dtype on the
same device kind (benchmarks/results/h200*.json: ``fused_op_ms`` and ``floor_ms``), so
``op/floor`` compares with docs/performance.md; times on another device or driver are only
comparable within this script's own columns.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ct3d_fx  # noqa: E402
from ct3d_fx import _cuda, bench  # noqa: E402

BASELINE = {"fp32": "h200.json", "fp32-exact": "h200_fp32_exact.json", "bf16": "h200_bf16.json"}


def site_calls(entry: dict, device: torch.device, dtype: torch.dtype) -> list:
    """The fused op's calls (op, args, kwargs) during one forward of suite problem ``entry``'s
    model, built and optimized the way ``python -m ct3d_fx.bench`` does (its seed, inputs drawn
    in float32 then cast to ``dtype``)."""
    seed = bench._seed_for(0, entry["id"])
    torch.manual_seed(seed)
    model, shapes = bench.build_problem(entry)
    model = model.to(device=device, dtype=dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    inputs = [torch.rand(s, generator=gen, device=device, dtype=torch.float32).to(dtype)
              for s in shapes]
    with torch.no_grad():
        opt = ct3d_fx.optimize(copy.deepcopy(model), tuple(inputs),
                               config=ct3d_fx.Config(verify=False))
        with bench._CaptureFused() as cap:
            opt(*inputs)
    return cap.calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="fp32", choices=tuple(bench.DTYPES))
    ap.add_argument("--only", default=None, metavar="REGEX")
    ap.add_argument("--algos", default="auto,gemm,direct")
    ap.add_argument("--json", default=None)
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--bare", action="store_true",
                    help="also time the first choice without the epilogue program")
    opts = ap.parse_args()
    algos = opts.algos.split(",")
    device = torch.device("cuda")
    dtype = bench.DTYPES[opts.dtype]
    exact = opts.dtype == "fp32-exact"
    torch.backends.cudnn.allow_tf32 = not exact
    torch.backends.cuda.matmul.allow_tf32 = not exact
    _cuda.AUTOTUNE = False

    base = {}
    path = ROOT / "benchmarks" / "results" / BASELINE.get(opts.dtype, "none")
    if path.is_file():
        base = {r["id"]: r for r in json.loads(path.read_text())["rows"]}

    suite = bench.load_suite()
    rows = []
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, dtype "
          f"{opts.dtype}; ms per problem (all fused calls), before = {path.name}", flush=True)
    for entry in suite["problems"]:
        pid = entry["id"]
        if opts.only and not re.search(opts.only, pid):
            continue
        calls = site_calls(entry, device, dtype)
        with torch.no_grad():
            row = {"id": pid, "dtype": opts.dtype, "n_calls": len(calls)}
            ref_out = None
            timed = {}  # kernel that ran -> ms: a choice that runs an already timed kernel
            for algo in algos:
                # "igemm:N" forces the channels-last implicit GEMM with configuration N
                _cuda.ALGO, _, cfg = algo.partition(":")
                _cuda.IGEMM_CONFIG = int(cfg) if cfg else None
                _cuda._plans.clear()
                outs = [f(*a, **k) for f, a, k in calls]
                row[f"{algo}_kernel"] = str(_cuda.LAST_KERNEL) + (
                    f":{cfg}" if cfg and _cuda.LAST_KERNEL == "igemm" else "")
                flat = torch.cat([o.detach().double().flatten() for o in outs])
                if ref_out is None:
                    ref_out = flat
                    row[f"{algo}_diff"] = 0.0
                else:
                    row[f"{algo}_diff"] = ((flat - ref_out).norm()
                                           / ref_out.norm().clamp_min(1e-300)).item()
                row[f"{algo}_nan"] = int(torch.isnan(flat).sum())
                del outs, flat
                kernel = row[f"{algo}_kernel"]
                if kernel not in timed:
                    timed[kernel] = round(bench.time_ms(
                        lambda: [f(*a, **k) for f, a, k in calls], device,
                        warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms), 4)
                row[f"{algo}_ms"] = timed[kernel]
                if opts.bare and algo == algos[0]:
                    # program, scalars, extras -> empty: the convolution plus bias alone
                    bare = [(f, tuple(a[:8]) + ([], [], []), k) for f, a, k in calls]
                    row["bare_ms"] = round(bench.time_ms(
                        lambda: [f(*a, **k) for f, a, k in bare], device,
                        warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms), 4)
                    row["program_len"] = [len(a[8]) // 6 for _, a, _ in calls]
            _cuda.ALGO = "auto"
            _cuda.IGEMM_CONFIG = None
            _cuda._plans.clear()
        b = base.get(pid, {})
        row["before_ms"] = b.get("fused_op_ms")
        row["floor_ms"] = b.get("floor_ms")
        rows.append(row)
        cells = " ".join(f"{a} {row[f'{a}_ms']:8.3f} ({row[f'{a}_kernel']}, "
                         f"d={row[f'{a}_diff']:.1e})" for a in algos)
        fl = row["floor_ms"]
        ratio = f"{row[f'{algos[0]}_ms'] / fl:6.2f}" if fl else "     -"
        before = f"{row['before_ms']:8.3f}" if row["before_ms"] else "       -"
        bare = (f"  bare {row['bare_ms']:8.3f} (instr {row['program_len']})"
                if "bare_ms" in row else "")
        print(f"{pid:7s} before {before}  {cells}  {algos[0]}/floor {ratio}{bare}", flush=True)
        del calls, ref_out
        torch.cuda.empty_cache()
        if opts.json:
            Path(opts.json).write_text(json.dumps(rows, indent=1))

    def geo(vals):
        vals = [v for v in vals if v]
        return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else float("nan")

    for algo in algos:
        r = [row[f"{algo}_ms"] / row["floor_ms"] for row in rows if row["floor_ms"]]
        s = [row["before_ms"] / row[f"{algo}_ms"] for row in rows if row["before_ms"]]
        print(f"{algo}: op/floor geomean {geo(r):.2f} (worst {max(r, default=float('nan')):.2f})"
              f", speedup over before geomean {geo(s):.2f}x over {len(s)} problems")
    r = [row["before_ms"] / row["floor_ms"] for row in rows if row["floor_ms"] and row["before_ms"]]
    print(f"before: op/floor geomean {geo(r):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
