"""Runs the fused kernels on the CPU, one host thread per CUDA thread, against float64.

    python scripts/emulate/emulate.py [--kernel direct|gemm] [--seeds 0-60] [--bf16] [--no-asan]
                                      [--softmax]

For checking index arithmetic without a GPU: the direct kernel and the exact-FP32 (FFMA) GEMM
of csrc/ct3d_conv.cuh are compiled with g++ (C++20, the CUDA headers for the half types) under
scripts/emulate/emu_shim.h, and run CTA by CTA on configurations of the GPU sweep
(tests/test_cuda_kernel.py ``make_case``; the W stride is capped at 2 for the direct kernel), with
their decoded epilogue programs, NaN-poisoned outputs and, by default, AddressSanitizer on every
global buffer. Each output is checked against the float64 reference (relative L2 error <= 1e-5,
every element written). The tensor-core paths (mma.sync) do not run here; the GPU tests cover
them. Needs g++ >= 11 and CUDA's include directory (CUDA_HOME, default /usr/local/cuda).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ct3d_fx import _cuda, ops  # noqa: E402
import test_cuda_kernel as T  # noqa: E402


def build(workdir: Path, asan: bool) -> Path:
    """Preprocesses csrc/ct3d_conv.cuh for the shim and compiles the harness."""
    src = (ROOT / "csrc" / "ct3d_conv.cuh").read_text()
    src = src[:src.index("// Host side")] + "}  // namespace ct3d\n"
    src, n = re.subn(r"extern __shared__ __align__\(16\) unsigned char smem_raw\[\];",
                     "unsigned char* smem_raw = emu_smem;", src)
    assert n >= 2, "the kernels' dynamic shared-memory declaration changed"
    (workdir / "conv_emu.cuh").write_text(src)
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    exe = workdir / "harness"
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-w", f"-I{cuda}/include", f"-I{ROOT / 'csrc'}",
           f"-I{HERE}", f"-I{workdir}", str(HERE / "harness.cpp"), "-o", str(exe), "-lpthread"]
    if asan:
        cmd.insert(1, "-fsanitize=address")
    subprocess.run(cmd, check=True)
    return exe


def _storage(t: torch.Tensor) -> torch.Tensor:
    """The elements of t's storage from its first element on, as a flat tensor."""
    n = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return torch.as_strided(t, (n,), (1,), t.storage_offset())


