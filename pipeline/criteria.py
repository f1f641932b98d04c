"""Importance criteria (SPEC §3): one function per unit kind, registered by name.

Every criterion reads a `UnitBatch` — activation `a`, gradient `g = dL/da`, optionally the
Hessian-vector product `hg`, and a [B, T] mask of the example's real tokens — and returns one
score per example and unit: heads [B, H], neurons [B, F]. Higher means more important. Units
are independent, so `collect` scores all layers in one call by concatenating them along the unit
axis (H -> L·H, F -> L·F).
Sums over tokens run over the example's real (non-padding) tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.errors import UserError

EPS = 1e-5  # the `k` of NASWOT/jacov/EPE-NAS


@dataclass
class UnitBatch:
    a: Tensor  # heads [B, T, H, D] or neurons [B, T, F], float32
    g: Tensor | None  # same shape, dL/da (None for forward-only criteria)
    valid: Tensor  # [B, T] bool: real tokens
    hg: Tensor | None = None  # same shape, Hessian-vector product (grasp only)
    labels: Tensor | None = None  # [B, T] next-token id at each position, -100 where none (epenas)

    def tokmask(self) -> Tensor:
        """valid, broadcastable against a: [B, T, 1] or [B, T, 1, 1]."""
        m = self.valid.to(self.a.dtype)
        return m.view(*m.shape, *([1] * (self.a.dim() - 2)))

    def n_tokens(self, like: Tensor) -> Tensor:
        """Real-token count per example, shaped to broadcast against `like` [B, ...]."""
        n = self.valid.sum(1).clamp_min(1).to(self.a.dtype)
        return n.view(-1, *([1] * (like.dim() - 1)))


ScoreFn = Callable[[UnitBatch], Tensor]


@dataclass(frozen=True)
class Criterion:
    name: str
    heads: ScoreFn
    neurons: ScoreFn | None
    needs_grad: bool = True
    needs_hvp: bool = False
    predictable: bool = True  # False: static-only (aggregated over the calibration set, never a predictor target)
    doc: str = ""


CRITERIA: dict[str, Criterion] = {}


def register(c: Criterion) -> Criterion:
    CRITERIA[c.name] = c
    return c


class CriterionError(UserError):
    pass


def get(name: str) -> Criterion:
    if name not in CRITERIA:
        raise CriterionError(f"unknown criterion '{name}' (params: criteria); known: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


# ---- per-example reductions -------------------------------------------------------------------


def _sum_t(x: Tensor, u: UnitBatch) -> Tensor:
    """Sum over real tokens: [B, T, ...] -> [B, ...]."""
    return (x * u.tokmask()).sum(1)


def _plainact_heads(u: UnitBatch) -> Tensor:
    return _sum_t((u.a * u.g).sum(-1, keepdim=True).abs(), u).squeeze(-1)


def _abs_ag(u: UnitBatch) -> Tensor:
    return _sum_t((u.a * u.g).abs(), u)


def _fisher_neurons(u: UnitBatch) -> Tensor:
    s = _sum_t((u.a * u.g) ** 2, u)
    return s / u.n_tokens(s)


def _fisher_heads(u: UnitBatch) -> Tensor:
    return _fisher_neurons(u).sum(-1)


def _norm(x: Tensor, u: UnitBatch, over_d: bool) -> Tensor:
    s = _sum_t(x * x, u)
    return (s.sum(-1) if over_d else s).sqrt()


def _grasp(u: UnitBatch, over_d: bool) -> Tensor:
    s = -_sum_t(u.hg * u.a, u)
    return s.sum(-1) if over_d else s


def _real_rows(x: Tensor, valid: Tensor) -> list[Tensor]:
    """Per example, the rows of its real tokens: list of [T_b, ...]."""
    return [x[b][valid[b]] for b in range(x.shape[0])]


def _nwot_heads(u: UnitBatch) -> Tensor:
    out = []
    for rows in _real_rows(u.a, u.valid):  # [T, H, D]
        c = (rows > 0).to(torch.float64).permute(1, 0, 2)  # [H, T, D]
        k = c @ c.transpose(1, 2) + (1 - c) @ (1 - c).transpose(1, 2)  # [H, T, T]
        # K is singular whenever T > 2·D (rank <= 2·head_dim); a small ridge keeps log|det| finite.
        k = k + 1e-3 * torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
        out.append(torch.linalg.slogdet(k).logabsdet.to(u.a.dtype))
    return torch.stack(out)


def _nwot_neurons(u: UnitBatch) -> Tensor:
    off = _sum_t((u.a <= 0).to(u.a.dtype), u)
    frac_off = off / u.n_tokens(off)
    return torch.log(frac_off.clamp_min(EPS))


def _corr_eigs(j: Tensor) -> Tensor:
    """Eigenvalues of corrcoef(rows of j) for j [..., N, D], computed through the [D, D] Gram matrix
    when N > D (the other N - D eigenvalues are exactly zero)."""
    j = j.to(torch.float64)
    z = j - j.mean(-1, keepdim=True)
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n, d = z.shape[-2], z.shape[-1]
    if n <= d:
        return torch.linalg.eigvalsh(z @ z.transpose(-1, -2))
    v = torch.linalg.eigvalsh(z.transpose(-1, -2) @ z)
    return torch.cat([v, v.new_zeros(*v.shape[:-1], n - d)], dim=-1)


def _jacov_heads(u: UnitBatch) -> Tensor:
    out = []
    for rows in _real_rows(u.g, u.valid):  # [T, H, D]
        v = _corr_eigs(rows.permute(1, 0, 2)).clamp_min(0)  # [H, T]
        out.append(-(torch.log(v + EPS) + 1.0 / (v + EPS)).sum(-1).to(u.a.dtype))
    return torch.stack(out)


def _epenas_heads(u: UnitBatch) -> Tensor:
    """EPE-NAS over the gradient rows grouped by target token id (more than 100 classes: the mean
    pairwise absolute difference of the per-class correlation scores)."""
    assert u.labels is not None, "epenas needs next-token labels"
    out = []
    for b in range(u.g.shape[0]):
        keep = u.valid[b] & (u.labels[b] >= 0)
        rows, lab = u.g[b][keep].to(torch.float64), u.labels[b][keep]  # [T, H, D], [T]
        per_class = []
        for c in torch.unique(lab):
            jc = rows[lab == c].permute(1, 0, 2)  # [H, n_c, D]
            z = jc - jc.mean(-1, keepdim=True)
            z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            corr = z @ z.transpose(-1, -2)
            per_class.append(torch.log(corr.abs() + EPS).sum((-1, -2)))  # [H]
        s = torch.stack(per_class, 1) if per_class else rows.new_zeros(rows.shape[1], 1)  # [H, C]
        score = (s.unsqueeze(-1) - s.unsqueeze(-2)).abs().sum((-1, -2)) / s.shape[1]
        out.append(score.to(u.a.dtype))
    return torch.stack(out)


register(Criterion("plainact", _plainact_heads, _abs_ag, doc="sum_t |sum_d a*g| (ShadowLLM default)"))
register(Criterion("fisher", _fisher_heads, _fisher_neurons, doc="sum_d mean_t (a*g)^2"))
register(Criterion("grad_norm", lambda u: _norm(u.g, u, True), lambda u: _norm(u.g, u, False), doc="||g||_2"))
register(
    Criterion(
        "l2_norm",
        lambda u: _norm(u.a, u, True),
        lambda u: _norm(u.a, u, False),
        needs_grad=False,
        doc="||a||_2 (DejaVu magnitude)",
    )
)
register(Criterion("snip", lambda u: _abs_ag(u).sum(-1), _abs_ag, doc="sum_{t,d} |a*g|"))
register(
    Criterion(
        "grasp",
        lambda u: _grasp(u, True),
        lambda u: _grasp(u, False),
        needs_hvp=True,
        doc="-sum (Hg)*a, Hessian-vector product by double backward",
    )
)
register(Criterion("nwot", _nwot_heads, _nwot_neurons, needs_grad=False, doc="NASWOT log|det K| over tokens"))
register(Criterion("jacov", _jacov_heads, None, predictable=False, doc="Jacobian covariance of g over tokens"))
register(Criterion("epenas", _epenas_heads, None, predictable=False, doc="EPE-NAS over g by target token"))
