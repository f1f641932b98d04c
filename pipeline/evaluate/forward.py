"""What one masked forward pass needs to know, and the `Masking` protocol methods implement."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from torch import Tensor


@dataclass
class ForwardInfo:
    """One batch about to run.

    `ids` [B, T] input tokens (right padded), `valid` [B, T] real tokens, `last` [B] position of each
    row's last input token (a per_sequence mask is derived there). `full` (when the pass covers whole
    sequences) holds each row's complete token list (input + the final target token) and `n_target`
    the number of scored tokens at its end: what an oracle needs to compute the row's true scores."""

    ids: Tensor
    valid: Tensor
    last: Tensor
    full: list[list[int]] | None = None
    n_target: list[int] | None = None


class Masking:
    """A method at one sparsity, bound to a model: `forward(info)` installs the hooks for one batch.

    `reuse_context`: whether a context's KV cache may be shared by its continuations (the mask of a
    position depends only on that position and earlier ones)."""

    reuse_context: bool = True
    description: dict = {}

    def forward(self, info: ForwardInfo) -> AbstractContextManager:  # pragma: no cover - interface
        raise NotImplementedError


class _Dense(Masking):
    reuse_context = True

    def forward(self, info: ForwardInfo) -> AbstractContextManager:
        return nullcontext()


def dense_masking() -> Masking:
    return _Dense()
