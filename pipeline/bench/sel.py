"""Which rows a kernel reads: every row, whole units flagged in a mask, or an index list of kept rows.

- `dense()`: every row.
- `units(mask, group)`: unit u = rows u·group … u·group+group-1 is read iff mask[u] != 0 (heads: group =
  head_dim). Outputs keep the full layout; rows of dropped units are not written.
- `index(idx, count)`: rows idx[0:count] (neurons); outputs are compact (position i holds row idx[i]).
  `count` lives on the device so the grid can stay fixed inside a CUDA graph while the number of kept rows
  varies (the union over a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sel:
    kind: str                             # "dense" | "units" | "index"
    mask: torch.Tensor | None = None      # int32 [n_units]
    group: int = 1
    idx: torch.Tensor | None = None       # int32 [n_rows]
    count: torch.Tensor | None = None     # int32 [1]
    expect: int = 0                       # host-side hint: typical kept rows (tiling only; 0 = unknown)


DENSE = Sel("dense")


def dense() -> Sel:
    return DENSE


def units(mask: torch.Tensor, group: int) -> Sel:
    return Sel("units", mask=mask, group=group)


def index(idx: torch.Tensor, count: torch.Tensor, expect: int = 0) -> Sel:
    return Sel("index", idx=idx, count=count, expect=expect)


def rows_of(sel: Sel, n_rows: int, device) -> torch.Tensor:
    """The physical rows a selection reads, in output order (host sync: CPU/reference use only)."""
    if sel.kind == "dense":
        return torch.arange(n_rows, device=device)
    if sel.kind == "units":
        keep = sel.mask.to(torch.bool).repeat_interleave(sel.group)[:n_rows]
        return torch.nonzero(keep).flatten()
    if sel.kind == "index":
        return sel.idx[: int(sel.count.reshape(-1)[0])].long()
    raise ValueError(f"unknown selection kind {sel.kind!r}")
