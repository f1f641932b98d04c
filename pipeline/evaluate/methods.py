"""Methods registry: how each compared method turns into hooks for one forward pass (SPEC §5, §7).

| method | masks from | granularity | shared-context reuse |
|---|---|---|---|
| `dense` | nothing | - | yes |
| `static` | calibration-mean scores of a criterion (`aggregate.load_static`) | fixed | yes |
| `oracle` | the scored sequence's own true scores (`collect.score_batch`) | per_sequence | no |
| `shadowllm` | one predictor on layer 0's head outputs, all layers at once | per_token / per_sequence | per_token |
| `dejavu` | per-layer predictors on each layer's input (dense-model inputs, see below) | per_token / per_sequence | no |
| `dejavu_lookahead` | layer l's predictor on layer l-1's input | per_token / per_sequence | no |

ShadowLLM runs in one pass: the layer-0 attention hook sees layer 0's (dense) head outputs, predicts
every later layer's scores, builds the keep masks and caches them for the later hooks. DejaVu-style
predictors need *all* layers' scores before a global (or hybrid) ranking can be made, while each layer's
input is only known once the layers below ran; they therefore run in two passes: a dense pass records
every layer's input, the predictions from those inputs build the masks, the masked pass applies them
(the paper's simulation). Static and oracle scores are min-max normalised per layer (`evaluate.normalize`)
before a global ranking; predictor outputs are already on that scale.

A method is registered with `register(name, factory)`; `factory(ctx, spec)` returns a `Masking`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.evaluate.forward import ForwardInfo, Masking
from pipeline.hooks import UnitCapture, UnitMasker
from pipeline.masks import POOLS, MaskSpec, contextual_masks, static_masks
from pipeline.models.adapters import Layout

GRANULARITIES = ("per_token", "per_sequence")


class MethodError(ValueError):
    """A bad method configuration; the message names the parameter."""


@dataclass
class MethodContext:
    """What a method may need: the model, its layout and fingerprint, where scores/predictors live."""

    model: nn.Module
    layout: Layout
    fingerprint: str
    scores_dir: str | None = None
    predictors_dir: str | None = None
    criterion: str | None = None
    granularity: str = "per_sequence"
    oracle_batch: int = 8
    cache: dict[str, Any] = field(default_factory=dict)  # loaded predictors / static scores


# --------------------------------------------------------------------------------------- helpers

def _rows_at(x: Tensor, last: Tensor) -> Tensor:
    """x [B, T, ...] at positions last [B] -> [B, ...]."""
    return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)]


def _expand(mask: Tensor | None, per_token: bool) -> Tensor | None:
    """Keep mask [B, (T,) U] -> float multiplier broadcastable to [B, T, U]."""
    if mask is None:
        return None
    m = mask.float()
    return m if per_token else m.unsqueeze(1)


class _Store:
    """Masks of the current batch: pool -> layer -> multiplier (or None = dense)."""

    def __init__(self):
        self.masks: dict[str, dict[int, Tensor | None]] = {p: {} for p in POOLS}

    def head_fn(self, l: int, x: Tensor) -> Tensor | None:
        return self.masks["heads"].get(l)

    def neuron_fn(self, l: int, x: Tensor) -> Tensor | None:
        return self.masks["neurons"].get(l)

    def set_all(self, pool: str, keep: Tensor | None, per_token: bool) -> None:
        """keep [B, (T,) L, U]."""
        if keep is None:
            return
        for l in range(keep.shape[-2]):
            self.masks[pool][l] = _expand(keep[..., l, :], per_token)


# --------------------------------------------------------------------------------------- methods

class StaticMasking(Masking):
    reuse_context = True

    def __init__(self, ctx: MethodContext, spec: MaskSpec, scores: dict[str, Any]):
        self.ctx, self.spec = ctx, spec
        self.keep = static_masks(scores, spec)
        self.missing = [p for p in POOLS if spec.s(p) > 0 and scores.get(p) is None]
        self.mult = {p: (None if k is None else k.float()) for p, k in self.keep.items()}

    def forward(self, info: ForwardInfo) -> AbstractContextManager:
        hm, nm = self.mult["heads"], self.mult["neurons"]
        return UnitMasker(self.ctx.model, self.ctx.layout,
                          head_fn=None if hm is None else (lambda l, x: hm[l]),
                          neuron_fn=None if nm is None else (lambda l, x: nm[l]))


class ShadowLLMMasking(Masking):
    def __init__(self, ctx: MethodContext, spec: MaskSpec, predictor: Any):
        self.ctx, self.spec, self.pred = ctx, spec, predictor
        self.per_token = ctx.granularity == "per_token"
        self.reuse_context = self.per_token

    @contextmanager
    def forward(self, info: ForwardInfo):
        store = _Store()

        def head_fn(l: int, x4: Tensor) -> Tensor | None:
            if l == 0:
                feats = x4.flatten(-2)  # [B, T, H*D]
                if not self.per_token:
                    feats = _rows_at(feats, info.last)
                with torch.no_grad():
                    heads, neurons = self.pred.predict_all(feats.float())
                store.set_all("heads", contextual_masks(heads, "heads", self.spec, normalize=False), self.per_token)
                store.set_all("neurons", contextual_masks(neurons, "neurons", self.spec, normalize=False),
                              self.per_token)
            return store.head_fn(l, x4)

        with UnitMasker(self.ctx.model, self.ctx.layout, head_fn=head_fn, neuron_fn=store.neuron_fn) as m:
            yield m


class DejaVuMasking(Masking):
    """Two passes: dense layer inputs -> per-layer predictions -> masks -> masked pass."""

    reuse_context = False

    def __init__(self, ctx: MethodContext, spec: MaskSpec, predictor: Any):
        self.ctx, self.spec, self.pred = ctx, spec, predictor
        self.per_token = ctx.granularity == "per_token"
        self.offset = int(getattr(predictor, "offset", 0))

    def _predict(self, info: ForwardInfo) -> tuple[Tensor, Tensor]:
        L = self.ctx.layout.n_layers
        cap_layers = sorted({l - self.offset for l in self.pred.layers})
        with torch.no_grad(), UnitCapture(self.ctx.model, self.ctx.layout, layer_inputs=True, layers=cap_layers) as cap:
            self.ctx.model(input_ids=info.ids, use_cache=False)
        heads, neurons = [], []
        lead = None
        for l in range(L):
            if l in self.pred.layers:
                h = cap.layer_inputs[l - self.offset]
                if not self.per_token:
                    h = _rows_at(h, info.last)
                with torch.no_grad():
                    ph, pn = self.pred.predict_layer(l, h.float())
                lead = ph.shape[:-1]
                heads.append(ph)
                neurons.append(pn)
            else:
                heads.append(None)
                neurons.append(None)
        # layers without a predictor (layer 0 of the lookahead variant) stay dense: give them top scores
        hs = torch.stack([torch.ones(*lead, self.ctx.layout.n_heads) if t is None else t for t in heads], -2)
        ns = torch.stack([torch.ones(*lead, self.ctx.layout.ffn_dim) if t is None else t for t in neurons], -2)
        return hs, ns

    @contextmanager
    def forward(self, info: ForwardInfo):
        hs, ns = self._predict(info)
        store = _Store()
        store.set_all("heads", contextual_masks(hs, "heads", self.spec, normalize=False), self.per_token)
        store.set_all("neurons", contextual_masks(ns, "neurons", self.spec, normalize=False), self.per_token)
        with UnitMasker(self.ctx.model, self.ctx.layout, head_fn=store.head_fn, neuron_fn=store.neuron_fn) as m:
            yield m


class OracleMasking(Masking):
    """The scored sequence's own true importance (per_sequence): forward + backward first."""

    reuse_context = False

    def __init__(self, ctx: MethodContext, spec: MaskSpec):
        from pipeline import criteria as crit
        from pipeline.collect import CollectSettings

        self.ctx, self.spec = ctx, spec
        self.settings = CollectSettings(criteria=[ctx.criterion], batch_size=ctx.oracle_batch, layer_inputs=False)
        self.has_neurons = crit.get(ctx.criterion).neurons is not None

    def _scores(self, info: ForwardInfo) -> dict[str, Tensor]:
        from pipeline.collect import Sequence, score_batch
        from pipeline.traces import head_col, neuron_col

        if info.full is None or info.n_target is None:
            raise MethodError("oracle masks need whole sequences (no shared-context reuse)")
        seqs = [Sequence(f"row{b}", "eval", tuple(f), n) for b, (f, n) in enumerate(zip(info.full, info.n_target))]
        out = score_batch(self.ctx.model, self.ctx.layout, seqs, self.settings)
        lay, c, B = self.ctx.layout, self.ctx.criterion, len(seqs)
        res = {"heads": torch.as_tensor(np.asarray(out[head_col(c)], dtype=np.float32).reshape(B, lay.n_layers, lay.n_heads))}
        if self.has_neurons:
            res["neurons"] = torch.as_tensor(np.asarray(out[neuron_col(c)], dtype=np.float32).reshape(B, lay.n_layers, lay.ffn_dim))
        return res

    @contextmanager
    def forward(self, info: ForwardInfo):
        scores = self._scores(info)
        store = _Store()
        for pool in POOLS:
            if pool in scores:
                store.set_all(pool, contextual_masks(torch.nan_to_num(scores[pool]), pool, self.spec, normalize=True),
                              per_token=False)
        with UnitMasker(self.ctx.model, self.ctx.layout, head_fn=store.head_fn, neuron_fn=store.neuron_fn) as m:
            yield m


