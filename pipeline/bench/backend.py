"""Kernel backends: "torch" (reference, any device) or "triton" (CUDA, or CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

from types import ModuleType


def get(name: str) -> ModuleType:
    if name == "torch":
        from . import kernels_ref

        return kernels_ref
    if name == "triton":
        from . import kernels_triton

        return kernels_triton
    raise ValueError(f"unknown kernel backend {name!r} (torch | triton)")
