"""Runs the epilogue pass's vector kernels (csrc/ct3d_pass_lite.cuh) on the CPU against float64.

    python scripts/emulate/emulate_pass.py [--no-asan]

For checking their index arithmetic without a GPU: the kernels are compiled with g++ (C++20, the
CUDA headers for the half types) under scripts/emulate/emu_shim.h, one host thread per CUDA
thread, and run on the programs of tests/test_epilogue_pass.py over every layout pair and dtype
the binding sends to them (same layout NCDHW or channels_last_3d, channels_last_3d -> NCDHW;
float32, bfloat16, float16, half -> float32), on shapes with partial tiles in channels and
positions. Sources are random, outputs NaN-poisoned, buffers under AddressSanitizer by default.
Each output is compared with the program run in float64 on the same source (relative L2 error
<= 1e-6 for float32 outputs of float32 sources, 8e-3 otherwise; every element written). The
launch conditions (vectors of 8 elements along the fast dimension) are the binding's; programs
the kernels do not take (lite_program_ok) are reported as not taken.
"""
from __future__ import annotations

import argparse
import os
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
from test_epilogue_pass import _programs  # noqa: E402
from conftest import randn  # noqa: E402

_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16,
       torch.float64: np.float64}
CL = torch.channels_last_3d

# (N, C, D, H, W): channel blocks of 32 with a partial one; partial 128-position tiles; N > 1
SHAPES = [(2, 40, 3, 4, 10), (1, 24, 2, 6, 8), (3, 8, 1, 3, 16), (1, 64, 4, 4, 17 * 8 // 4),
          (2, 40, 3, 5, 7), (1, 16, 3, 3, 15)]  # the last two: odd S (scalar output stores)
# (src dtype, out dtype, src layout, out layout)
MODES = [(torch.float32, torch.float32, "ncdhw", "ncdhw"),
         (torch.float32, torch.float32, "cl", "cl"),
         (torch.float32, torch.float32, "cl", "ncdhw"),
         (torch.bfloat16, torch.bfloat16, "cl", "ncdhw"),
         (torch.bfloat16, torch.bfloat16, "ncdhw", "ncdhw"),
         (torch.float16, torch.float16, "cl", "ncdhw"),
         (torch.float16, torch.float16, "cl", "cl"),
         (torch.bfloat16, torch.float32, "cl", "ncdhw")]


def build(workdir: Path, asan: bool) -> Path:
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    exe = workdir / "pass_lite_harness"
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-w", f"-I{cuda}/include", f"-I{ROOT / 'csrc'}",
           f"-I{HERE}", str(HERE / "pass_lite_harness.cpp"), "-o", str(exe), "-lpthread"]
    if asan:
        cmd.insert(1, "-fsanitize=address")
    subprocess.run(cmd, check=True)
    return exe


def _raw(t: torch.Tensor) -> bytes:
    flat = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,))
    if t.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.contiguous().numpy().tobytes()


