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

from conftest import emulated_summary, needs_emulator, run_emulated


@needs_emulator
def test_layernorm_lines_against_float64(tmp_path):
    run = run_emulated(tmp_path, "layernorm_harness.cpp", "53")
    emulated_summary(run, "layernorm_lines", 50)  # >= 50: the stride still ran a real sample