def pack_case(args, co: int, bf16: bool) -> tuple:
    """The harness's case file for one call; co = 8 / 16 runs the direct kernel, 0 the GEMM."""
    x, w, b, st, pa, op, di, g, prog, sc, ex = args
    plan = _cuda._make_plan(*args)
    assert plan.fallback is None, plan.fallback

    def data(t):
        flat = _storage(t)
        return (flat.view(torch.int16) if bf16 else flat.float()).numpy().tobytes()

    out = [struct.pack("i", 2 if bf16 else 0), struct.pack("5i", *x.shape),
           struct.pack("5q", *x.stride()), struct.pack("q", _storage(x).numel()), data(x)]
    wp = w.permute(2, 3, 4, 0, 1).contiguous().permute(3, 4, 0, 1, 2)  # as _cuda.py repacks
    out += [struct.pack("3i", *w.shape[2:]), struct.pack("5q", *wp.stride()),
            struct.pack("q", _storage(wp).numel()), data(wp)]
    out += [struct.pack("q", 0)] if b is None else [struct.pack("q", b.numel()), data(b)]
    shape, stride = plan.shape, plan.stride
    y_numel = max(sum((s - 1) * t for s, t in zip(shape, stride)) + 1, 1)
    out += [struct.pack("4i", *shape[1:]), struct.pack("5q", *stride), struct.pack("q", y_numel),
            struct.pack("3i", g, x.shape[1] // g, w.shape[1]), struct.pack("9i", *plan.conv[:9])]
    slots = [ex[i] for i in plan.slot_extras]
    out.append(struct.pack("i", len(slots)))
    for t, s in zip(slots, plan.slot_strides.tolist()):
        f64 = t.dtype == torch.float64
        flat = _storage(t)
        out += [struct.pack("i", 3 if f64 else 0), struct.pack("5q", *s),
                struct.pack("q", flat.numel()),
                (flat.double() if f64 else flat.float()).numpy().tobytes()]
    out.append(struct.pack("3i", len(plan.prog_i), *plan.regs))
    for row, f in zip(plan.prog_i.tolist(), plan.prog_f.tolist()):
        out.append(struct.pack("5i2f", *row, *f))
    out.append(struct.pack("i", co))
    return b"".join(out), shape, stride, y_numel


def run_case(exe: Path, workdir: Path, case, kernel: str, bf16: bool, softmax: bool = False):
    args = T.build_args(case, "cpu")
    if softmax:  # the case's epilogue replaced by (log_)softmax over the channels
        args = args[:8] + (*T.softmax_program(bool(case.seed % 2), bool(case.seed // 2 % 2)),
                           [])
    co = (8 if args[1].shape[1] <= 8 else 16) if kernel == "direct" else 0
    blob, shape, stride, y_numel = pack_case(args, co, bf16)
    (workdir / "case.bin").write_bytes(blob)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    subprocess.run([str(exe), str(workdir / "case.bin"), str(workdir / "out.bin")], check=True,
                   env=env)
    y = np.fromfile(workdir / "out.bin", dtype=np.float32)
    assert y.size == y_numel
    got = torch.as_strided(torch.from_numpy(y), shape, stride).double()
    ref = T.reference64(args)
    unwritten = int((torch.isnan(got) & ~torch.isnan(ref)).sum())
    return T.rel_err(got, ref), unwritten, got.numel()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", choices=("direct", "gemm"), default="direct")
    ap.add_argument("--seeds", default="0-40", help="sweep seeds, e.g. 0-40 or 3,7,12")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 inputs (direct kernel only)")
    ap.add_argument("--no-asan", action="store_true")
    ap.add_argument("--softmax", action="store_true",
                    help="GEMM only: each case's epilogue becomes (log_)softmax over the "
                         "channels (cases with groups > 1 or over 64 channels are skipped)")
    ap.add_argument("--max-outputs", type=int, default=300000,
                    help="skip configurations with more output elements (CPU time)")
    opts = ap.parse_args()
    if opts.bf16 and opts.kernel != "direct":
        ap.error("--bf16 needs --kernel direct (the GEMM runs FP32 FFMA here)")
    if opts.softmax and opts.kernel != "gemm":
        ap.error("--softmax needs --kernel gemm (the direct kernel does not run SOFTMAX)")
    seeds = []
    for part in opts.seeds.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    worst, failed = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        exe = build(workdir, asan=not opts.no_asan)
        for seed in seeds:
            case = T.make_case(seed)
            case.precision = "bf16" if opts.bf16 else "fp32"
            if opts.kernel == "direct" and case.stride[2] > 2:
                case.stride[2] = 2
                case.output_padding[2] = min(case.output_padding[2],
                                             max(2, case.dilation[2]) - 1)
            n_out = case.N * case.cout_g * case.groups * math.prod(case.out_spatial())
            if n_out > opts.max_outputs:
                continue
            if opts.softmax and (case.groups != 1 or case.cout_g > _cuda.SOFTMAX_MAX_CHANNELS):
                continue
            err, unwritten, total = run_case(exe, workdir, case, opts.kernel, opts.bf16,
                                             opts.softmax)
            ok = unwritten == 0 and err <= 1e-5
            failed += not ok
            worst = max(worst, err)
            prog = ("(log_)softmax over the channels" if opts.softmax else
                    ops.describe_program(*T.build_args(case, "cpu")[8:10]))
            print(f"{'ok  ' if ok else 'FAIL'} {case} rel.err {err:.2e} unwritten {unwritten} "
                  f"of {total}; {prog}", flush=True)
    print(f"{opts.kernel}: {failed} failed, worst rel. L2 error {worst:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
