"""Units kept and removed at a sparsity (SPEC §5): the one definition that masks, ranking metrics and the
decode benchmark all use.

A layer of n units at sparsity s in [0, 1) loses `n_removed(n, s)` = floor(s·n + 1/2) units (s·n rounded,
halves up), but never all of them: at most n − 1. Every scope removes the same total from a pool of
L_p prunable layers, L_p · n_removed(U, s):

- `local`  removes n_removed(U, s) from each prunable layer;
- `global` removes that total ranked across the layers, each layer keeping at least `layer_floor` = 1 unit;
- `hybrid` likewise, each layer keeping at least ceil(min_keep · U) (and at least 1). Where that floor
  leaves fewer units removable than asked, the total is capped at L_p · (U − floor): `removed_total`.

Why one rule: before it, three formulas disagreed (Python's banker's `round` on s·n, on (1 − s)·n, and on
s·(L_p·U)), so 9 heads at s = 0.5 kept 4 in the training recall and 5 in the masks, and local / global masks
of SmolLM2 heads at 0.5 removed 116 vs 130 units (effective 0.430 vs 0.481). Sparsities are read as the
decimal they print as (0.7 · 45 = 31.5 rounds up to 32, as written, not down as the float product
31.499999999999996 would).

Pure Python on purpose: the benchmark imports it without numpy / scipy / torch.
"""

from __future__ import annotations

import math
from fractions import Fraction

POOLS = ("heads", "neurons")  # the unit pools: attention heads, FFN neurons
SCOPES = ("local", "global", "hybrid")  # where a mask ranks units: per layer, across layers, across with a floor


def sparsity_key(s: float) -> str:
    """A sparsity as it appears in metric names: whole percents in two digits (0 -> "s00", 0.05 -> "s05",
    0.5 -> "s50"), others as printed (0.125 -> "s12.5")."""
    pct = round(100 * float(s), 6)
    return f"s{int(pct):02d}" if pct == int(pct) else f"s{pct:g}"


def _decimal(x: float) -> Fraction:
    """x exactly as the decimal it prints as (0.3 -> 3/10), so s·n is not off by a float ulp at a half."""
    return Fraction(repr(float(x)))


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return s


def _check_units(n_units: int) -> int:
    if int(n_units) != n_units or n_units < 1:
        raise ValueError(f"a layer needs at least one unit, got {n_units}")
    return int(n_units)


def n_removed(n_units: int, sparsity: float) -> int:
    """Units removed from one layer of `n_units` at `sparsity`: floor(s·n + 1/2), at most n − 1."""
    n = _check_units(n_units)
    s = check_sparsity(sparsity)
    return min(n - 1, math.floor(_decimal(s) * n + Fraction(1, 2)))


def n_kept(n_units: int, sparsity: float) -> int:
    """Units kept in one layer of `n_units` at `sparsity` (at least one)."""
    return _check_units(n_units) - n_removed(n_units, sparsity)


def pool_removed(n_layers: int, n_units: int, sparsity: float) -> int:
    """Units asked to be removed from `n_layers` prunable layers of `n_units` each, in every scope."""
    return int(n_layers) * n_removed(n_units, sparsity)


def pool_kept(n_layers: int, n_units: int, sparsity: float) -> int:
    """Units kept in `n_layers` layers of `n_units` each when `pool_removed` of them go."""
    return int(n_layers) * n_kept(n_units, sparsity)


def layer_floor(n_units: int, scope: str, min_keep: float = 0.0) -> int:
    """Fewest units a prunable layer keeps when units are ranked across layers (`global`: 1, `hybrid`:
    ceil(min_keep · U), at least 1, at most U). `local` keeps exactly n_kept in every layer; its floor is 1."""
    n = _check_units(n_units)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope != "hybrid":
        return 1
    if not 0.0 <= float(min_keep) <= 1.0:
        raise ValueError(f"min_keep must be in [0, 1], got {min_keep}")
    return min(n, max(1, math.ceil(_decimal(min_keep) * n)))


def removed_total(n_layers: int, n_units: int, sparsity: float, scope: str, min_keep: float = 0.0) -> int:
    """Units actually removed from the pool: `pool_removed`, capped so that each layer keeps its
    `layer_floor` (only `hybrid` with a floor above n_kept(U, s) is ever capped)."""
    want = pool_removed(n_layers, n_units, sparsity)
    return min(want, int(n_layers) * (int(n_units) - layer_floor(n_units, scope, min_keep)))