# --------------------------------------------------------------------------------------- registry

Factory = Callable[[MethodContext, MaskSpec], Masking]
_REGISTRY: dict[str, dict[str, Any]] = {}


def register(name: str, factory: Factory, *, needs_criterion: bool, granularities: tuple[str, ...],
             needs: str | None = None) -> None:
    _REGISTRY[name] = {"factory": factory, "needs_criterion": needs_criterion, "granularities": granularities,
                       "needs": needs}


def known() -> list[str]:
    return sorted(_REGISTRY)


def info(name: str) -> dict[str, Any]:
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r} (params: evaluate.methods); known: {', '.join(known())}")
    return _REGISTRY[name]


def predictor_dir(ctx: MethodContext, kind: str) -> str:
    from pathlib import Path

    if ctx.predictors_dir is None:
        raise MethodError(f"method {kind} needs evaluate.predictors_dir")
    return str(Path(ctx.predictors_dir) / f"{kind}-{ctx.criterion}")


def _load_predictor(ctx: MethodContext, kind: str):
    key = f"pred/{kind}/{ctx.criterion}"
    if key not in ctx.cache:
        from pipeline.predictors import load_predictor

        pred = load_predictor(predictor_dir(ctx, kind), model_fingerprint=ctx.fingerprint)
        if pred.kind != kind:
            raise MethodError(f"predictor in {predictor_dir(ctx, kind)} is '{pred.kind}', expected '{kind}'")
        ctx.cache[key] = pred.eval()
    return ctx.cache[key]


