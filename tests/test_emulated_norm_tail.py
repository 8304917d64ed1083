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

from pathlib import Path

from conftest import emulated_summary, needs_emulator, run_emulated

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = "template <typename T>\ncudaError_t launch_typed"


def cut_kernels(workdir: Path, source: Path = ROOT / "csrc" / "kernels_norm_tail.cu") -> None:
    """workdir/norm_tail_emu.cuh: the kernels of ``source`` without their launch code."""
    src = source.read_text()
    assert src.count(LAUNCH) == 1, "kernels_norm_tail.cu's launch code moved: update the cut"
    head = src[:src.index(LAUNCH)]
    (workdir / "norm_tail_emu.cuh").write_text(
        "#pragma once\n" + head + "}  // namespace\n}  // namespace ct3d\n")


@needs_emulator
def test_norm_tail_kernels_against_float64(tmp_path):
    cut_kernels(tmp_path)
    run = run_emulated(tmp_path, "norm_tail_harness.cpp", "53", timeout=3000, include=[tmp_path])
    out = emulated_summary(run, "norm_tail", 40)  # >= 40: the stride still ran a real sample
    assert "S 123039" in out, out[-2000:]  # l2_60's rows ran
