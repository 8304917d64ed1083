"""Lazy, cached JIT build of the fused CUDA kernel in csrc/ (``torch.utils.cpp_extension.load``).

The extension is compiled at its first use in a process that has a CUDA device, for that
device's architecture only (``-gencode`` sm_90a on Hopper, sm_80 on A100, ...). Its name
carries a hash of the sources, PyTorch, CUDA and the architecture, so a changed kernel rebuilds
and an unchanged one is imported from the torch extensions directory (``$TORCH_EXTENSIONS_DIR``
or ``~/.cache/torch_extensions``) in well under a second, without running ninja (so a copied
cache directory is not rebuilt because its files' modification times changed); cpp_extension's
file lock there makes concurrent builds from several processes safe.

Never raises for a missing toolchain: when CUDA, nvcc or ninja is missing or the build fails,
:func:`load` warns once (``RuntimeWarning``) with the cause and returns None from then on, and
the op runs its PyTorch reference. ``CT3D_FX_DISABLE_CUDA=1`` forces that fallback silently.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["load", "available", "why_not", "implementation_name"]

_DISABLE_ENV = "CT3D_FX_DISABLE_CUDA"
_SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
# Compiled by the extension (headers are hashed too, not listed as sources). One translation
# unit per precision for the strided-input GEMM and the direct kernel, and one per precision and
# configuration family of the channels-last GEMM (csrc/ct3d_launch.h): ninja compiles them in
# parallel, and the longest one (a family, not a whole precision) sets the first-use build time.
_IGEMM_FAMILIES = ("rows", "rows_wide", "box", "wline", "wgmma")
_SOURCES = ("binding.cpp", "kernels_f32_ffma.cu", "kernels_spatial_softmax.cu",
            "kernels_pool_tail.cu", "kernels_epilogue_pass.cu", "kernels_norm_tail.cu") + tuple(
    f"kernels_{dt}{part}.cu" for dt in ("f32_tf32", "f16_tc", "bf16_tc")
    for part in ("", *(f"_{f}" for f in _IGEMM_FAMILIES)))

_lock = threading.Lock()
_state = {"tried": False, "module": None, "reason": None}


def _reset() -> None:
    """Forget the outcome of an earlier :func:`load` (tests use this)."""
    with _lock:
        _state.update(tried=False, module=None, reason=None)


# --- probes (module-level so tests can simulate a missing toolchain) -------------------------

def _cuda_device_available() -> bool:
    return torch.cuda.is_available()


def _find_nvcc() -> Optional[str]:
    """Path of nvcc in the CUDA toolkit PyTorch's extension builder would use, or None."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if not home:
        return None
    nvcc = Path(home) / "bin" / "nvcc"
    return str(nvcc) if nvcc.exists() else None


def _ninja_available() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


def _csrc_dir() -> Path:
    """The csrc/ folder: the package ``ct3d_fx.csrc`` when installed, else ../csrc."""
    try:
        spec = importlib.util.find_spec("ct3d_fx.csrc")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "binding.cpp").exists():
                return Path(loc)
    return Path(__file__).resolve().parents[1] / "csrc"


def _source_files(csrc: Path) -> List[Path]:
    return sorted(p for p in csrc.iterdir() if p.suffix in _SOURCE_SUFFIXES and p.is_file())


