"""Training-free thresholders (SPEC §7, issue 12) and the one sparsity every method is compared at: the share of
weight bytes a decode step does not read (SPEC §8's f·s, predictor bytes as a cost).

| method | zeroes | decided by | granularity | calibration |
|---|---|---|---|---|
| `teal` | input channels of every linear: the attention input (q/k/v share it and its threshold), the o input, the MLP input (gate/up share it; OPT: fc1), the down input (OPT: fc2) | |x| > t, one t per tensor and layer | per_token | quantiles of |x| on the calibration split |
| `cats` | FFN neurons: channels of act(gate·x) (OPT: act(fc1·x), the fc2 input) | |a| > t, one t per layer | per_token | quantiles of |a| on the calibration split |
| `griffin` | FFN neurons | top-k per layer of the context's "flocking" statistic | per_sequence | none |
| `wina` | input channels of every linear, each linear its own | top-k per token of |x_i|·‖W[:, i]‖₂ | per_token | none (weight column norms) |

Pools. The `heads` sparsity applies to the attention side (q/k/v and o inputs), the `neurons` sparsity to the
MLP side (gate/up or fc1 input, down input, FFN neurons): `evaluate.pools: [neurons]` sparsifies the MLP only,
as it does for the unit methods. `cats` and `griffin` prune FFN neurons only (a heads sparsity leaves heads
dense and says so in the record). Layers in `MaskSpec.dense_layers` (layer 0) stay dense for every method, as
for the predictor methods, so the comparison is at equal footing; the byte sparsity counts them.

What each one is, and where it differs from its paper:
- TEAL (Liu et al. 2024, arXiv 2408.14690): x ← x·[|x| > t] at every linear's input, t the s-quantile of |x|
  over the calibration tokens of that tensor, uniform s across tensors. The quantiles are taken in forward
  order on the sparsified model (`Thresholds`), not on the dense model as TEAL's histograms are, so that a
  tensor realises s although the zeros upstream shrink its input. TEAL's harness sparsifies only the last
  half of each prompt (its "prefill" setting); here every position is sparsified, as a decode step would be.
  TEAL's block-wise greedy allocation is the method `teal_greedy` (`TealGreedyMasking`, docs/thresholds.md).
- CATS (Lee et al. 2024, arXiv 2404.08763): per layer, the neuron n is dropped when |act(gate·x)_n| ≤ t_l (the
  s-quantile over calibration tokens, in forward order as TEAL's); the gate is computed densely, the up rows
  and down columns of the dropped neurons are skipped. On a non-gated MLP (OPT) it thresholds act(fc1·x): fc1 is read whole (it is
  what decides) and only fc2 columns are skipped. A ReLU's exact zeros are below every threshold: where they
  exceed s (OPT's fc2 input), the realised sparsity is the zero fraction, not s; the same holds for TEAL.
- GRIFFIN (Dong et al. 2024, arXiv 2402.19427): per sequence, Z = the FFN intermediate (the down input) over
  the context tokens of the *dense* model (GRIFFIN's prompt phase is dense), each token's row scaled to unit
  ℓ2 norm, statistic s_n = ‖Z̄[:, n]‖₂ over the context; keep the top k = n_kept(F, s) neurons of every layer
  (per layer by definition, whatever `evaluate.scope` says). Statistics over positions ≤ `feat_pos` only; the
  mask is applied to every position (the per_sequence protocol of the other methods: the context is re-run
  sparse, so the first continuation token is scored by the sparse model too — stricter than GRIFFIN's own
  generation, which keeps the prompt dense) and handed on to continuations through `ForwardInfo.reuse`.
- WINA (Chen et al. 2025, arXiv 2505.19427): per token and linear W [out, in], keep the top
  k = n_kept(in, s) input channels by |x_i|·‖W[:, i]‖₂; q, k, v (and gate, up) each use their own column norms,
  as WINA's code does. *Without* the paper's orthogonal transform of the weights (it makes most column norms
  1); so this is WINA's criterion on the stock weights.

Byte sparsity (`WeightBytes`, `skipped_elements`, `ByteMeter`): see their docstrings and docs/thresholds.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.evaluate.forward import ForwardInfo, Masking
from pipeline.evaluate.loglik import pad_batch
from pipeline.evaluate.registry import MethodContext, MethodError, MethodSpec, register
from pipeline.hooks import UnitMasker, _HookSet, notify, observe_masks
from pipeline.masks import MaskSpec, keep_mask, prunable_layers
from pipeline.models.adapters import Layout
from pipeline.units import POOLS, n_kept

ATTN_ROLES = ("q", "k", "v")
POOL_OF = {
    "q": "heads",
    "k": "heads",
    "v": "heads",
    "o": "heads",
    "gate": "neurons",
    "up": "neurons",
    "fc1": "neurons",
    "down": "neurons",
}
TEAL_SITE = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "o",
    "gate": "mlp_in",
    "up": "mlp_in",
    "fc1": "mlp_in",
    "down": "down",
}
SITE_POOL = {"attn_in": "heads", "o": "heads", "mlp_in": "neurons", "down": "neurons", "act": "neurons"}
TEAL_SITES = ("attn_in", "o", "mlp_in", "down")
CATS_SITES = ("act",)


# --------------------------------------------------------------------------------------- where things live


@dataclass(frozen=True)
class Linears:
    """One decoder layer's projections by role: q, k, v, o; gate, up (gated) or fc1; down (fc2 in OPT)."""

    by_role: dict[str, nn.Linear]
    act: nn.Module | None  # gated MLPs: the activation module applied to the gate (CATS reads its output)
    gated: bool

    @property
    def ffn_in(self) -> tuple[str, ...]:
        return ("gate", "up") if self.gated else ("fc1",)

    def roles(self) -> tuple[str, ...]:
        return (*ATTN_ROLES, "o", *self.ffn_in, "down")


