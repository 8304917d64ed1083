"""The lazy extension build (ct3d_fx/_build.py) and its fallback, on any machine.

A missing toolchain is simulated by replacing the module's probes, so these tests run on the
CPU: they check the single warning, the reason string that the rewrite report shows, and that
the op's CUDA implementation then returns the reference's result instead of failing.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from ct3d_fx import _build, _cuda
from ct3d_fx.ops import INSTR_WIDTH, Opcode


@pytest.fixture(autouse=True)
def fresh_build_state(monkeypatch):
    """Each test starts with no build outcome recorded, and leaves none behind."""
    monkeypatch.delenv("CT3D_FX_DISABLE_CUDA", raising=False)
    _build._reset()
    yield
    _build._reset()


def _simulate_gpu_without(monkeypatch, *, nvcc: bool = True, ninja: bool = True):
    monkeypatch.setattr(_build, "_cuda_device_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.8")
    monkeypatch.setattr(_build, "_find_nvcc", (lambda: "/usr/local/cuda/bin/nvcc") if nvcc
                        else (lambda: None))
    monkeypatch.setattr(_build, "_ninja_available", lambda: ninja)


def _load_three_times():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mods = [_build.load() for _ in range(3)]
    ours = [w for w in caught if "ct3d_fx" in str(w.message)]
    return mods, ours


def _sample_call(seed: int = 0):
    """Arguments of a small fused call: conv + bias, then v1 = v0 + t0 (per channel), relu."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 4, 5, generator=g)
    w = torch.randn(4, 3, 3, 2, 3, generator=g)
    b = torch.randn(3, generator=g)
    t0 = torch.randn(3, 1, 1, 1, generator=g)
    program = [Opcode.LOAD_TENSOR, 0, -1, -1, -1, -1,
               Opcode.ADD, 0, 1, -1, -1, -1,
               Opcode.RELU, 2, -1, -1, -1, -1]
    args = (x, w, b, [2, 1, 2], [1, 0, 1], [1, 0, 0], [1, 1, 1], 1, [int(v) for v in program],
            [], [t0])
    expected = torch.relu(F.conv_transpose3d(x, w, b, [2, 1, 2], [1, 0, 1], [1, 0, 0], 1,
                                             [1, 1, 1]) + t0)
    return args, expected


def test_missing_nvcc_warns_once_and_falls_back(monkeypatch):
    _simulate_gpu_without(monkeypatch, nvcc=False)
    mods, warned = _load_three_times()
    assert mods == [None, None, None]
    assert len(warned) == 1, [str(w.message) for w in warned]
    assert issubclass(warned[0].category, RuntimeWarning)
    reason = _build.why_not()
    assert reason is not None and reason.startswith("nvcc not found"), reason
    assert "nvcc not found" in str(warned[0].message)
    assert not _build.available()
    name = _build.implementation_name("cuda", torch.float32)
    assert name.startswith("reference (CUDA extension unavailable: nvcc not found"), name
    # The op's CUDA implementation must still compute the right result (here on CPU tensors).
    args, expected = _sample_call()
    out = _cuda._cuda_impl(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_missing_ninja_warns_once(monkeypatch):
    _simulate_gpu_without(monkeypatch, ninja=False)
    mods, warned = _load_three_times()
    assert mods == [None, None, None]
    assert len(warned) == 1
    assert _build.why_not().startswith("ninja not found")


def test_failed_build_warns_once_with_the_compiler_message(monkeypatch, tmp_path):
    _simulate_gpu_without(monkeypatch)
    monkeypatch.setattr(_build, "_arch_flags", lambda: ["-gencode=arch=compute_90a,code=sm_90a"])
    calls = []

    def broken_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'ct3d_fx_ext': simulated nvcc error\nmore")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    mods, warned = _load_three_times()
    assert mods == [None, None, None]
    assert len(calls) == 1, "a failed build must not be retried in the same process"
    assert len(warned) == 1
    reason = _build.why_not()
    assert reason.startswith("the build failed: RuntimeError:") and "simulated nvcc error" in reason
    assert "more" not in reason  # only the first line of the compiler output
    # what the build was asked for: every kernel source, the device's arch, csrc/ headers
    kw = calls[0]
    assert kw["name"].startswith("ct3d_fx_ext_")
    assert [p.rsplit("/", 1)[-1] for p in kw["sources"]] == list(_build._SOURCES)
    assert "-gencode=arch=compute_90a,code=sm_90a" in kw["extra_cuda_cflags"]
    args, expected = _sample_call(1)
    torch.testing.assert_close(_cuda._cuda_impl(*args), expected, rtol=1e-5, atol=1e-5)


def _library_built_earlier(monkeypatch, root, content: bytes):
    """A GPU machine (simulated) whose extensions folder ``root`` already holds a file
    ``content`` where _build._build() looks for the built library. Returns (folder, name)."""
    _simulate_gpu_without(monkeypatch)
    monkeypatch.setattr(_build, "_arch_flags", lambda: ["-gencode=arch=compute_90a,code=sm_90a"])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    files = _build._source_files(_build._csrc_dir())
    key = "|".join([torch.__version__, str(torch.version.cuda), sys.version.split()[0],
                    *_build._arch_flags()])
    name = f"ct3d_fx_ext_{_build._digest(files, key)}"
    (root / name).mkdir()
    (root / name / f"{name}.so").write_bytes(content)
    return root / name, name


def test_an_existing_library_is_imported_without_cpp_extension(monkeypatch, tmp_path):
    build_dir, name = _library_built_earlier(monkeypatch, tmp_path, b"built earlier")
    imported, built = [], []
    sentinel = object()
    monkeypatch.setattr(_build, "_import_library",
                        lambda n, path: imported.append((n, path)) or sentinel)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: built.append(kw))
    mods, warned = _load_three_times()
    assert mods == [sentinel] * 3 and warned == []
    assert imported == [(name, build_dir / f"{name}.so")] and built == []