def _static(ctx: MethodContext, spec: MaskSpec) -> Masking:
    key = f"static/{ctx.criterion}"
    if key not in ctx.cache:
        from pipeline.aggregate import load_static

        if ctx.scores_dir is None:
            raise MethodError("method static needs evaluate.scores_dir")
        ctx.cache[key] = load_static(ctx.scores_dir, ctx.criterion, model_fingerprint=ctx.fingerprint)
    return StaticMasking(ctx, spec, ctx.cache[key])


def _dense(ctx: MethodContext, spec: MaskSpec) -> Masking:
    from pipeline.evaluate.forward import dense_masking

    return dense_masking()


register("dense", _dense, needs_criterion=False, granularities=GRANULARITIES)
register("static", _static, needs_criterion=True, granularities=GRANULARITIES, needs="scores")
register("oracle", lambda c, s: OracleMasking(c, s), needs_criterion=True, granularities=("per_sequence",))
register("shadowllm", lambda c, s: ShadowLLMMasking(c, s, _load_predictor(c, "shadowllm")),
         needs_criterion=True, granularities=GRANULARITIES, needs="predictor")
register("dejavu", lambda c, s: DejaVuMasking(c, s, _load_predictor(c, "dejavu")),
         needs_criterion=True, granularities=GRANULARITIES, needs="predictor")
register("dejavu_lookahead", lambda c, s: DejaVuMasking(c, s, _load_predictor(c, "dejavu_lookahead")),
         needs_criterion=True, granularities=GRANULARITIES, needs="predictor")


def build(name: str, ctx: MethodContext, spec: MaskSpec) -> Masking:
    """A bound `Masking` of method `name` at `spec` (dense when the spec prunes nothing)."""
    meta = info(name)
    if meta["needs_criterion"] and not ctx.criterion:
        raise MethodError(f"method {name} needs a criterion (params: evaluate.methods)")
    if ctx.granularity not in meta["granularities"]:
        raise MethodError(f"method {name} supports granularity {', '.join(meta['granularities'])}, "
                          f"not {ctx.granularity} (params: evaluate.granularity)")
    return meta["factory"](ctx, spec)
