"""The epilogue pass alone on suite output shapes: vector kernels on / off, against PyTorch's copy.

    python scripts/pass_time.py [--json OUT.json]

For each case (a suite problem's conv output, the dtype, the bias and a program like the
problem's): the source is a random channels_last_3d tensor (what cuDNN's channels-last conv
writes) and the output the NCDHW tensor the site returns, or an NCDHW source run in place.
Times, GPU ms (triton's do_bench, median of its repetitions), in one process: the pass with
``_cuda.PASS_LITE`` 0 (the staged / plain kernels), 1 (the default rule), 2 and 3 (every
transpose on the vector kernels with scalar / 16-byte output stores), with the kernel each ran,
and ``out.copy_(src)`` (PyTorch's layout copy, no bias or program: a bandwidth yardstick).
GB/s counts one read of the source and one write of the output (not a side input). Checks
first that the forms agree (max abs difference from the staged kernel's output). Needs CUDA
and triton.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ct3d_fx import _build, _cuda, bench, ops  # noqa: E402
from ct3d_fx.ops import Opcode as O  # noqa: E402


def _row(*fields):
    return [int(f) for f in fields] + [-1] * (6 - len(fields))


CLAMP_DIV = (_row(O.CLAMP, 0, 0, -1) + _row(O.LOAD_SCALAR, 1) + _row(O.DIV, 1, 2), [-1.0, 2.0])
RELU = (_row(O.RELU, 0), [])
SIDE_HSWISH = (_row(O.LOAD_TENSOR, 0) + _row(O.ADD, 0, 1) + _row(O.HARDSWISH, 2)
               + _row(O.MUL, 2, 3), [])
NONE = ([], [])
# (suite id, dtype, program, side input, source layout: "cl" -> an NCDHW output, "ncdhw" ->
# in place)
CASES = [("l2_100", torch.float32, CLAMP_DIV, False, "cl"),
         ("l1_68", torch.float32, NONE, False, "cl"),
         ("l1_61", torch.float32, NONE, False, "cl"),
         ("l2_78", torch.float32, NONE, False, "cl"),
         ("l2_61", torch.float32, RELU, False, "cl"),
         ("l1_68", torch.bfloat16, NONE, False, "cl"),
         ("l1_61", torch.bfloat16, NONE, False, "cl"),
         ("l2_26", torch.bfloat16, SIDE_HSWISH, True, "cl"),
         ("l2_78", torch.bfloat16, NONE, False, "cl"),
         ("l1_68", torch.bfloat16, NONE, False, "ncdhw"),
         ("l2_61", torch.float32, RELU, False, "ncdhw")]
# _cuda.PASS_LITE values timed: the staged / plain kernels, the default rule, and every
# transpose forced to scalar / 16-byte output stores
MODES = {"old": 0, "auto": 1, "scalar": 2, "vector": 3}


def main(argv=None) -> int:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    ext = _build.load()
    problems = {p["id"]: p for p in bench.load_suite()["problems"]}
    rows = []
    for pid, dt, (program, scalars), side, layout in CASES:
        ct, xs = problems[pid]["ct"], problems[pid]["x"]
        k = ct["k"] if isinstance(ct["k"], list) else [ct["k"]] * 3
        tri = lambda v: v if isinstance(v, list) else [v] * 3  # noqa: E731
        x = torch.empty(xs, device="cuda", dtype=dt)
        w = torch.empty(ct["in"], ct["out"] // ct["groups"], *k, device="cuda", dtype=dt)
        shape = ops.output_shape(x, w, tri(ct["stride"]), tri(ct["padding"]),
                                 tri(ct["output_padding"]), tri(ct["dilation"]), ct["groups"])
        b = torch.randn(ct["out"], device="cuda", dtype=dt) if ct["bias"] else None
        extras = [torch.randn(shape, device="cuda", dtype=dt)] if side else []
        args = (x, w, b, tri(ct["stride"]), tri(ct["padding"]), tri(ct["output_padding"]),
                tri(ct["dilation"]), ct["groups"], program, scalars, extras)
        plan = _cuda._get_plan(*args)
        del x, w
        fmt = torch.channels_last_3d if layout == "cl" else torch.contiguous_format
        src = torch.randn(shape, device="cuda", dtype=dt).contiguous(memory_format=fmt)
        in_place = layout == "ncdhw"
        out = (src if in_place else
               torch.empty_strided(plan.shape, plan.stride, dtype=plan.dtype, device="cuda"))
        row = {"id": pid, "dtype": str(dt).replace("torch.", ""), "shape": list(shape),
               "source": "NCDHW, in place" if in_place else "channels_last_3d -> NCDHW",
               "program": ops.describe_program(program, scalars) if program else "(bias only)"}
        if not in_place:  # the forms agree (in place, each run changes the source)
            ref = torch.empty_like(out)
            _cuda.PASS_LITE = 0
            _cuda._run_pass(ext, plan, src, b, extras, ref)
            diffs = {}
            for name, mode in MODES.items():
                _cuda.PASS_LITE = mode
                out.fill_(float("nan"))
                _cuda._run_pass(ext, plan, src, b, extras, out)
                diffs[name] = (out.float() - ref.float()).abs().max().item()
            row["max_abs_diff_vs_old"] = max(diffs.values())
            del ref
        nbytes = src.numel() * src.element_size() + out.numel() * out.element_size()
        for name, mode in MODES.items():
            _cuda.PASS_LITE = mode
            _cuda._run_pass(ext, plan, src, b, extras, out)
            row[f"{name}_kernel"] = _cuda.LAST_PASS_KERNEL
            t = do_bench(lambda: _cuda._run_pass(ext, plan, src, b, extras, out),
                         warmup=10, rep=200, return_mode="median")
            row[f"{name}_ms"] = round(t, 4)
            row[f"{name}_GBps"] = round(nbytes / t / 1e6, 1)
        _cuda.PASS_LITE = 1
        if not in_place:
            t = do_bench(lambda: out.copy_(src), warmup=10, rep=200, return_mode="median")
            row["torch_copy_ms"] = round(t, 4)
            row["torch_copy_GBps"] = round(nbytes / t / 1e6, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del src, out, extras
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                            "torch": torch.__version__, "rows": rows},
                                           indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