def _digest(files: List[Path], extra: str) -> str:
    """Hash of the files' names and contents plus ``extra``: 12 hex digits."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _arch_flags() -> List[str]:
    """``-gencode`` flags for every visible device's architecture (sm_90a on Hopper)."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    flags = []
    for major, minor in caps:
        arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _probe() -> "tuple[Optional[str], bool]":
    """(reason the kernel cannot be built or None, whether that reason deserves a warning)."""
    if os.environ.get(_DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return f"disabled by {_DISABLE_ENV}=1", False
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support", False
    if not _cuda_device_available():
        return "no CUDA device is visible", False
    if _find_nvcc() is None:
        return (f"nvcc not found (install the CUDA {torch.version.cuda} toolkit or set "
                f"CUDA_HOME)"), True
    if not _ninja_available():
        return "ninja not found (pip install ninja)", True
    return None, False


def _first_error(message: str) -> str:
    """The first compiler/linker error line of a build log (else its first line), shortened."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    for ln in lines[1:]:
        low = ln.lower()
        if ("error" in low or "multiple definition" in low or "undefined" in low) \
                and not low.startswith(("ninja:", "failed:")):
            return ln[:300]
    return lines[0][:300] if lines else ""


def _import_library(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build():
    from torch.utils import cpp_extension

    csrc = _csrc_dir()
    files = _source_files(csrc)
    missing = [s for s in _SOURCES if not (csrc / s).exists()]
    if missing:
        raise FileNotFoundError(f"kernel sources missing from {csrc}: {missing}")
    arch = _arch_flags()
    key = "|".join([torch.__version__, str(torch.version.cuda), sys.version.split()[0], *arch])
    name = f"ct3d_fx_ext_{_digest(files, key)}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build_dir = Path(root) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    so = build_dir / f"{name}.so"
    if so.exists() and not (build_dir / "lock").exists():
        # Built before (the name is the sources' and toolchain's hash) and no build running:
        # import it without cpp_extension's ninja pass, which rebuilds when the sources' mtimes
        # are newer than the objects (a fresh checkout, a copied cache) although nothing changed.
        try:
            return _import_library(name, so)
        except (ImportError, OSError):
            pass  # a damaged or incompatible library: let cpp_extension rebuild it
    if not so.exists():
        arch_names = ", ".join(f.split("code=")[1] for f in arch)
        print(f"ct3d_fx: compiling the fused CUDA kernel for {arch_names} (first use only, "
              f"about 1 minute; cached in {build_dir})", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=name,
        sources=[str(csrc / s) for s in _SOURCES],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", "-lineinfo", *arch],
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        verbose=False,
    )


def load():
    """The compiled extension module, or None when it cannot be built in this process.

    Builds at the first call (see the module docstring); later calls return the cached
    outcome at once. Thread-safe.

    Returns:
        The extension module (``launch``, ``MAX_INSTR``, ``MAX_SLOTS``) or None.

    Raises:
        Nothing for a missing toolchain or a failed build: it warns once (RuntimeWarning)
        and returns None; :func:`why_not` gives the cause.
    """
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        reason, warn = _probe()
        module = None
        if reason is None:
            t0 = time.perf_counter()
            try:
                module = _build()
            except Exception as e:  # a broken toolchain must not crash the user's model
                reason = f"the build failed: {type(e).__name__}: {_first_error(str(e))}"
                warn = True
            else:
                _state["build_seconds"] = time.perf_counter() - t0
        if warn:
            warnings.warn(f"ct3d_fx: the fused CUDA kernel is unavailable ({reason}); the "
                          f"PyTorch reference runs instead (correct, not fused).",
                          RuntimeWarning, stacklevel=2)
        _state.update(tried=True, module=module, reason=reason)
        return module


def available() -> bool:
    """True when the fused CUDA kernel can run in this process (builds it if needed)."""
    return load() is not None


def why_not() -> Optional[str]:
    """Why the fused CUDA kernel cannot run, e.g. ``"nvcc not found (...)"``; None when it can."""
    load()
    return _state["reason"]


def implementation_name(device, dtype: torch.dtype) -> str:
    """What runs the fused op for tensors of ``dtype`` on ``device``, in words.

    Args:
        device: a ``torch.device`` or device string.
        dtype: the input's floating dtype.

    Returns:
        e.g. ``"fused CUDA kernel (TF32 tensor cores, ...)"`` or
        ``"reference (CUDA extension unavailable: nvcc not found ...)"``. For float32 the
        answer follows ``torch.backends.cudnn.allow_tf32`` at the time of the call.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"reference (PyTorch ops on {device.type}, not fused)"
    if dtype == torch.float64:
        return "reference (float64 is not covered by the CUDA kernel)"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"reference ({dtype} is not covered by the CUDA kernel)"
    if load() is None:
        return f"reference (CUDA extension unavailable: {why_not()})"
    # Shapes with few input channels per group run the direct kernel (exact FP32 FFMA) in
    # every precision (ct3d_fx/_cuda.py); the name says so.
    direct = "; exact FP32 FFMA where C_in/groups is small"
    if dtype == torch.float32:
        if torch.backends.cudnn.allow_tf32:
            return f"fused CUDA kernel (TF32 tensor cores, FP32 accumulation{direct})"
        return "fused CUDA kernel (exact FP32, FFMA)"
    name = "FP16" if dtype == torch.float16 else "BF16"
    return f"fused CUDA kernel ({name} tensor cores, FP32 accumulation{direct})"
