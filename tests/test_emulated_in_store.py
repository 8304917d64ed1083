"""The epilogue program at the store (csrc/ct3d_conv.cuh ``store_tile_program``,
``Epilogue::in_store``) run on the CPU, no GPU needed.

scripts/emulate/emulate.py compiles the exact-FP32 GEMM and the direct kernel of
csrc/ct3d_conv.cuh with g++ and runs them CTA by CTA (one host thread per CUDA thread). Here each
of a few sweep configurations (tests/test_cuda_kernel.py ``make_case``, NaN-poisoned outputs) runs
twice, with the program allowed at the store and without, and the two output storages must be
equal bit for bit, every element written, within 1e-5 of float64. The harness decides the flag
with the C++ ``registers_program_ok``; the tests' Python mirror of it (used by the GPU test
``test_epilogue_in_store_bitwise`` to check where the kernels run the program at the store) must
agree on every case. The GPU tests cover the tensor-core kernels. Needs g++ (C++20) and CUDA's
include folder (``CUDA_HOME``, default /usr/local/cuda); skips without them.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists(),
    reason="needs g++ and CUDA's include folder")

# Sweep seeds whose programs the store can run and some it cannot (checked below: both kinds).
SEEDS = range(0, 8)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("ct3d_emulate",
                                                  ROOT / "scripts" / "emulate" / "emulate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    work = tmp_path_factory.mktemp("emulate_in_store")
    return mod, work, mod.build(work, asan=False)


@pytest.mark.parametrize("kernel", ["gemm", "direct"])
def test_program_at_store_is_bitwise_the_tile_program(kernel, emu):
    mod, work, exe = emu
    T, cuda = mod.T, mod._cuda
    ran, not_ran = 0, 0
    for seed in SEEDS:
        case = T.make_case(seed)
        case.precision = "fp32"
        if kernel == "direct":
            case = T._cap_w_stride(case)
        if case.N * case.cout_g * case.groups * math.prod(case.out_spatial()) > 300000:
            continue  # CPU time
        res = mod.run_case(exe, work, case, kernel, False, in_store=True)
        prog = T.ops.describe_program(*T.build_args(case, "cpu")[8:10])
        assert res["bitwise_tile"], f"{case}: differs from the tile program; {prog}"
        assert res["unwritten"] == 0 and res["err"] <= 1e-5, (case, res, prog)
        plan = cuda._make_plan(*T.build_args(case, "cpu"))
        assert res["in_store"] == T.registers_program_ok(plan), (
            f"{case}: the C++ rule says {res['in_store']}, the tests' mirror "
            f"{T.registers_program_ok(plan)}; {prog}")
        ran += res["in_store"]
        not_ran += not res["in_store"]
    assert ran >= 2 and not_ran >= 1, (ran, not_ran)