def layer_linears(layout: Layout) -> list[Linears]:
    """Every layer's linears from the adapter's module paths (`ArchSpec.attn_in`, `attn_out`, `ffn_in`, `ffn_down`)."""
    spec = layout.spec
    if len(spec.attn_in) != 3:
        raise MethodError(
            f"architecture '{spec.name}': the thresholders need separate q, k, v projections "
            f"(ArchSpec.attn_in = {spec.attn_in})"
        )
    out = []
    for l, layer in enumerate(layout.layers):
        roles = {r: layer.get_submodule(p) for r, p in zip(ATTN_ROLES, spec.attn_in)}
        roles["o"] = layout.attn_out[l]
        ffn_roles = ("gate", "up") if spec.gated else ("fc1",)
        if len(spec.ffn_in) != len(ffn_roles):
            raise MethodError(f"architecture '{spec.name}': ffn_in {spec.ffn_in} does not match gated={spec.gated}")
        roles.update({r: layer.get_submodule(p) for r, p in zip(ffn_roles, spec.ffn_in)})
        roles["down"] = layout.ffn_down[l]
        act = None
        if spec.gated:
            parent = layer.get_submodule(spec.ffn_in[0].rpartition(".")[0]) if "." in spec.ffn_in[0] else layer
            act = getattr(parent, "act_fn", None)
            if not isinstance(act, nn.Module):
                act = None
        out.append(Linears(roles, act, spec.gated))
    return out


# --------------------------------------------------------------------------------------- bytes a decode step reads


@dataclass(frozen=True)
class WeightBytes:
    """The weight elements one decode step reads (SPEC §8), from the live modules.

    Counted: every decoder-layer linear (q, k, v, o, gate, up or fc1, down or fc2) and the LM head; not counted:
    the embedding (a row gather), norms and biases (< 0.1%), the KV cache (not weights). Bytes = elements ×
    the weights' element size, the same for every linear, so every share below is the same in bytes.

    What a mask lets a step skip (`skipped_elements`): a dropped query head, its head_dim rows of q and its
    head_dim columns of o; a kv group, its head_dim rows of k and of v when *every* query head it serves is
    dropped (as `pipeline.bench.bounds.step_bytes` counts); a dropped neuron whose mask is known before the
    MLP runs (predictors, static, GRIFFIN), its row of gate and of up (fc1) and its column of down (fc2); a
    zeroed input channel of a linear (TEAL, WINA), that column (`out_features` elements); a CATS neuron, its
    up row and down column (the gate is read to decide; OPT: the fc2 column only)."""

    dense: int  # elements of every counted linear
    element_size: int  # bytes per weight element
    head: tuple[int, ...]  # per layer: elements one query head owns (q rows + o columns)
    kv_group: tuple[int, ...]  # per layer: elements one kv group owns (k rows + v rows)
    neuron: tuple[int, ...]  # per layer: elements one FFN neuron owns (gate/up or fc1 rows + down column)
    group_size: int  # query heads per kv group
    n_heads: int  # query heads per layer
    ffn: tuple[int, ...]  # per layer: FFN neurons
    attn: tuple[int, ...]  # per layer: elements of q, k, v and o
    cats_neuron: tuple[int, ...]  # per layer: elements a CATS-dropped neuron skips (up row + down column; OPT: down)

    @classmethod
    def of(cls, model: nn.Module, layout: Layout) -> WeightBytes:
        d = layout.head_dim
        dense, head, kv, neuron, ffn, attn, cats = 0, [], [], [], [], [], []
        for lin in layer_linears(layout):
            r = lin.by_role
            dense += sum(m.weight.numel() for m in r.values())
            head.append(d * r["q"].in_features + d * r["o"].out_features)
            kv.append(d * (r["k"].in_features + r["v"].in_features))
            neuron.append(sum(r[x].in_features for x in lin.ffn_in) + r["down"].out_features)
            ffn.append(r["down"].in_features)
            attn.append(sum(r[x].weight.numel() for x in (*ATTN_ROLES, "o")))
            cats.append((r["up"].in_features if lin.gated else 0) + r["down"].out_features)
        lm_head = model.get_output_embeddings()
        if lm_head is not None:
            dense += lm_head.weight.numel()
        w = layout.attn_out[0].weight
        return cls(
            dense=int(dense),
            element_size=int(w.element_size()),
            head=tuple(head),
            kv_group=tuple(kv),
            neuron=tuple(neuron),
            group_size=layout.n_heads // layout.n_kv_heads,
            n_heads=layout.n_heads,
            ffn=tuple(ffn),
            attn=tuple(attn),
            cats_neuron=tuple(cats),
        )

    def skippable(self, skips: str, pool: str, layer: int) -> int:
        """Elements of `layer` that a method skipping the `skips` way (`MethodSpec.skips`) leaves unread when the
        whole of `pool` is dropped: "units", a head's q rows + o columns (kv groups not counted: they go only
        when all their query heads do) and a neuron's ffn rows + down column; "inputs", every column of the
        pool's linears (q, k, v, o; gate, up or fc1, down); "gated_neurons" (CATS), up rows + down columns."""
        if pool not in ("heads", "neurons"):
            raise ValueError(f"unknown pool {pool!r}")
        if skips == "inputs":
            return self.attn[layer] if pool == "heads" else self.ffn[layer] * self.neuron[layer]
        if skips == "units":
            return self.n_heads * self.head[layer] if pool == "heads" else self.ffn[layer] * self.neuron[layer]
        if skips == "gated_neurons":
            return 0 if pool == "heads" else self.ffn[layer] * self.cats_neuron[layer]
        raise ValueError(f"unknown way of skipping {skips!r}")


