"""Which rows a kernel reads: every row, whole units flagged in a mask, or an index list of kept rows.

- `DENSE`: every row.
- `units(mask, group)`: unit u = rows u·group … u·group+group-1 is read iff mask[u] != 0 (heads: group =
  head_dim). Outputs keep the full layout; rows of dropped units are not written.
- `index(idx, count)`: rows idx[0:count] (neurons); outputs are compact (position i holds row idx[i]).
- `unit_index(idx, count, group)`: the units idx[0:count] (ascending), i.e. rows u·group … u·group+group-1 of each;
  used to gather the kept heads' input columns of the o-projection (`ksel`).
  `count` lives on the device so the grid can stay fixed inside a CUDA graph while the number of kept rows
  varies (the union over a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sel:
    kind: str  # "dense" | "units" | "index" | "unit_index"
    mask: torch.Tensor | None = None  # int32 [n_units]
    group: int = 1
    idx: torch.Tensor | None = None  # int32 [n_rows]
    count: torch.Tensor | None = None  # int32 [1]
    expect: int = 0  # host-side hint: typical kept rows (tiling only; 0 = unknown)
    bound: int = 0  # host-side: count never exceeds this (grid size; 0 = all rows)


DENSE = Sel("dense")


def units(mask: torch.Tensor, group: int) -> Sel:
    return Sel("units", mask=mask, group=group)


def index(idx: torch.Tensor, count: torch.Tensor, expect: int = 0, bound: int = 0) -> Sel:
    return Sel("index", idx=idx, count=count, expect=expect, bound=bound)


def unit_index(idx: torch.Tensor, count: torch.Tensor, group: int) -> Sel:
    return Sel("unit_index", idx=idx, count=count, group=group)


def rows_of(sel: Sel, n_rows: int, device) -> torch.Tensor:
    """The physical rows a selection reads, in output order (host sync: CPU/reference use only)."""
    if sel.kind == "dense":
        return torch.arange(n_rows, device=device)
    if sel.kind == "units":
        keep = sel.mask.to(torch.bool).repeat_interleave(sel.group)[:n_rows]
        return torch.nonzero(keep).flatten()
    if sel.kind == "index":
        return sel.idx[: int(sel.count.reshape(-1)[0])].long()
    if sel.kind == "unit_index":
        u = sel.idx[: int(sel.count.reshape(-1)[0])].long()
        return (u[:, None] * sel.group + torch.arange(sel.group, device=u.device)[None, :]).flatten()
    raise ValueError(f"unknown selection kind {sel.kind!r}")
