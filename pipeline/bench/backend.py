"""Kernel backends: "torch" (reference, any device) or "triton" (CUDA, or CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
from types import ModuleType


def _interpreter_numpy2_fix() -> None:
    """Triton 3.6's interpreter converts a loop bound with `int(array)`, which numpy 2 refuses for a 1-element
    array of rank 1 (the one-line fix docs/benchmark.md names). Patched here, in the process only, when the
    interpreter is on: `tensor.__index__` reads the single element instead."""
    import triton.runtime.interpreter as ti

    if getattr(ti, "_shadowllm_index_fix", False):
        return
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    ti._shadowllm_index_fix = True


def get(name: str) -> ModuleType:
    if name == "torch":
        from . import kernels_ref

        return kernels_ref
    if name == "triton":
        if os.environ.get("TRITON_INTERPRET") == "1":
            _interpreter_numpy2_fix()
        from . import kernels_triton

        return kernels_triton
    raise ValueError(f"unknown kernel backend {name!r} (torch | triton)")