def unit_sparsity_for_bytes(
    wb: WeightBytes, skips: str, pools: list[str], dense_layers: tuple[int, ...], target: float
) -> tuple[float | None, float]:
    """The unit sparsity s (the same in every pool of `pools`) at which a method skipping the `skips` way leaves
    the share `target` of the weight bytes unread, by the count (`WeightBytes.skippable` over the non-dense
    layers: s · skippable / dense = target), and the largest share it can reach (s → 1). s is None where the
    target is out of reach (s ≥ 1). Heads methods realise a little more than the count (dropped kv groups),
    thresholders vary per token: the meter measures what each point really skips."""
    layers = [l for l in range(len(wb.head)) if l not in dense_layers]
    per_unit = sum(wb.skippable(skips, p, l) for p in pools for l in layers) / wb.dense
    if per_unit <= 0:
        return None, 0.0
    s = target / per_unit
    return (round(s, 4) if s < 1 else None), per_unit


def skipped_elements(wb: WeightBytes, pool: str, layer: int, keep: Tensor, cost: int | None = None) -> Tensor:
    """Weight elements a decode step does not read, per token, given one layer's keep mask keep [..., U]
    (True = kept): with `cost` (elements per dropped unit: an input channel's column, a CATS neuron), the
    dropped count × cost; else a unit mask of `pool` ("heads": q rows + o columns per head, plus k and v rows
    of every fully dropped kv group; "neurons": ffn rows + down column per neuron). The byte sparsity of a
    token is the sum over its layers' masks / `wb.dense` (`WeightBytes`)."""
    dropped = ~keep.bool()
    n = dropped.sum(-1, dtype=torch.float64)
    if cost is not None:
        return n * float(cost)
    if pool == "heads":
        groups = dropped.unflatten(-1, (-1, wb.group_size)).all(-1).sum(-1, dtype=torch.float64)
        return n * wb.head[layer] + groups * wb.kv_group[layer]
    if pool == "neurons":
        return n * wb.neuron[layer]
    raise ValueError(f"unknown pool {pool!r}")


def predictor_elements(masking: Masking) -> int:
    """Weight elements a method reads besides the model's own (its predictor, thresholds, column norms)."""
    n = int(getattr(masking, "overhead_elements", 0))
    pred = getattr(masking, "pred", None)
    if isinstance(pred, nn.Module):
        n += sum(p.numel() for p in pred.parameters())
    return n


