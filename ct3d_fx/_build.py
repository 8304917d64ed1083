"""Lazy, cached build of the CUDA extension in csrc/ (placeholder until the kernel lands)."""
from __future__ import annotations

from typing import Optional


def available() -> bool:
    """True when the fused CUDA kernel can run in this process."""
    return load() is not None


def why_not() -> Optional[str]:
    """Why the CUDA kernel cannot run (None when it can)."""
    return "the CUDA kernel is not built yet"


def load():
    """The built extension module, or None when it cannot be built."""
    return None
