"""The channels-last GEMM's configuration dispatch (csrc/ct3d_launch.h ``launch_igemm_any``) on
the CPU: scripts/emulate/igemm_dispatch_harness.cpp runs it with g++ against recording stand-ins
for the configuration families, and every (id, wgmma fits, box fits) case must call the
families the id table of csrc/ct3d_igemm.cuh and ct3d_wgmma.cuh names, with the same fallbacks
(wgmma -> box of the same K step and BN -> row tile), and every id that ct3d_fx/_cuda.py can
choose must reach a family. Needs g++ and CUDA's include folder; skips without them."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ct3d_fx import _cuda

ROOT = Path(__file__).resolve().parent.parent
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
INVALID = 1  # cudaErrorInvalidValue

# the tables as the kernel headers state them
WGMMA_FALLBACK = {19: 13, 20: 16, 21: 11, 22: 13, 23: 11, 24: 16}
WGMMA_BULK = (27, 28)  # blocked weight: no fallback, *wgmma -1 when it cannot run
BOX_FALLBACK = {11: 0, 12: 4, 13: 3, 14: 0, 15: 5, 16: 8, 17: 1}


def _family(config):
    if 0 <= config <= 5:
        return "rows"
    if 6 <= config <= 10 or config == 18:
        return "rows_wide"
    if config in (25, 26):
        return "wline"
    return None


def _expected(config, wgmma_fits, box_fits):
    """(calls, status, wgmma) as the dispatch before the split into families behaved."""
    calls = []
    if config in WGMMA_BULK:
        return [f"wgmma:{config}"], 0, 2 if wgmma_fits else -1
    if config in WGMMA_FALLBACK:
        calls.append(f"wgmma:{config}")
        if wgmma_fits:
            return calls, 0, 1
        config = WGMMA_FALLBACK[config]
    if config in BOX_FALLBACK:
        calls.append(f"box:{config}")
        if box_fits:
            return calls, 0, 0
        config = BOX_FALLBACK[config]
    family = _family(config)
    if family is None:
        return calls, INVALID, 0
    calls.append(f"{family}:{config}")
    return calls, 0, 0


@pytest.fixture(scope="module")
def dispatch_lines(tmp_path_factory):
    if shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_runtime_api.h").exists():
        pytest.skip("needs g++ and CUDA's include folder")
    exe = tmp_path_factory.mktemp("dispatch") / "igemm_dispatch"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", f"-I{CUDA_INCLUDE}",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "scripts/emulate/igemm_dispatch_harness.cpp"),
                    "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout
    lines = {}
    for line in out.splitlines():
        head, calls, tail = line.split("|")
        config, wf, bf = map(int, head.split())
        status, wgmma = map(int, tail.split())
        lines[(config, wf, bf)] = (calls.split(), status, wgmma)
    return lines


def test_every_case_calls_the_families_of_the_id_tables(dispatch_lines):
    assert len(dispatch_lines) == 34 * 4  # ids -1..32, both fits flags
    wrong = {k: (v, _expected(*k)) for k, v in dispatch_lines.items()
             if v != _expected(k[0], bool(k[1]), bool(k[2]))}
    assert not wrong, wrong


def test_every_python_configuration_reaches_a_kernel(dispatch_lines):
    for config in _cuda.IGEMM_CONFIGS:
        for wf in (0, 1):
            for bf in (0, 1):
                calls, status, _ = dispatch_lines[(config, wf, bf)]
                assert status == 0 and calls, (config, wf, bf, calls)


def _cases(text, function):
    """The ids of ``case N:`` inside the body of the template ``function``."""
    start = text.index(f"cudaError_t {function}(")
    body = text[start:text.index("\n}\n", start)]
    return body, [int(c) for c in re.findall(r"case (\d+):", body)]


def test_the_stand_ins_follow_the_kernel_headers():
    """The families' id ranges and the wgmma fallbacks that the stand-ins and _expected assume
    are the ones the kernel headers define."""
    igemm = (ROOT / "csrc/ct3d_igemm.cuh").read_text()
    wgmma = (ROOT / "csrc/ct3d_wgmma.cuh").read_text()
    for function in ("igemm_rows", "igemm_rows_wide", "igemm_boxes", "igemm_wlines"):
        _, ids = _cases(igemm, function)
        want = {"igemm_boxes": sorted(BOX_FALLBACK)}.get(
            function, [c for c in range(27) if _family(c) == function[6:].replace("lines", "line")])
        assert ids == want, (function, ids)
    body, ids = _cases(wgmma, "igemm_wgmmas")
    assert ids == sorted(WGMMA_FALLBACK) + list(WGMMA_BULK)
    fallbacks = [int(f) for f in re.findall(r"\*fallback = (\d+);", body)]
    assert dict(zip(ids, fallbacks)) == WGMMA_FALLBACK
    assert tuple(_cuda.IGEMM_WGMMA_BULK_CONFIGS) == WGMMA_BULK