class _Stat:
    """Running count, mean, spread and range of per-token values (float64)."""

    def __init__(self):
        self.n, self.s, self.ss, self.lo, self.hi = 0, 0.0, 0.0, math.inf, -math.inf

    def add(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.double()
        self.n += x.numel()
        self.s += float(x.sum())
        self.ss += float((x * x).sum())
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def summary(self) -> dict[str, float | int | None]:
        if not self.n:
            return {"mean": None, "std": None, "min": None, "max": None, "n_tokens": 0}
        mean = self.s / self.n
        return {
            "mean": mean,
            "std": math.sqrt(max(self.ss / self.n - mean * mean, 0.0)),
            "min": self.lo,
            "max": self.hi,
            "n_tokens": self.n,
        }


class ByteMeter:
    """Per evaluated token, the share of weight bytes its masks let a decode step skip.

    Wrap a method (`wrap`) and evaluate as usual: every mask a hook applies is reported to the meter
    (`pipeline.hooks.observe_masks`), per token and layer; the meter adds `skipped_elements` over a token's
    layers and, when the forward pass ends, records skipped / `WeightBytes.dense` for every real token (padding
    excluded) — context tokens and continuation tokens alike. `summary()`: mean, std, min, max over tokens;
    `predictor_share` p = the method's own weights (predictor, thresholds, column norms) over the model's; `net`
    = mean − p, the f·s − p of SPEC §8's bound 1 / (1 − f·s + p). p counts a predictor once per step, as the
    benchmark does; a per_sequence predictor runs once per context, so there p is an upper bound on its cost.
    `units[pool]`: the pool's dropped share over the masks reported (`realised`) and over every layer and
    tensor of the pool (`effective`, when the method declares `measured_units`)."""

    def __init__(self, wb: WeightBytes, *, extra_elements: int = 0, pool_units: dict[str, int] | None = None):
        self.wb, self.extra, self.pool_units = wb, int(extra_elements), dict(pool_units or {})
        self.tokens = _Stat()
        self._dropped = {p: 0.0 for p in POOLS}
        self._units = {p: 0.0 for p in POOLS}
        self._n_tokens = 0
        self._batch: dict[str, Any] | None = None

    def wrap(self, masking: Masking) -> Masking:
        return _Metered(masking, self)

    def _event(self, pool: str, layer: int, keep: Tensor, *, site: str | None = None, cost: int | None = None) -> None:
        b = self._batch
        if b is None:
            return
        valid = b["valid"]
        if tuple(keep.shape[:-1]) != tuple(valid.shape):
            raise RuntimeError(
                f"byte meter: a {pool} mask of shape {tuple(keep.shape)} in a batch of {tuple(valid.shape)} tokens"
            )
        sk = skipped_elements(self.wb, pool, layer, keep, cost)
        b["skipped"] = sk if b["skipped"] is None else b["skipped"] + sk
        dropped = ((~keep.bool()).sum(-1, dtype=torch.float64) * valid.to(sk.device)).sum()
        b["dropped"][pool] = dropped if b["dropped"][pool] is None else b["dropped"][pool] + dropped
        self._units[pool] += b["n"] * keep.shape[-1]

    @contextmanager
    def batch(self, valid: Tensor) -> Iterator[None]:
        """Meter one forward pass over a batch whose real tokens are `valid` [B, T] (sums stay on the device
        until the pass ends: one synchronisation per batch)."""
        valid = valid.bool()
        self._batch = {"valid": valid, "skipped": None, "dropped": {p: None for p in POOLS}, "n": int(valid.sum())}
        try:
            with observe_masks(self._event):
                yield
            b = self._batch
            sk, v = b["skipped"], b["valid"]
            share = torch.zeros(b["n"], dtype=torch.float64) if sk is None else (sk[v.to(sk.device)] / self.wb.dense)
            self.tokens.add(share.cpu())
            self._n_tokens += b["n"]
            for pool, d in b["dropped"].items():
                if d is not None:
                    self._dropped[pool] += float(d)
        finally:
            self._batch = None

    def summary(self) -> dict[str, Any]:
        tok = self.tokens.summary()
        p = self.extra / self.wb.dense
        units = {}
        for pool in POOLS:
            u = {"realised": self._dropped[pool] / self._units[pool] if self._units[pool] else None}
            if pool in self.pool_units and self._n_tokens:
                u["effective"] = self._dropped[pool] / (self._n_tokens * self.pool_units[pool])
            units[pool] = u
        return {
            "byte_sparsity": tok,
            "predictor_share": p,
            "net": None if tok["mean"] is None else tok["mean"] - p,
            "dense_weight_bytes": self.wb.dense * self.wb.element_size,
            "units": units,
            "definition": "weight bytes not read per decode step (docs/thresholds.md)",
        }


class _Metered(Masking):
    """A method whose forward passes are metered; everything else is the method's own."""

    def __init__(self, inner: Masking, meter: ByteMeter):
        self.inner, self.meter = inner, meter
        self.reuse_context = inner.reuse_context

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @contextmanager
    def forward(self, info: ForwardInfo):
        with self.meter.batch(info.valid), self.inner.forward(info) as state:
            yield state


def meter(masking: Masking, wb: WeightBytes) -> ByteMeter:
    """A meter for `masking`: its own weights as the predictor cost, its declared unit counts."""
    return ByteMeter(
        wb, extra_elements=predictor_elements(masking), pool_units=getattr(masking, "measured_units", None)
    )


# --------------------------------------------------------------------------------------- calibration

LOG_LO, LOG_HI, BINS = -12.0, 6.0, 1 << 14  # log10 |x| bins 0.11% wide: a threshold within ~0.1% of exact


class AbsHistogram:
    """Streaming histogram of |x| (log-spaced bins over 1e-12 .. 1e6, values outside clamped to the end bins)
    plus a count of exact zeros; `threshold(s)` is the s-quantile (|x| ≤ t for a share s of the values)."""

    def __init__(self):
        self.counts = torch.zeros(BINS, dtype=torch.float64)
        self.zeros = 0
        self.n = 0

    def add(self, x: Tensor) -> None:
        a = x.detach().float().abs().flatten()
        nz = a[a != 0]
        self.zeros += a.numel() - nz.numel()
        self.n += a.numel()
        if nz.numel():
            lg = torch.log10(nz).clamp_(LOG_LO, LOG_HI)
            self.counts += torch.histc(lg, BINS, LOG_LO, LOG_HI).double().cpu()

    def zero_share(self) -> float:
        return self.zeros / self.n if self.n else 0.0

    def threshold(self, s: float) -> float:
        """t with a share s of the values at or below it (0.0 when the exact zeros already make up s)."""
        if self.n == 0:
            raise MethodError("calibration saw no tokens (params: evaluate.calibration_examples)")
        target = float(s) * self.n
        if target <= self.zeros:
            return 0.0
        cum = self.zeros + torch.cumsum(self.counts, 0)
        b = min(int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64))), BINS - 1)
        below = float(cum[b - 1]) if b > 0 else float(self.zeros)
        frac = min(max((target - below) / max(float(self.counts[b]), 1.0), 0.0), 1.0)
        return 10.0 ** (LOG_LO + (b + frac) * (LOG_HI - LOG_LO) / BINS)


