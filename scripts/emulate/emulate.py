"""Runs the fused kernels on the CPU, one host thread per CUDA thread, against float64.

    python scripts/emulate/emulate.py [--kernel direct|direct_staged|gemm] [--seeds 0-60]
                                      [--bf16] [--no-asan] [--softmax] [--header PATH]

For checking index arithmetic without a GPU: the direct kernel (plain and staged-input forms)
and the exact-FP32 (FFMA) GEMM of csrc/ct3d_conv.cuh are compiled with g++ (C++20, the CUDA
headers for the half types) under scripts/emulate/emu_shim.h, and run CTA by CTA on
configurations of the GPU sweep (tests/test_cuda_kernel.py ``make_case``; the W stride is capped
at 2 for the direct kernel), with their decoded epilogue programs, NaN-poisoned outputs and, by
default, AddressSanitizer on every global buffer and past the direct kernels' dynamic shared
memory. Each output is checked against the float64 reference (relative L2 error <= 1e-5, every
element written). ``direct_staged`` runs the staged form where launch_conv would take it (the
others are counted as not taken), checks that choice against the tests' mirror of the rule
(``direct_staged_applies``) and that its output is bitwise the plain direct kernel's. The
tensor-core paths (mma.sync) do not run here; the GPU tests cover them. ``--header`` compiles
another copy of ct3d_conv.cuh (mutation checks). Needs g++ >= 11 and CUDA's include directory
(CUDA_HOME, default /usr/local/cuda).
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ct3d_fx import _cuda, ops  # noqa: E402
import test_cuda_kernel as T  # noqa: E402


def cut_header(workdir: Path, header: Path = None) -> None:
    """Writes workdir/conv_emu.cuh: csrc/ct3d_conv.cuh (or ``header``) without its launch code
    (g++ cannot compile <<<...>>>), the kernels' dynamic shared memory replaced by emu_smem."""
    src = (header or ROOT / "csrc" / "ct3d_conv.cuh").read_text()
    src = src[:src.index("// Host side")] + "}  // namespace ct3d\n"
    src, n = re.subn(r"extern __shared__ __align__\(16\) unsigned char smem_raw\[\];",
                     "unsigned char* smem_raw = emu_smem;", src)
    assert n >= 2, "the kernels' dynamic shared-memory declaration changed"
    (workdir / "conv_emu.cuh").write_text(src)


def build(workdir: Path, asan: bool, header: Path = None) -> Path:
    """Preprocesses csrc/ct3d_conv.cuh (or ``header``) for the shim and compiles the harness."""
    cut_header(workdir, header)
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


def _bytes(t: torch.Tensor) -> bytes:
    """The bytes of t's elements in order (no numpy needed)."""
    t = t.contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def pack_case(args, co: int, bf16: bool, staged: bool = False) -> tuple:
    """The harness's case file for one call; co = 8 / 16 runs the direct kernel (its staged form
    with ``staged``), 0 the GEMM. Returns (case file, output shape, strides, storage elements,
    epilogue registers)."""
    x, w, b, st, pa, op, di, g, prog, sc, ex = args
    plan = _cuda._make_plan(*args)
    assert plan.fallback is None, plan.fallback

    def data(t):
        flat = _storage(t)
        return _bytes(flat.view(torch.int16) if bf16 else flat.float())

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
                _bytes(flat.double() if f64 else flat.float())]
    out.append(struct.pack("3i", len(plan.prog_i), *plan.regs))
    for row, f in zip(plan.prog_i.tolist(), plan.prog_f.tolist()):
        out.append(struct.pack("5i2f", *row, *f))
    out.append(struct.pack("2i", co, int(staged)))
    return b"".join(out), shape, stride, y_numel, plan.regs[0]


