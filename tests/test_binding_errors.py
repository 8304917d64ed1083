"""The extension's argument checks raise RuntimeError with their message, and do not crash.

On the H200 machine (torch 2.11, CUDA 13) a TORCH_CHECK message that streamed an IntArrayRef
(v20) or an integer (v28, the norm tail's first rejection) killed the process with SIGSEGV
instead of raising; csrc/binding.cpp now builds every message as one string (``ct3d_msg``).
Each case runs in its own Python process, so a crash fails its case instead of the whole test
session, and names the check that crashed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

cuda = pytest.mark.cuda

_ROOT = Path(__file__).resolve().parents[1]

_CASES = {
    # name: (statements run with `ext` and a CUDA float32 tensor `x` of shape (1, 4, 4, 4, 8),
    #        a substring of the message)
    "pool_tail_window": ("ext.pool_tail(x, torch.empty(1, 4, 0, 2, 4, device='cuda'), 9, 2, 2, "
                         "0, 0, False)", "got (9, 2, 2)"),
    "spatial_softmax_cluster": ("ext.spatial_softmax(x, torch.empty_like(x), None, False, 99, 16)",
                                "99"),
    "norm_tail_groups": ("ext.norm_tail(x, torch.empty_like(x), 3, None, None, 1e-5, 0, 0, 0.0)",
                         "got C = 4, groups = 3"),
    "epilogue_pass_registers": (
        "ext.epilogue_pass(x, None, torch.empty_like(x), [], torch.zeros(0, 5, dtype=torch.int64),"
        " torch.zeros(0, 5, dtype=torch.int32), torch.zeros(0, 2), [0, 0])",
        "registers, got 0"),
    "device": ("ext.pool_tail(x.cpu(), x, 2, 2, 2, 0, 0, False)", "must be a CUDA tensor"),
}


@cuda
@pytest.mark.parametrize("name", sorted(_CASES))
def test_rejection_raises_with_its_message(name, ext):
    stmt, expected = _CASES[name]
    code = textwrap.dedent(f"""
        import torch
        from ct3d_fx import _build
        ext = _build.load()
        x = torch.randn(1, 4, 4, 4, 8, device="cuda")
        try:
            {stmt}
        except RuntimeError as e:
            print("RAISED:", str(e).splitlines()[0])
        else:
            print("NO ERROR")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, (f"{name}: the process died (exit {r.returncode}) instead of "
                               f"raising:\n{r.stderr[-2000:]}")
    assert "RAISED:" in r.stdout, f"{name}: no RuntimeError: {r.stdout}"
    assert expected in r.stdout, f"{name}: unexpected message: {r.stdout}"
