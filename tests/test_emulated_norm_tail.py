"""The normalization tail's kernels (csrc/kernels_norm_tail.cu) run on the CPU.

scripts/emulate/norm_tail_harness.cpp compiles the three kernels (statistics per (row, chunk),
the per-(n, group) merge in double, normalize + affine + activation) with g++ under
scripts/emulate/emu_shim.h (one host thread per CUDA thread, warp shuffles emulated) and checks
every output element against a float64 GroupNorm + activation: float32, bfloat16 and float16;
rows from 1 element to past three chunks, in the 16-byte vector form where the binding takes it
(S % 8 == 0) and in the strided scalar form (every S; the form l2_60's odd rows run); one group,
several, InstanceNorm; with and without affine; every activation the tail takes. Outputs are
NaN-poisoned first, buffers under AddressSanitizer. The file's launch code (CUDA's <<<...>>>) is
cut off first, as scripts/emulate/emulate.py does for the conv kernels. A stride through the
case grid keeps CI short (the two l2_60-sized cases and about 40 others);
``CT3D_EMULATE_EVERY=1`` runs all 2,270. Needs g++ (C++20) and CUDA's include folder
(``CUDA_HOME``, default /usr/local/cuda) for the half types; skips without them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
LAUNCH = "template <typename T>\ncudaError_t launch_typed"


def cut_kernels(workdir: Path, source: Path = ROOT / "csrc" / "kernels_norm_tail.cu") -> None:
    """workdir/norm_tail_emu.cuh: the kernels of ``source`` without their launch code."""
    src = source.read_text()
    assert src.count(LAUNCH) == 1, "kernels_norm_tail.cu's launch code moved: update the cut"
    head = src[:src.index(LAUNCH)]
    (workdir / "norm_tail_emu.cuh").write_text(
        "#pragma once\n" + head + "}  // namespace\n}  // namespace ct3d\n")


def build(workdir: Path) -> Path:
    exe = workdir / "norm_tail_harness"
    subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-fsanitize=address", "-w",
                    f"-I{CUDA_INCLUDE}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'scripts/emulate'}",
                    f"-I{workdir}", str(ROOT / "scripts/emulate/norm_tail_harness.cpp"), "-o",
                    str(exe), "-lpthread"], check=True)
    return exe


@pytest.mark.skipif(shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists(),
                    reason="needs g++ and CUDA's include folder")
def test_norm_tail_kernels_against_float64(tmp_path):
    cut_kernels(tmp_path)
    exe = build(tmp_path)
    every = os.environ.get("CT3D_EMULATE_EVERY", "53")
    run = subprocess.run([str(exe), every], capture_output=True, text=True, timeout=3000,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert summary.startswith("norm_tail:") and " 0 failed" in summary, summary
    assert int(summary.split()[1]) >= 40, summary  # the stride still ran a real sample
    assert "S 123039" in run.stdout, run.stdout[-2000:]  # l2_60's rows ran