def _harness(exe: Path, workdir: Path, blob: bytes, y_numel: int):
    """Runs the harness on one case file: (its output storage, what it printed)."""
    (workdir / "case.bin").write_bytes(blob)
    (workdir / "out.bin").unlink(missing_ok=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    res = subprocess.run([str(exe), str(workdir / "case.bin"), str(workdir / "out.bin")],
                         check=True, env=env, stdout=subprocess.PIPE, text=True)
    y = torch.frombuffer(bytearray((workdir / "out.bin").read_bytes()), dtype=torch.float32)
    assert y.numel() == y_numel
    return y, res.stdout


def run_case(exe: Path, workdir: Path, case, kernel: str, bf16: bool, softmax: bool = False):
    """Runs one case: a dict with the relative L2 error, the unwritten elements and their
    total; for the staged form also ``taken`` (launch_conv's rule took it; else nothing else
    is set), ``mirror`` (the tests' direct_staged_applies says it is taken) and ``bitwise``
    (its output storage bit for bit the plain direct kernel's)."""
    args = T.build_args(case, "cpu")
    if softmax:  # the case's epilogue replaced by (log_)softmax over the channels
        args = args[:8] + (*T.softmax_program(bool(case.seed % 2), bool(case.seed // 2 % 2)),
                           [])
    co = (8 if args[1].shape[1] <= 8 else 16) if kernel != "gemm" else 0
    staged = kernel == "direct_staged"
    blob, shape, stride, y_numel, n_regs = pack_case(args, co, bf16, staged)
    y, printed = _harness(exe, workdir, blob, y_numel)
    out = {}
    if staged:
        out = {"mirror": T.direct_staged_applies(case, n_regs), "taken": "staged taken" in printed}
        if not out["taken"]:
            return out
    got = torch.as_strided(y, shape, stride).double()
    ref = T.reference64(args)
    unwritten = int((torch.isnan(got) & ~torch.isnan(ref)).sum())
    out.update(err=T.rel_err(got, ref), unwritten=unwritten, total=got.numel())
    if staged:
        plain, _ = _harness(exe, workdir, pack_case(args, co, bf16, False)[0], y_numel)
        out["bitwise"] = torch.equal(y.view(torch.int32), plain.view(torch.int32))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", choices=("direct", "direct_staged", "gemm"), default="direct")
    ap.add_argument("--seeds", default="0-40", help="sweep seeds, e.g. 0-40 or 3,7,12")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 inputs (direct kernel only)")
    ap.add_argument("--no-asan", action="store_true")
    ap.add_argument("--softmax", action="store_true",
                    help="GEMM only: each case's epilogue becomes (log_)softmax over the "
                         "channels (cases with groups > 1 or over 64 channels are skipped)")
    ap.add_argument("--max-outputs", type=int, default=300000,
                    help="skip configurations with more output elements (CPU time)")
    ap.add_argument("--header", type=Path, default=None,
                    help="compile this copy of csrc/ct3d_conv.cuh instead (mutation checks)")
    opts = ap.parse_args()
    if opts.bf16 and opts.kernel == "gemm":
        ap.error("--bf16 needs the direct kernel (the GEMM runs FP32 FFMA here)")
    if opts.softmax and opts.kernel != "gemm":
        ap.error("--softmax needs --kernel gemm (the direct kernel does not run SOFTMAX)")
    seeds = []
    for part in opts.seeds.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    worst, failed, not_taken, taken, bitwise, agree = 0.0, 0, 0, 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        exe = build(workdir, asan=not opts.no_asan, header=opts.header)
        for seed in seeds:
            case = T.make_case(seed)
            case.precision = "bf16" if opts.bf16 else "fp32"
            if opts.kernel != "gemm" and case.stride[2] > 2:
                case.stride[2] = 2
                case.output_padding[2] = min(case.output_padding[2],
                                             max(2, case.dilation[2]) - 1)
            n_out = case.N * case.cout_g * case.groups * math.prod(case.out_spatial())
            if n_out > opts.max_outputs:
                continue
            if opts.softmax and (case.groups != 1 or case.cout_g > _cuda.SOFTMAX_MAX_CHANNELS):
                continue
            res = run_case(exe, workdir, case, opts.kernel, opts.bf16, opts.softmax)
            if res.get("taken") is False:  # the staged form's rule does not take it
                not_taken += 1
                agree += not res["mirror"]
                failed += res["mirror"]
                print(f"{'FAIL' if res['mirror'] else '--  '} {case}: not taken"
                      f"{'; THE MIRROR SAYS TAKEN' if res['mirror'] else ''}", flush=True)
                continue
            err, unwritten, total = res["err"], res["unwritten"], res["total"]
            ok = unwritten == 0 and err <= 1e-5
            note = ""
            if opts.kernel == "direct_staged":
                taken += 1
                agree += res["mirror"]
                bitwise += res["bitwise"]
                ok = ok and res["mirror"] and res["bitwise"]
                note = (f"; bitwise {'=' if res['bitwise'] else '!='} plain"
                        f"{'' if res['mirror'] else '; THE MIRROR SAYS NOT TAKEN'}")
            failed += not ok
            worst = max(worst, err)
            prog = ("(log_)softmax over the channels" if opts.softmax else
                    ops.describe_program(*T.build_args(case, "cpu")[8:10]))
            print(f"{'ok  ' if ok else 'FAIL'} {case} rel.err {err:.2e} unwritten {unwritten} "
                  f"of {total}{note}; {prog}", flush=True)
    extra = ""
    if opts.kernel == "direct_staged":
        extra = (f", {not_taken} not taken; {bitwise} of {taken} bitwise the plain direct "
                 f"kernel's; the tests' mirror of the rule agrees on {agree} of "
                 f"{taken + not_taken}")
    print(f"{opts.kernel}: {failed} failed, worst rel. L2 error {worst:.2e}{extra}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
