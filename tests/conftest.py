"""Shared helpers of the pass tests (tests/test_pass_*.py).

The helpers build fresh random inputs (never zeros), find the fused sites in an optimized graph,
count the calls of the fused op while a model runs, and compare an optimized model with its
original: bit-for-bit close in float64, and in float32 no worse than eager PyTorch against a
float64 reference.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import ct3d_fx
from ct3d_fx.fuse import FusedSite

FUSED_OP = torch.ops.ct3d.conv_transpose3d_epilogue.default

# The tensors here are tiny: one intra-op thread is fastest, and it keeps the run time steady when
# other processes share the CPU cores (OpenMP workers then wait on each other in every op).
torch.set_num_threads(1)

# Tests check the fused kernel itself: no per-shape autotune choice of cuDNN + PyTorch ops
# (tests/test_cuda_autotune.py turns it on where it is the subject).
import ct3d_fx._cuda  # noqa: E402

ct3d_fx._cuda.AUTOTUNE = False


@pytest.fixture
def ext():
    """The built extension; a GPU test fails (does not skip) when it cannot be built."""
    from ct3d_fx import _build

    mod = _build.load()
    assert mod is not None, f"the CUDA extension did not build: {_build.why_not()}"
    return mod


@pytest.fixture
def autotune(monkeypatch):
    """The CUDA op's per-shape autotune on (the tests turn it off by default, above), with no
    choice remembered before or after the test."""
    monkeypatch.setattr(ct3d_fx._cuda, "AUTOTUNE", True)
    ct3d_fx._cuda._choices.clear()
    ct3d_fx._cuda._timings.clear()
    yield
    ct3d_fx._cuda._choices.clear()
    ct3d_fx._cuda._timings.clear()


def rig_autotune(monkeypatch, winner: str) -> List[List[str]]:
    """Replaces the autotune's ``_pick_fastest`` with the real one run on a fake timer that
    gives candidate ``winner`` 1 ms and every other 2 ms (each candidate still runs). Returns
    the list that receives the candidate names of each call."""
    timed: List[List[str]] = []
    pick = ct3d_fx._cuda._pick_fastest

    def rigged(cands, reps=7, timer=None):
        names = [name for name, _ in cands]
        timed.append(names)
        calls = []

        def fake(fn):
            fn()
            calls.append(1)
            return 1.0 if names[(len(calls) - 1) % len(names)] == winner else 2.0
        return pick(cands, reps, fake)

    monkeypatch.setattr(ct3d_fx._cuda, "_pick_fastest", rigged)
    return timed


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def randn(*shape, dtype=torch.float64, seed: int = 0, lo: Optional[float] = None,
          hi: Optional[float] = None) -> torch.Tensor:
    """A fresh random tensor: normal, or uniform in [lo, hi) when both are given."""
    g = torch.Generator().manual_seed(seed)
    if lo is not None and hi is not None:
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every floating-point parameter and buffer fresh random, non-trivial values.

    BatchNorm running variances and every other buffer named ``*var*`` stay positive.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=g, dtype=torch.float64)
            if "var" in name.rsplit(".", 1)[-1]:
                t.copy_(r + 0.5)
            else:
                t.copy_(r * 1.6 - 0.8 + 0.1 * torch.sign(r - 0.5))
    return model


def site_nodes(gm: fx.GraphModule) -> List[fx.Node]:
    """The call_module nodes of ``gm`` that run a FusedSite."""
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(mods.get(n.target), FusedSite)]


def anchor_nodes(gm: fx.GraphModule) -> List[fx.Node]:
    """Nodes of ``gm`` that still compute a ConvTranspose3d outside any fused site."""
    from ct3d_fx import patterns
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if patterns.is_anchor(n, mods)]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = str(func.overloadpacket)
        self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable, *args, **kwargs):
    """(result of ``fn(*args)``, {op name: calls}) of the aten/custom ops it dispatched."""
    with _CountOps() as mode:
        out = fn(*args, **kwargs)
    return out, mode.calls


def fused_calls(fn: Callable, *args) -> int:
    """How many times ``fn(*args)`` ran the fused op."""
    _, calls = count_ops(fn, *args)
    return calls.get(str(torch.ops.ct3d.conv_transpose3d_epilogue), 0)


def _flat(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


def _to64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, (list, tuple)):
        return type(x)(_to64(v) for v in x)
    return x


def _call(model, inputs, seed):
    if seed is not None:
        torch.manual_seed(seed)
    return model(*inputs)


def assert_matches(opt: nn.Module, model: nn.Module, inputs: Sequence, *, what: str = "",
                   seed: Optional[int] = None):
    """``opt(*inputs)`` equals ``model(*inputs)``.

    ``seed``: reseed the global RNG before each run (random ops such as training-mode dropout
    then draw the same numbers in both models).

    float64: max |opt - orig| <= 1e-12 * max |orig|. float32 and below: the optimized model's
    max error against a float64 copy of the original is at most twice eager PyTorch's error
    (plus one float32 ulp of the output's scale), and the two outputs agree to 1e-5 relative.
    The float64 copy is a deepcopy made here, in the test, so the models themselves never change.
    """
    with torch.no_grad():
        got = _flat(_call(opt, inputs, seed))
        want = _flat(_call(model, inputs, seed))
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    dtype = want[0].dtype
    if dtype == torch.float64:
        for g, w in zip(got, want):
            assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
            assert g.dtype == w.dtype, f"{what}: dtype {g.dtype}, expected {w.dtype}"
            scale = w.abs().max().item()
            err = (g - w).abs().max().item()
            assert err <= 1e-12 * max(scale, 1.0), \
                f"{what}: float64 max abs error {err:.3g} (output scale {scale:.3g})"
        return
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = _flat(_call(ref64, _to64(tuple(inputs)), seed))
    for g, w, r in zip(got, want, ref):
        assert g.shape == w.shape == r.shape, f"{what}: shapes {g.shape}, {w.shape}, {r.shape}"
        assert g.dtype == w.dtype, f"{what}: dtype {g.dtype}, expected {w.dtype}"
        scale = r.abs().max().item()
        err_opt = (g.double() - r).abs().max().item()
        err_eager = (w.double() - r).abs().max().item()
        ulp = torch.finfo(g.dtype).eps * max(scale, 1.0)
        assert err_opt <= 2 * err_eager + ulp, \
            (f"{what}: {g.dtype} error vs float64 {err_opt:.3g} > 2 x eager's {err_eager:.3g} "
             f"+ {ulp:.3g}")
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * max(scale, 1.0),
                                   msg=lambda m: f"{what}: {m}")


def optimize_checked(model: nn.Module, inputs: Sequence, *, chain: Optional[List[str]] = None,
                     sites: int = 1, config: Optional[ct3d_fx.Config] = None):
    """Optimize ``model`` on ``inputs`` and check the structural promises of the pass.

    Every site of the report is fused, ``sites`` FusedSite calls replace them in the graph, no
    ConvTranspose3d is left outside a site, running the model calls the fused op ``sites``
    times, and (when given) the first site's chain is ``chain``.
    """
    opt = ct3d_fx.optimize(model, tuple(inputs), config=config)
    rep = opt.ct3d_report
    assert [s.status for s in rep.sites] == ["fused"] * sites, str(rep)
    if chain is not None:
        assert rep.sites[0].chain == chain, str(rep)
    assert len(site_nodes(opt)) == sites, opt.code
    assert anchor_nodes(opt) == [], opt.code
    assert fused_calls(opt, *inputs) == sites
    return opt


# The CPU emulator's harnesses (scripts/emulate/*_harness.cpp): built with g++ under
# AddressSanitizer against CUDA's headers (for the half types), run on a stride through their
# case grid (CT3D_EMULATE_EVERY overrides it; 1 runs every case).
EMU_ROOT = Path(__file__).resolve().parent.parent
EMU_CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
#: skipif mark for the emulated tests: they need g++ and CUDA's include folder
needs_emulator = pytest.mark.skipif(
    shutil.which("g++") is None or not (EMU_CUDA_INCLUDE / "cuda_bf16.h").exists(),
    reason="needs g++ and CUDA's include folder")


def run_emulated(tmp_path, harness: str, every: str, timeout: int = 1200,
                 include: Sequence = ()) -> subprocess.CompletedProcess:
    """Builds scripts/emulate/``harness`` into ``tmp_path`` (extra ``include`` folders first)
    and runs it with the stride ``every`` (or CT3D_EMULATE_EVERY); returns the finished run
    (stdout, stderr text). Raises CalledProcessError when g++ fails."""
    exe = tmp_path / harness.replace(".cpp", "")
    subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-fsanitize=address", "-w",
                    f"-I{EMU_CUDA_INCLUDE}", f"-I{EMU_ROOT / 'csrc'}",
                    f"-I{EMU_ROOT / 'scripts/emulate'}", *[f"-I{d}" for d in include],
                    str(EMU_ROOT / "scripts/emulate" / harness), "-o", str(exe), "-lpthread"],
                   check=True)
    return subprocess.run([str(exe), os.environ.get("CT3D_EMULATE_EVERY", every)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))


def emulated_summary(run, name: str, min_cases: int) -> str:
    """Asserts that an emulator run passed: exit 0, its last line "``name``: N cases, 0 failed"
    (layernorm_lines / norm_tail), N >= ``min_cases`` (the stride still ran a real sample).
    Returns its stdout."""
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert summary.startswith(f"{name}:") and " 0 failed" in summary, summary
    assert int(summary.split()[1]) >= min_cases, summary
    return run.stdout