def run_case(exe, workdir, shape, mode, prog_id, bias_on, seed):
    sdt, odt, sl, ol = mode
    n, c, d, h, w = shape
    name, program, scalars, extras64 = _programs(c, shape)[prog_id]
    # the plan of a call whose output has `shape` (a 1x1x1 stride-1 conv of a C-channel input)
    x = torch.zeros(n, c, d, h, w, dtype=sdt)
    wt = torch.zeros(c, c, 1, 1, 1, dtype=sdt)
    fmt_o = CL if ol == "cl" else torch.contiguous_format
    extras = [t.to(sdt) for t in extras64]
    if odt != sdt:  # a float32 side input promotes the result (test_pass_bf16_conv_float32_output)
        extras = [t.float() if t.dim() == 5 else t for t in extras]
    extras = [t.contiguous(memory_format=fmt_o) if t.dim() == 5 else t for t in extras]
    args = (x, wt, None, [1] * 3, [0] * 3, [0] * 3, [1] * 3, 1, program, scalars, extras)
    plan = _cuda._make_plan(*args)
    assert plan.fallback is None and plan.passable, (name, plan.fallback)
    if plan.dtype != odt:
        return None  # this program does not promote: the pair is not reached
    fmt_s = CL if sl == "cl" else torch.contiguous_format
    src = randn(*shape, seed=seed).to(sdt).contiguous(memory_format=fmt_s)
    bias = randn(c, seed=seed + 1).to(sdt) if bias_on else None
    # the output in the layout asked for (the pass writes any collapsible layout; the plan's
    # follows the CPU reference), its slots' strides those of their views expanded to it
    out = torch.full(shape, float("nan"), dtype=odt).contiguous(memory_format=fmt_o)
    ys = out.stride()
    S = d * h * w
    if (sl, ol) == ("cl", "ncdhw"):
        lite = 2 if S % 8 == 0 else 3
    elif (c if sl == "cl" else S) % 8 == 0:
        lite = 1
    else:
        return None  # the binding sends this layout pair to the other kernels
    blob = [struct.pack("7i", _CODE[sdt], _CODE[odt], *shape),
            struct.pack("3q", src.stride(0), src.stride(1), src.stride(4)),
            struct.pack("i", int(sl == "cl")),
            struct.pack("3q", ys[0], ys[1], ys[4]), struct.pack("i", int(ol == "cl")),
            struct.pack("i", lite),
            struct.pack("q", src.numel()), _raw(src), struct.pack("q", out.numel()), _raw(out)]
    if bias is None:
        blob += [struct.pack("i", 0), struct.pack("q", 0)]
    else:
        blob += [struct.pack("i", _CODE[bias.dtype]), struct.pack("q", c), _raw(bias)]
    slots = [extras[i] for i in plan.slot_extras]
    blob.append(struct.pack("i", len(slots)))
    for t, planned in zip(slots, plan.slot_strides.tolist()):
        # as the binding: strides of size-1 output dimensions are 0, like_y compares the rest
        full = t.stride() if t.dim() == 5 else planned  # a full-size slot in out's layout
        st = [0 if shape[j] == 1 else v for j, v in enumerate(full)]
        like_y = int(all(shape[j] == 1 or st[j] == ys[j] for j in range(5)))
        n_el = t.untyped_storage().nbytes() // t.element_size()
        blob += [struct.pack("i", _CODE[t.dtype]), struct.pack("i", like_y),
                 struct.pack("5q", *st), struct.pack("q", n_el), _raw(t)]
    blob.append(struct.pack("3i", len(plan.prog_i), *plan.regs))
    for row, f in zip(plan.prog_i.tolist(), _cuda._prog_f(plan, extras).tolist()):
        blob.append(struct.pack("5i2f", *row, *f))
    (workdir / "case.bin").write_bytes(b"".join(blob))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    rc = subprocess.run([str(exe), str(workdir / "case.bin"), str(workdir / "out.bin")],
                        env=env).returncode
    if rc == 3:
        return "not taken"
    assert rc == 0, rc
    raw = np.fromfile(workdir / "out.bin", dtype=_NP[odt])
    got = torch.from_numpy(raw)
    if odt == torch.bfloat16:
        got = got.view(torch.bfloat16)
    got = torch.as_strided(got, shape, ys).double()
    y64 = src.double() + (0 if bias is None else bias.double().view(1, -1, 1, 1, 1))
    want = ops._run_program(y64, program, scalars, [t.double() for t in extras])
    unwritten = int(torch.isnan(got).sum() - torch.isnan(want).sum())
    err = ((got - want).norm() / want.norm()).item()
    tol = 1e-6 if odt == torch.float32 and sdt == torch.float32 else 8e-3
    return name, err, unwritten, err <= tol and unwritten == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-asan", action="store_true")
    opts = ap.parse_args()
    failed = taken = skipped = 0
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        exe = build(workdir, asan=not opts.no_asan)
        seed = 0
        for shape in SHAPES:
            for mode in MODES:
                for prog_id in range(len(_programs(4, (1, 4, 2, 2, 2)))):
                    seed += 7
                    r = run_case(exe, workdir, shape, mode, prog_id, seed % 2 == 0, seed)
                    tag = f"{shape} {mode[0]}->{mode[1]} {mode[2]}->{mode[3]} prog {prog_id}"
                    if r is None or r == "not taken":
                        skipped += 1
                        print(f"skip {tag}: {r or 'dtype pair or layout not reached'}",
                              flush=True)
                        continue
                    name, err, unwritten, ok = r
                    taken += 1
                    failed += not ok
                    worst = max(worst, err)
                    print(f"{'ok  ' if ok else 'FAIL'} {tag} {name}: rel.err {err:.2e} "
                          f"unwritten {unwritten}", flush=True)
    print(f"pass_lite: {taken} run, {failed} failed, {skipped} not taken, worst rel. L2 error "
          f"{worst:.2e}")
    return 1 if failed or not taken else 0


if __name__ == "__main__":
    raise SystemExit(main())
