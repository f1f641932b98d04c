"""What one masked forward pass needs to know, and the `Masking` protocol methods implement."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from torch import Tensor

MaskState = dict[str, Tensor | None]
"""Per-sequence keep masks of one batch: pool -> bool [B, L, U] (None = that pool dense)."""


@dataclass
class ForwardInfo:
    """One batch about to run.

    `ids` [B, T] input tokens (right padded), `valid` [B, T] real tokens, `last` [B] position of each
    row's last input token. `feat_pos` [B]: where a per_sequence method reads its features
    (`pipeline.features`: the last context token; never a scored token). `mask_src` (per row): the
    token list and number of scored tokens at its end of the sequence whose *true* scores define the
    row's oracle mask — the example's gold context + continuation, shared by all its candidates, or
    a perplexity window itself. `reuse`: per_sequence masks computed by an earlier pass over these
    rows' shared prefix (already indexed to this batch's rows): the method applies them as they are,
    so that every continuation of a context is scored under the mask its context produced."""

    ids: Tensor
    valid: Tensor
    last: Tensor
    feat_pos: Tensor | None = None
    mask_src: list[tuple[tuple[int, ...], int]] | None = None
    reuse: MaskState | None = None

    def feature_rows(self) -> Tensor:
        return self.last if self.feat_pos is None else self.feat_pos


def reindex(state: MaskState, rows: Tensor) -> MaskState:
    """The masks of `state` for rows `rows` (a prefix's masks repeated for each of its continuations)."""
    return {pool: None if keep is None else keep[rows.to(keep.device)] for pool, keep in state.items()}


class Masking:
    """A method at one sparsity, bound to a model: `forward(info)` installs the hooks for one batch.

    The context manager yields the batch's per-sequence `MaskState` (methods whose masks are fixed or
    per token yield None). `reuse_context`: whether a context's KV cache may be shared by its
    continuations (a position's mask depends only on that position and earlier ones, or is the
    context's per-sequence mask, passed on through `ForwardInfo.reuse`). `missing`: pools it leaves dense
    although their sparsity is set (the record says so, with `missing_note`); `measured_effective`: the
    record's effective unit sparsity is the realised one (`ByteMeter`), not a count's."""

    reuse_context: bool = True
    missing: tuple[str, ...] | list[str] = ()
    missing_note: str = "no scores for this pool: left dense"
    measured_effective: bool = False

    def forward(self, info: ForwardInfo) -> AbstractContextManager:  # pragma: no cover - interface
        raise NotImplementedError


class _Dense(Masking):
    reuse_context = True

    def forward(self, info: ForwardInfo) -> AbstractContextManager:
        return nullcontext(None)


def dense_masking() -> Masking:
    return _Dense()
