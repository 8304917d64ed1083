"""Issue 5's summary figures from benchmark JSONs (``python -m ct3d_fx.bench --json``).

    python scripts/summarize_results.py benchmarks/results/h200.json [more.json ...]

Per file, over the suite rows (``kind`` "suite"): geomean of fused op / floor, the worst row and
the rows above 5x; geomean of eager / ct3d (model), of eager conv+epilogue / fused op, of
torch.compile / ct3d where measured; the rows slower than eager or than torch.compile; then the
network rows' ct3d speedup against eager (and torch.compile). Model speedups are the rows'
``speedup_vs_eager`` / ``speedup_vs_compile`` (from v29 on the median of the interleaved rounds'
ratios; before, the ratio of the medians), or the ratio of the medians where a row lacks them;
the op ratio is of the medians.
"""
from __future__ import annotations

import json
import math
import sys


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def speedup(r: dict, key: str, num: str, den: str):
    """The row's ``key`` (its paired speedup), else ``num / den`` of its medians; None when
    either time is missing."""
    if r.get(key):
        return r[key]
    return r[num] / r[den] if r.get(num) and r.get(den) else None


def summarize(path: str) -> None:
    d = json.load(open(path))
    rows = d["rows"]
    suite = [r for r in rows if r.get("kind") == "suite" and r.get("ct3d_ms")]
    print(f"== {path}: {d.get('dtype')} {d.get('device')} {d.get('date')} commit "
          f"{d.get('git_commit')}, {len(suite)} suite rows")
    ratio = {r["id"]: r["floor_ratio"] for r in suite if r.get("floor_ratio")}
    worst = max(ratio, key=ratio.get)
    above = sorted(((v, k) for k, v in ratio.items() if v > 5), reverse=True)
    print(f"fused op / floor: geomean {geomean(ratio.values()):.2f}, worst {worst} "
          f"{ratio[worst]:.1f}, {len(above)} above 5x: "
          + ", ".join(f"{k} {v:.1f}" for v, k in above))
    x_eager = {r["id"]: speedup(r, "speedup_vs_eager", "eager_ms", "ct3d_ms") for r in suite
               if r.get("eager_ms")}
    print(f"model vs eager: geomean {geomean(x_eager.values()):.2f}x, min "
          f"{min(x_eager, key=x_eager.get)} {min(x_eager.values()):.2f}x; slower than eager: "
          + (", ".join(f"{k} {v:.3f}" for k, v in sorted(x_eager.items()) if v < 1) or "none"))
    op = [r["eager_conv_epilogue_ms"] / r["fused_op_ms"] for r in suite
          if r.get("eager_conv_epilogue_ms") and r.get("fused_op_ms")]
    print(f"fused op vs eager conv + epilogue: geomean {geomean(op):.2f}x")
    comp = {r["id"]: speedup(r, "speedup_vs_compile", "compile_ms", "ct3d_ms") for r in suite
            if r.get("compile_ms")}
    if comp:
        print(f"model vs torch.compile: geomean {geomean(comp.values()):.2f}x; slower: "
              + (", ".join(f"{k} {v:.3f} ({r_ms(suite, k)})" for k, v in sorted(comp.items())
                           if v < 1) or "none"))
    for r in rows:
        if r.get("kind") != "suite" and r.get("ct3d_ms"):
            c = (f", {speedup(r, 'speedup_vs_compile', 'compile_ms', 'ct3d_ms'):.2f}x "
                 f"torch.compile" if r.get("compile_ms") else "")
            print(f"  {r['id']}: eager {r['eager_ms']:.3f} ms, ct3d {r['ct3d_ms']:.3f} ms: "
                  f"{speedup(r, 'speedup_vs_eager', 'eager_ms', 'ct3d_ms'):.2f}x eager{c}")


def r_ms(suite, k):
    r = next(r for r in suite if r["id"] == k)
    return f"{r['ct3d_ms']:.3f} vs {r['compile_ms']:.3f} ms"


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summarize(p)