def test_a_damaged_library_or_a_running_build_goes_through_cpp_extension(monkeypatch, tmp_path):
    # not a shared library: the real importer fails
    build_dir, name = _library_built_earlier(monkeypatch, tmp_path, b"not a shared library")
    built = []
    sentinel = object()
    monkeypatch.setattr(torch.utils.cpp_extension, "load",
                        lambda **kw: built.append(kw["name"]) or sentinel)
    mods, warned = _load_three_times()
    assert mods == [sentinel] * 3 and warned == [] and built == [name]
    # a build in progress (cpp_extension's lock file): wait for it through cpp_extension
    _build._reset()
    built.clear()
    (build_dir / "lock").write_text("")
    monkeypatch.setattr(_build, "_import_library", lambda n, path: pytest.fail("imported"))
    assert _build.load() is sentinel and built == [name]


def test_disable_env_falls_back_silently(monkeypatch):
    _simulate_gpu_without(monkeypatch)
    monkeypatch.setenv("CT3D_FX_DISABLE_CUDA", "1")
    mods, warned = _load_three_times()
    assert mods == [None, None, None]
    assert warned == []
    assert "CT3D_FX_DISABLE_CUDA" in _build.why_not()


def test_no_cuda_device_is_not_a_warning(monkeypatch):
    monkeypatch.setattr(_build, "_cuda_device_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.8")
    mods, warned = _load_three_times()
    assert mods == [None, None, None] and warned == []
    assert _build.why_not() == "no CUDA device is visible"


def test_implementation_names_without_a_build():
    assert _build.implementation_name("cpu", torch.float32).startswith("reference (PyTorch ops")
    assert "float64" in _build.implementation_name("cuda", torch.float64)


def test_sources_are_found_and_hashed(tmp_path):
    csrc = _build._csrc_dir()
    files = _build._source_files(csrc)
    names = {f.name for f in files}
    assert set(_build._SOURCES) <= names
    # every kernel translation unit in csrc/ is compiled (a new one cannot be forgotten)
    assert {n for n in names if n.startswith("kernels_") and n.endswith(".cu")} <= set(
        _build._SOURCES)
    assert {"ct3d_conv.cuh", "ct3d_epilogue.cuh", "ct3d_params.h"} <= names
    # the name changes with any source's content, and with the toolchain key
    for f in files:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    copied = _build._source_files(tmp_path)
    d0 = _build._digest(copied, "k")
    assert _build._digest(copied, "k") == d0 and len(d0) == 12
    assert _build._digest(copied, "other") != d0
    (tmp_path / "ct3d_conv.cuh").write_text((tmp_path / "ct3d_conv.cuh").read_text() + "\n// x\n")
    assert _build._digest(_build._source_files(tmp_path), "k") != d0


def test_kernel_headers_include_no_torch():
    for f in _build._source_files(_build._csrc_dir()):
        if f.name == "binding.cpp":
            continue
        text = f.read_text()
        assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, f.name


def test_opcodes_and_limits_agree_with_the_kernel():
    """csrc/ct3d_params.h restates Opcode and the program limits; they must not drift."""
    import re
    text = (_build._csrc_dir() / "ct3d_params.h").read_text()
    found = {m.group(1): int(m.group(2)) for m in re.finditer(r"OP_(\w+) = (\d+)", text)}
    assert found == {op.name: int(op) for op in Opcode}
    assert int(re.search(r"kMaxInstr = (\d+)", text).group(1)) == _cuda.MAX_INSTR
    assert int(re.search(r"kMaxSlots = (\d+)", text).group(1)) == _cuda.MAX_SLOTS
    assert (int(re.search(r"kMaxSoftmaxChannels = (\d+)", text).group(1))
            == _cuda.SOFTMAX_MAX_CHANNELS)
    assert INSTR_WIDTH == 6


def test_layernorm_lines_hold_the_longest_w_line():
    """layernorm_lines keeps a W line in kLnPerLane registers per lane: it must hold the
    longest line the host sends (WLINE_MAX_ROWS rows of each of the 2 W-stride phases)."""
    import re
    text = (_build._csrc_dir() / "ct3d_epilogue.cuh").read_text()
    per_lane = int(re.search(r"constexpr int kLnPerLane = (\d+);", text).group(1))
    assert 16 * per_lane >= 2 * _cuda.WLINE_MAX_ROWS  # 16 lanes per line (W > 64)