def _calibration(ctx: MethodContext) -> list[list[int]]:
    if ctx.calibration is None:
        raise MethodError(
            "the thresholders need calibration sequences (params: collect.tasks, "
            "evaluate.calibration_examples); MethodContext.calibration is not set"
        )
    key = "calib/sequences"
    if key not in ctx.cache:
        ctx.cache[key] = [list(q) for q in ctx.calibration()]
        if not ctx.cache[key]:
            raise MethodError("no calibration sequences (params: collect.tasks, evaluate.calibration_examples)")
    return ctx.cache[key]


# --------------------------------------------------------------------------------------- hooks that zero inputs

KeepFn = Callable[[Tensor], Tensor]
"""x [B, T, U] -> keep [B, T, U] bool."""


class _MaskHooks(_HookSet):
    """Zeroes the dropped channels of a module's input (pre-hook) or output (forward hook) and reports each
    mask (`pipeline.hooks.notify`)."""

    def _apply(self, raw: Tensor, keep_fn: KeepFn, pool: str, site: str, l: int, cost: int) -> Tensor:
        x = self._bt(raw)
        keep = keep_fn(x)
        notify(pool, l, keep, site=site, cost=cost)
        return x.masked_fill(~keep, 0).view(raw.shape)

    def on_input(self, module: nn.Module, keep_fn: KeepFn, pool: str, site: str, l: int, cost: int) -> None:
        def hook(_m, args):
            return (self._apply(args[0], keep_fn, pool, site, l, cost), *args[1:])

        self.add(module, hook)

    def on_output(self, module: nn.Module, keep_fn: KeepFn, pool: str, site: str, l: int, cost: int) -> None:
        def hook(_m, _args, out):
            return self._apply(out, keep_fn, pool, site, l, cost)

        self._handles.append(module.register_forward_hook(hook))


class Thresholds:
    """|x| thresholds t[(site, layer)] for target sparsities s[(site, layer)]: keep x where |x| > t.

    Calibrated in forward order on the sparsified model itself (`calibrate`): while `valid` is set, a
    threshold not yet known is taken, the first time the model reaches its tensor, as the s-quantile of |x|
    over the real tokens of the input the model — already sparsified upstream by the thresholds found before
    it — feeds that tensor, then applied. TEAL's own histograms are of the dense model's activations; measured
    on the tiny test Llama at s = 0.7, those thresholds realise up to 0.85 on some tensors (upstream zeros
    shrink downstream activations), while these realise s ± 2% held out (tests/test_thresholds.py)."""

    def __init__(self, targets: dict[tuple[str, int], float]):
        self.targets = dict(targets)
        self.t: dict[tuple[str, int], float] = {}
        self.valid: Tensor | None = None

    def keep_fn(self, key: tuple[str, int]) -> KeepFn:
        def fn(x: Tensor) -> Tensor:
            t = self.t.get(key)
            if t is None:
                if self.valid is None:
                    raise MethodError(f"threshold {key} used before calibration")
                h = AbsHistogram()
                h.add(x[self.valid.to(x.device)])
                t = self.t[key] = h.threshold(self.targets[key])
            return x.abs() > t

        return fn


@torch.no_grad()
def calibrate(masking: _ThresholdMasking, sequences: list[list[int]]) -> dict[tuple[str, int], float]:
    """Find `masking`'s thresholds (`Thresholds`): one forward pass of the sparsified model over `sequences`
    (one right-padded batch: every threshold needs all calibration tokens before the tensors after it run)."""
    model = masking.ctx.model
    ids, valid = pad_batch(sequences, next(model.parameters()).device)
    th = masking.th
    th.valid = valid
    try:
        with masking.forward(ForwardInfo(ids=ids, valid=valid, last=valid.sum(1) - 1)):
            model(input_ids=ids, attention_mask=valid.long(), use_cache=False)
    finally:
        th.valid = None
    missing = sorted(set(th.targets) - set(th.t))
    if missing:
        raise MethodError(f"calibration never reached the tensors {missing[:4]}")
    return dict(th.t)


def wina_scores(x: Tensor, col_norm: Tensor) -> Tensor:
    """WINA's criterion |x_i|·‖W[:, i]‖₂ for inputs x [..., in] and column norms ‖W[:, i]‖₂ [in], in float32."""
    return x.float().abs() * col_norm.to(device=x.device, dtype=torch.float32)


