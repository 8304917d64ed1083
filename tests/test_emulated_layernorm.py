"""The LayerNorm epilogue routine (csrc/ct3d_epilogue.cuh ``layernorm_lines``) run on the CPU.

scripts/emulate/layernorm_harness.cpp compiles the routine with g++ under
scripts/emulate/emu_shim.h (one host thread per CUDA thread of a 128-thread CTA, warp shuffles
emulated) and checks random tiles against a float64 LayerNorm: every line and column, the rows
and columns it must leave alone, weight and bias in float32 and bfloat16, in place and into
another register, and the poison path for lines longer than its lanes hold. AddressSanitizer
watches every buffer. A stride through the case grid keeps CI short (about 76 of the 4032
cases); ``CT3D_EMULATE_EVERY=1`` runs them all. Needs g++ (C++20) and CUDA's include folder
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


@pytest.mark.skipif(shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists(),
                    reason="needs g++ and CUDA's include folder")
def test_layernorm_lines_against_float64(tmp_path):
    exe = tmp_path / "layernorm_harness"
    subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-fsanitize=address", "-w",
                    f"-I{CUDA_INCLUDE}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'scripts/emulate'}",
                    str(ROOT / "scripts/emulate/layernorm_harness.cpp"), "-o", str(exe),
                    "-lpthread"], check=True)
    every = os.environ.get("CT3D_EMULATE_EVERY", "53")
    run = subprocess.run([str(exe), every], capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert summary.startswith("layernorm_lines:") and " 0 failed" in summary, summary
    assert int(summary.split()[1]) >= 50, summary  # the stride still ran a real sample
