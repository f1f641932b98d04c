"""Tile choices of the Triton kernels as one immutable value, and the launch tilings they imply.

A `Tiles` holds one tile per kernel role (a read-only mapping of block sizes and warps) plus the programmatic
dependent launch switch. The engine and every launcher take it explicitly; the sweeps (`microbench`) return a new
one instead of writing a global. `DEFAULT_TILES` are the H200 sweep picks (results/benchmark/h200.json,
micro.config). Nothing here imports triton, so the tilings are checkable on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from dataclasses import replace as _replace
from types import MappingProxyType
from typing import Any

Tile = Mapping[str, int]


def _frozen(tile: Mapping[str, int]) -> Tile:
    return MappingProxyType(dict(tile))


@dataclass(frozen=True, eq=True)
class Tiles:
    """One tile per role; `as_dict()` is the layout recorded in the results (`micro.config`)."""

    row: Tile  # batch 1, gate/up or fc1
    qkv: Tile  # batch 1, per-role row tiles
    head: Tile  # LM head
    pred: Tile  # predictor layers
    o: Tile
    row_dot: Tile  # batch 2..16 (tensor cores, M padded to 16)
    col: Tile  # batch 1, index lists (down/fc2); TP: programs streaming at once
    col_units: Tile  # batch 1, head units (o in column form: comparison)
    col_dot: Tile
    thr_col: Tile  # batch 1, thresholded input-sparse GEMV (teal, wina, cats' down): its own sweep
    thr_col_dot: Tile  # batch 2..16, the same kernel with tl.dot
    attn: Tile  # split-T: ceil(T / (BT·NT)) programs per head
    pdl: bool  # programmatic dependent launch (sm_90+)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "pdl":
                object.__setattr__(self, f.name, _frozen(getattr(self, f.name)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tiles:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v) for f in fields(self)}

    def role(self, name: str) -> Tile:
        if name == "pdl" or name not in {f.name for f in fields(self)}:
            raise KeyError(f"unknown tile role {name!r}")
        return getattr(self, name)

    def replace(self, role: str, tile: Mapping[str, int]) -> Tiles:
        """A copy with `role`'s tile replaced."""
        self.role(role)
        return _replace(self, **{role: tile})


DEFAULT_TILES = Tiles(
    row={"BN": 2, "BK": 512, "warps": 4},
    qkv={"BN": 2, "BK": 1024, "warps": 4},
    head={"BN": 4, "BK": 512, "warps": 4},
    pred={"BN": 4, "BK": 512, "warps": 4},
    o={"BN": 4, "BK": 512, "warps": 4},
    row_dot={"BN": 32, "BK": 256, "warps": 4},
    col={"BN": 512, "BK": 8, "KPP": 256, "warps": 4, "TP": 1536},
    col_units={"BN": 512, "BK": 8, "KPP": 32, "warps": 4},
    col_dot={"BN": 128, "BK": 64, "KPP": 256, "warps": 4},
    thr_col={"BN": 128, "BK": 32, "KPP": 256, "warps": 4},
    thr_col_dot={"BN": 128, "BK": 64, "KPP": 256, "warps": 4},
    attn={"BT": 32, "NT": 1, "warps": 2},
    pdl=True,
)


# ---- launch tilings (pure arithmetic; kernels_triton launches with them) ---------------------------------------


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class RowTiling:
    BN: int
    BK: int
    warps: int


def row_tiling(
    tiles: Tiles, tile: str, *, batch: int, k: int, sel_kind: str, sel_group: int, ksel_group: int | None
) -> RowTiling:
    """Block sizes of one row gather-GEMV launch: the role's tile at batch 1, `row_dot` above."""
    cfg = tiles.role(tile) if batch == 1 else tiles.row_dot
    bn = cfg["BN"] if batch == 1 else max(cfg["BN"], 16)
    bk = cfg["BK"]
    if batch == 1 and k < bk and sel_kind != "units":  # short rows (predictor output layers): more rows per program
        bk = max(16, _pow2(k))
        bn *= 2 * (cfg["BK"] // bk)
    if sel_kind == "units":
        bn = min(bn, sel_group)
        assert sel_group % bn == 0 and (batch == 1 or bn >= 16), "unit size must be a multiple of the row tile"
    if ksel_group is not None:
        bk = max(bk, ksel_group)
        assert bk % ksel_group == 0, "the K tile must hold whole units"
    return RowTiling(bn, bk, cfg["warps"])


@dataclass(frozen=True)
class ColTiling:
    BN: int
    BK: int
    KPP: int
    warps: int


def col_tiling(tiles: Tiles, *, batch: int, n: int, sel_kind: str, sel_group: int, sel_expect: int) -> ColTiling:
    """Block sizes of one column gather-GEMV launch (`col`, `col_units` at batch 1, `col_dot` above)."""
    cfg = tiles.col_dot if batch > 1 else tiles.col_units if sel_kind == "units" else tiles.col
    kpp = cfg["KPP"]
    if sel_kind == "units":
        kpp = min(kpp, sel_group)
        assert sel_group % kpp == 0
    elif sel_kind == "index" and sel_expect and batch == 1:
        # fewer kept rows -> shorter row chunks, so that about TP programs stream at once
        want = sel_expect * _cdiv(n, cfg["BN"]) / cfg.get("TP", 768)
        kpp = max(min(kpp, 32), min(kpp, _pow2(max(1, int(want)))))
    return ColTiling(cfg["BN"], min(cfg["BK"], kpp), kpp, cfg["warps"])


@dataclass(frozen=True)
class AttnTiling:
    BT: int
    NT: int
    splits: int
    warps: int


def attn_tiling(tiles: Tiles, max_len: int) -> AttnTiling:
    """Split-T attention: `splits` programs per (sequence, head), each over BT·NT cache positions."""
    cfg = tiles.attn
    nt = cfg.get("NT", 1)
    return AttnTiling(cfg["BT"], nt, _cdiv(max_len, cfg["BT"] * nt), cfg["warps"])


def thr_col_tiling(tiles: Tiles, *, batch: int, n: int, segs: tuple[int, ...] = ()) -> ColTiling:
    """Block sizes of one thresholded column GEMV (`thr_col` at batch 1, `thr_col_dot` above): BN also divides
    every output segment (a program's columns share one segment's criterion) and is at least 16 for `tl.dot`."""
    cfg = tiles.thr_col_dot if batch > 1 else tiles.thr_col
    bn = cfg["BN"]
    for width in [b - a for a, b in zip((0, *segs), (*segs, n))] if segs else []:
        while width % bn:
            bn //= 2
    if batch > 1:
        assert bn >= 16, "segments must be multiples of 16 columns at batch > 1"
    kpp = cfg["KPP"]
    bk = min(cfg["BK"], kpp)
    if batch > 1:
        bk = max(bk, 16)
        kpp = max(kpp, bk)
    return ColTiling(bn, bk, kpp, cfg["warps"])