def topk_keep(scores: Tensor, k: int) -> Tensor:
    """Keep mask [..., U] of the k highest scores along the last dimension."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)


class _ThresholdMasking(Masking):
    """Per-token masks from keep functions at module inputs (and CATS's activation outputs); causal by nature,
    so a context's KV cache is shared by its continuations."""

    reuse_context = True
    measured_effective = True  # the record's effective unit sparsity is measured (ByteMeter), not counted

    def __init__(self, ctx: MethodContext, spec: MaskSpec):
        self.ctx, self.spec = ctx, spec
        self.lins = layer_linears(ctx.layout)
        self.layers = prunable_layers(ctx.layout.n_layers, spec.dense_layers)
        self.th = Thresholds({})
        self.overhead_elements = 0
        # (module, keep fn, pool, site, layer, cost per dropped unit, on the output?) per hooked tensor
        self.sites: list[tuple[nn.Module, KeepFn, str, str, int, int, bool]] = []

    @contextmanager
    def forward(self, info: ForwardInfo):
        if not self.sites:
            yield None
            return
        with _MaskHooks(self.ctx.model) as hooks:
            for mod, fn, pool, site, l, cost, output in self.sites:
                (hooks.on_output if output else hooks.on_input)(mod, fn, pool, site, l, cost)
            yield None

    def _channel_units(self) -> dict[str, int]:
        """Input channels of every linear of every layer, per pool (the denominator of `effective`)."""
        units = {p: 0 for p in POOLS}
        for lin in self.lins:
            for role in lin.roles():
                units[POOL_OF[role]] += lin.by_role[role].in_features
        return units


class TealMasking(_ThresholdMasking):
    """TEAL, uniform: one |x| threshold per (site, layer) at its pool's sparsity; q/k/v share the attention
    input's, gate/up the MLP input's (module docstring)."""

    def __init__(self, ctx: MethodContext, spec: MaskSpec):
        super().__init__(ctx, spec)
        self.measured_units = self._channel_units()
        self.th = Thresholds(
            {
                (site, l): spec.s(SITE_POOL[site])
                for l in self.layers
                for site in TEAL_SITES
                if spec.s(SITE_POOL[site]) > 0
            }
        )
        for l in self.layers:
            for role in self.lins[l].roles():
                key = (TEAL_SITE[role], l)
                if key in self.th.targets:
                    mod = self.lins[l].by_role[role]
                    self.sites.append((mod, self.th.keep_fn(key), POOL_OF[role], role, l, mod.out_features, False))
        self.overhead_elements = len(self.th.targets)


GREEDY_STEP = 0.05  # TEAL's greedy: each step raises a pool's weighted mean sparsity of one layer by this much


def _site_elements(lin: Linears) -> dict[str, int]:
    """Weight elements behind each TEAL site of one layer (q/k/v share the attention input, gate/up the MLP's)."""
    out: dict[str, int] = {}
    for role in lin.roles():
        mod = lin.by_role[role]
        out[TEAL_SITE[role]] = out.get(TEAL_SITE[role], 0) + mod.in_features * mod.out_features
    return out


def greedy_allocation(
    error: Callable[[dict[str, float]], float], elements: dict[str, int], target: float, step: float = GREEDY_STEP
) -> dict[str, float]:
    """TEAL's block-wise greedy allocation for one layer and pool: starting from 0 everywhere, repeatedly raise
    the sparsity of the one site whose raise (enough to lift the element-weighted mean by `step`, the last one
    just to `target`) gives the smallest `error(allocation)`, until the weighted mean reaches `target`.
    `elements`: each site's weight elements (the weights); a site never goes above 0.99."""
    alloc = dict.fromkeys(elements, 0.0)
    total = sum(elements.values())

    def mean(a: dict[str, float]) -> float:
        return sum(a[k] * elements[k] for k in a) / total

    while mean(alloc) < target - 1e-9:
        lift = min(step, target - mean(alloc))
        best: tuple[float, dict[str, float]] | None = None
        for site in sorted(alloc):
            room = 0.99 - alloc[site]
            if room <= 1e-9:
                continue
            trial = dict(alloc, **{site: alloc[site] + min(room, lift * total / elements[site])})
            e = error(trial)
            if best is None or e < best[0]:
                best = (e, trial)
        if best is None:  # every site at its cap: the target cannot be reached
            break
        alloc = best[1]
    return alloc


class TealGreedyMasking(TealMasking):
    """TEAL with its block-wise greedy allocation: per layer and pool, the sparsities of that pool's
    sites (attention input vs o input; MLP input vs down input) chosen greedily to minimise the relative squared
    error of the layer's output on the calibration sequences, their weighted mean (by weight elements) equal to
    the pool's sparsity; then the thresholds as `teal` finds them. The dense model's input of each layer is fed
    to that layer alone (TEAL optimises each block on dense block inputs); attention is allocated before the MLP,
    the MLP's error measured with the attention allocation applied."""

    def __init__(self, ctx: MethodContext, spec: MaskSpec):
        super().__init__(ctx, spec)
        if self.th.targets:
            key = f"teal_greedy/alloc/{sorted(spec.sparsity.items())}/{tuple(spec.dense_layers)}"
            if key not in ctx.cache:
                ctx.cache[key] = self._allocate(_calibration(ctx))
            self.th = Thresholds(ctx.cache[key])
            self.sites = [
                (m, self.th.keep_fn((TEAL_SITE[r], l)), p, r, l, c, o)
                for m, _, p, r, l, c, o in self.sites
                if (TEAL_SITE[r], l) in self.th.targets  # a site the greedy left at 0 stays dense
            ]
            self.overhead_elements = len(self.th.targets)

    @torch.no_grad()
    def _allocate(self, sequences: list[list[int]]) -> dict[tuple[str, int], float]:
        model, lay = self.ctx.model, self.ctx.layout
        ids, valid = pad_batch(sequences, next(model.parameters()).device)
        targets: dict[tuple[str, int], float] = {}
        busy = [False]

        def at(l: int):
            def hook(module, args, kwargs):
                if busy[0]:
                    return None
                busy[0] = True
                try:
                    targets.update(self._allocate_layer(l, module, args, kwargs, valid))
                finally:
                    busy[0] = False
                return None

            return hook

        hooks = _HookSet(model)
        try:
            for l in self.layers:
                hooks.add(lay.layers[l], at(l), with_kwargs=True)
            model(input_ids=ids, attention_mask=valid.long(), use_cache=False)
        finally:
            hooks.remove()
        return targets

    def _allocate_layer(self, l: int, layer: nn.Module, args, kwargs, valid: Tensor) -> dict:
        """This layer's site sparsities: dense output first, then each pool's greedy allocation."""

        def output(alloc: dict[str, float]) -> Tensor:
            th = Thresholds({(site, l): s for site, s in alloc.items() if s > 0})
            th.valid = valid
            with _MaskHooks(self.ctx.model) as hooks:
                hooks.batch_size = valid.shape[0]  # the layer runs alone: no model call to read it from
                for mod, _, pool, role, ll, cost, _ in self.sites:
                    if ll == l and (TEAL_SITE[role], l) in th.targets:
                        hooks.on_input(mod, th.keep_fn((TEAL_SITE[role], l)), pool, role, l, cost)
                out = layer(*args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out
            return y.float()[valid.to(y.device)]

        dense = output({})
        scale = dense.pow(2).sum().clamp_min(1e-30)
        elements = _site_elements(self.lins[l])
        chosen: dict[str, float] = {}
        for pool in POOLS:
            s = self.spec.s(pool)
            sites = {k: v for k, v in elements.items() if SITE_POOL[k] == pool}
            if s <= 0 or not sites:
                continue
            chosen.update(
                greedy_allocation(lambda a: float((output({**chosen, **a}) - dense).pow(2).sum() / scale), sites, s)
            )
        return {(site, l): v for site, v in chosen.items() if v > 0}


class CatsMasking(_ThresholdMasking):
    """CATS: per layer, drop neuron n at a token when |act(gate·x)_n| ≤ t_l (module docstring)."""

    def __init__(self, ctx: MethodContext, spec: MaskSpec):
        super().__init__(ctx, spec)
        s = spec.s("neurons")
        self.measured_units = {"neurons": ctx.layout.n_layers * ctx.layout.ffn_dim}
        self.missing = ["heads"] if spec.s("heads") > 0 else []
        self.missing_note = "cats prunes FFN neurons only: heads left dense"
        self.th = Thresholds({("act", l): s for l in self.layers} if s > 0 else {})
        for _, l in self.th.targets:
            lin = self.lins[l]
            r = lin.by_role
            fn = self.th.keep_fn(("act", l))
            if lin.gated:
                if lin.act is None:
                    mlp = ctx.layout.spec.ffn_in[0].rpartition(".")[0]
                    raise MethodError(
                        f"cats: architecture '{ctx.layout.spec.name}' has no activation module at "
                        f"{mlp}.act_fn (CATS thresholds its output)"
                    )
                cost = r["up"].in_features + r["down"].out_features
                self.sites.append((lin.act, fn, "neurons", "cats", l, cost, True))
            else:  # act(fc1 x) is the fc2 input: fc1 is read whole (it decides), fc2 columns are skipped
                self.sites.append((r["down"], fn, "neurons", "cats", l, r["down"].out_features, False))
        self.overhead_elements = len(self.th.targets)


class WinaMasking(_ThresholdMasking):
    """WINA without the orthogonal transform: per token, the top n_kept(in, s) input channels of every linear
    by |x_i|·‖W[:, i]‖₂, each linear with its own column norms."""

    def __init__(self, ctx: MethodContext, spec: MaskSpec):
        super().__init__(ctx, spec)
        self.measured_units = self._channel_units()
        for l in self.layers:
            for role in self.lins[l].roles():
                s = spec.s(POOL_OF[role])
                if s <= 0:
                    continue
                mod = self.lins[l].by_role[role]
                norm, k = _col_norms(ctx, l, role, mod), n_kept(mod.in_features, s)
                fn = lambda x, norm=norm, k=k: topk_keep(wina_scores(x, norm), k)
                self.sites.append((mod, fn, POOL_OF[role], role, l, mod.out_features, False))
                self.overhead_elements += mod.in_features  # the column norms are read too


def _col_norms(ctx: MethodContext, l: int, role: str, mod: nn.Linear) -> Tensor:
    key = f"wina/colnorm/{l}/{role}"
    if key not in ctx.cache:
        with torch.no_grad():
            ctx.cache[key] = mod.weight.float().norm(dim=0)
    return ctx.cache[key]


def griffin_statistic(z: Tensor, context: Tensor) -> Tensor:
    """GRIFFIN's per-neuron statistic over a sequence's context: z [B, T, F] FFN intermediates, context [B, T]
    bool (the tokens the statistic may read) -> [B, F] = ‖z_t / ‖z_t‖₂‖₂ over the context tokens t."""
    z = z.float()
    zn = z / z.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    zn = zn * context.to(device=z.device, dtype=z.dtype).unsqueeze(-1)
    return zn.norm(dim=1)


class GriffinMasking(Masking):
    """GRIFFIN: per sequence, the top k = n_kept(F, s) FFN neurons of every prunable layer by the dense
    context's flocking statistic (`griffin_statistic`); the mask is applied to every position and handed on to
    continuations (module docstring)."""

    reuse_context = True

    def __init__(self, ctx: MethodContext, spec: MaskSpec):
        self.ctx, self.spec = ctx, spec
        self.s = spec.s("neurons")
        self.missing = ["heads"] if spec.s("heads") > 0 else []
        self.missing_note = "griffin prunes FFN neurons only: heads left dense"
        self.overhead_elements = 0

    def _keep(self, info: ForwardInfo) -> Tensor:
        """Keep masks [B, L, F] from a dense pass over the batch, statistics at positions ≤ feat_pos."""
        lay = self.ctx.layout
        pos = torch.arange(info.ids.shape[1], device=info.ids.device)
        context = info.valid & (pos[None, :] <= info.feature_rows().to(pos.device)[:, None])
        stats: list[Tensor | None] = [None] * lay.n_layers
        hooks = _HookSet(self.ctx.model)  # each layer's statistic as it runs: no layer's intermediates are kept

        def at(l: int):
            def hook(_m, args):
                stats[l] = griffin_statistic(hooks._bt(args[0]), context)

            return hook

        try:
            for l in range(lay.n_layers):
                hooks.add(lay.ffn_down[l], at(l))
            with torch.no_grad():
                self.ctx.model(input_ids=info.ids, attention_mask=info.valid.long(), use_cache=False)
        finally:
            hooks.remove()
        return keep_mask(torch.stack(stats, 1), self.s, "local", dense_layers=self.spec.dense_layers)  # [B, L, F]

    @contextmanager
    def forward(self, info: ForwardInfo):
        if self.s == 0:
            yield None
            return
        keep = info.reuse["neurons"] if info.reuse is not None else self._keep(info)
        mult = keep.float().unsqueeze(1)  # [B, 1, L, F]: one mask per sequence, every position
        with UnitMasker(self.ctx.model, self.ctx.layout, neuron_fn=lambda l, x: mult[:, :, l]):
            yield {"heads": None, "neurons": keep}


# --------------------------------------------------------------------------------------- registry


def _calibrated(cls: type[_ThresholdMasking]) -> Callable[[MethodContext, MaskSpec], Masking]:
    """Factory of a threshold method: thresholds calibrated once per (method, sparsity, dense layers) and
    method context (`calibrate` on `MethodContext.calibration`'s sequences), then reused."""

    def factory(ctx: MethodContext, spec: MaskSpec) -> Masking:
        m = cls(ctx, spec)
        if m.th.targets:
            key = f"thresholds/{cls.__name__}/{sorted(spec.sparsity.items())}/{tuple(spec.dense_layers)}"
            if key not in ctx.cache:
                ctx.cache[key] = calibrate(m, _calibration(ctx))
            m.th.t = dict(ctx.cache[key])
        return m

    return factory


register(
    MethodSpec(
        "teal",
        _calibrated(TealMasking),
        skips="inputs",
        needs="calibration",
        granularities=("per_token",),
        fixed_granularity="per_token",
    )
)
register(
    MethodSpec(
        "teal_greedy",
        _calibrated(TealGreedyMasking),
        skips="inputs",
        needs="calibration",
        granularities=("per_token",),
        fixed_granularity="per_token",
        title_of=lambda g: "teal (greedy)",
    )
)
register(
    MethodSpec(
        "cats",
        _calibrated(CatsMasking),
        skips="gated_neurons",
        prunes=("neurons",),
        needs="calibration",
        granularities=("per_token",),
        fixed_granularity="per_token",
    )
)
register(
    MethodSpec(
        "griffin",
        GriffinMasking,
        prunes=("neurons",),
        granularities=("per_sequence",),
        fixed_granularity="per_sequence",
    )
)
register(
    MethodSpec(
        "wina",
        WinaMasking,
        skips="inputs",
        granularities=("per_token",),
        fixed_granularity="per_token",
        title_of=lambda g: "wina (no transform)",
    )
)
