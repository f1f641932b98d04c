"""Methods registry: how each compared method turns into hooks for one forward pass (SPEC §5, §7).

| method | masks from | granularity |
|---|---|---|
| `dense` | nothing | - |
| `static` | the train mean of a criterion: mean of the per-layer-normalised targets (`aggregate.load_static`) | fixed |
| `static_raw` | the mean of the raw scores, normalised per layer after the mean (a named variant) | fixed |
| `oracle` | the example's gold context + continuation's true scores (`scoring.score_batch`), one mask per example | per_sequence |
| `shadowllm` | one predictor on layer 0's head outputs, all layers at once | per_token / per_sequence |
| `dejavu` | per-layer predictors on each layer's input (per_sequence: dense-model inputs; per_token: its own) | per_token / per_sequence |
| `dejavu_lookahead` | layer l's predictor on layer l-1's input | per_token / per_sequence |

Every per-sequence mask comes from the context only: the features are read at `ForwardInfo.feat_pos`
(`pipeline.features`, the token `collect` read them at), the mask a shared prefix produced is handed to its
continuations (`ForwardInfo.reuse`), so all candidates of a context are scored by one sparse model.
ShadowLLM runs in one pass: the layer-0 attention hook sees layer 0's (dense) head outputs, predicts every
later layer's scores, builds the keep masks and caches them for the later hooks. DejaVu per_sequence needs
*all* layers' scores before a global (or hybrid) ranking can be made, while each layer's input is only known
once the layers below ran; it runs two passes: a dense pass records every layer's input, the predictions
build the masks, the masked pass applies them (the paper's simulation; tables say "dense inputs"). The raw
static mean and the oracle's scores are min-max normalised per layer (`evaluate.normalize`) before a global
ranking; the train mean and predictor outputs are already on that scale.

Each method here is one `register(MethodSpec(...))` into the `METHODS` registry of `pipeline.evaluate.registry`
(what it needs, its granularities, whether its scores are normalised, its title, its factory); the name lookups
live in `pipeline.evaluate.catalog`, which imports this module and `pipeline.evaluate.thresholds` so that every
built-in method is registered.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.evaluate.forward import ForwardInfo, Masking, MaskState
from pipeline.evaluate.registry import Factory, MethodContext, MethodError, MethodSpec, register
from pipeline.hooks import UnitCapture, UnitMasker
from pipeline.masks import MaskSpec, contextual_masks, keep_mask, static_masks
from pipeline.units import POOLS

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
        self.state: MaskState = {p: None for p in POOLS}  # per_sequence keep masks [B, L, U]

    def head_fn(self, l: int, x: Tensor) -> Tensor | None:
        return self.masks["heads"].get(l)

    def neuron_fn(self, l: int, x: Tensor) -> Tensor | None:
        return self.masks["neurons"].get(l)

    def set_all(self, pool: str, keep: Tensor | None, per_token: bool) -> None:
        """keep [B, (T,) L, U]."""
        if keep is None:
            return
        if not per_token:
            self.state[pool] = keep
        for l in range(keep.shape[-2]):
            self.masks[pool][l] = _expand(keep[..., l, :], per_token)

    def set_layer(self, pool: str, l: int, keep: Tensor | None) -> None:
        """One layer's per-token keep mask [B, T, U]."""
        if keep is not None:
            self.masks[pool][l] = keep.float()

    @classmethod
    def of(cls, state: MaskState) -> _Store:
        store = cls()
        for pool, keep in state.items():
            store.set_all(pool, keep, per_token=False)
        return store


# --------------------------------------------------------------------------------------- methods


class StaticMasking(Masking):
    reuse_context = True

    def __init__(self, ctx: MethodContext, spec: MaskSpec, scores: dict[str, Any], *, normalize: bool):
        self.ctx, self.spec = ctx, spec
        # the train mean is on the predictors' scale (a mean of per-layer-normalised targets) and is
        # ranked as a predictor's output is; the raw mean is normalised per layer first (evaluate.normalize)
        self.keep = static_masks(scores, spec if normalize else replace(spec, normalize="none"))
        self.missing = [p for p in POOLS if spec.s(p) > 0 and scores.get(p) is None]
        self.mult = {p: (None if k is None else k.float()) for p, k in self.keep.items()}

    @contextmanager
    def forward(self, info: ForwardInfo):
        hm, nm = self.mult["heads"], self.mult["neurons"]
        with UnitMasker(
            self.ctx.model,
            self.ctx.layout,
            head_fn=None if hm is None else (lambda l, x: hm[l]),
            neuron_fn=None if nm is None else (lambda l, x: nm[l]),
        ):
            yield None


class ShadowLLMMasking(Masking):
    """One predictor on layer 0's head outputs: per_token at every position, per_sequence at the
    feature token (`ForwardInfo.feat_pos`); per_sequence masks are handed on to continuations."""

    reuse_context = True

    def __init__(self, ctx: MethodContext, spec: MaskSpec, predictor: Any):
        self.ctx, self.spec, self.pred = ctx, spec, predictor
        self.per_token = ctx.granularity == "per_token"

    @contextmanager
    def forward(self, info: ForwardInfo):
        if info.reuse is not None and not self.per_token:
            store = _Store.of(info.reuse)
            with UnitMasker(self.ctx.model, self.ctx.layout, head_fn=store.head_fn, neuron_fn=store.neuron_fn):
                yield store.state
            return
        store = _Store()

        def head_fn(l: int, x4: Tensor) -> Tensor | None:
            if l == 0:
                feats = x4.flatten(-2)  # [B, T, H*D]
                if not self.per_token:
                    feats = _rows_at(feats, info.feature_rows())
                with torch.no_grad():
                    heads, neurons = self.pred.predict_all(feats.float())
                store.set_all("heads", contextual_masks(heads, "heads", self.spec, normalize=False), self.per_token)
                store.set_all(
                    "neurons", contextual_masks(neurons, "neurons", self.spec, normalize=False), self.per_token
                )
            return store.head_fn(l, x4)

        with UnitMasker(self.ctx.model, self.ctx.layout, head_fn=head_fn, neuron_fn=store.neuron_fn):
            yield None if self.per_token else store.state


class DejaVuMasking(Masking):
    """Per-layer predictors on each layer's input (`lookahead`: layer l-1's input predicts layer l).

    per_sequence — "DejaVu (dense inputs)", the paper's simulation: a dense pass records every layer's
    input at the feature token, all layers' predictions make the (global) masks, the masked pass
    applies them; continuations reuse them. Reading dense-model inputs favours DejaVu: a deployed
    DejaVu sees the sparse model's own hidden states.
    per_token — "DejaVu (sparse inputs)": one masked pass; each layer's mask is predicted, per token,
    from the input the sparse model really feeds that layer (or the layer below). A layer's mask is
    needed before the layers above have run, so no global ranking exists: scope `local` only.
    """

    reuse_context = True

    def __init__(self, ctx: MethodContext, spec: MaskSpec, predictor: Any):
        self.ctx, self.spec, self.pred = ctx, spec, predictor
        self.per_token = ctx.granularity == "per_token"
        self.offset = int(getattr(predictor, "offset", 0))
        if self.per_token and spec.scope != "local" and not spec.is_dense:
            raise MethodError(
                f"DejaVu per_token predicts each layer from the sparse model's own input as it is "
                f"reached, so only scope local applies, not {spec.scope} (params: evaluate.scope)"
            )

    def _predict(self, info: ForwardInfo) -> tuple[Tensor, Tensor]:
        """Per-sequence scores [B, L, U] from the dense model's layer inputs at the feature token."""
        L = self.ctx.layout.n_layers
        cap_layers = sorted({l - self.offset for l in self.pred.layers})
        with torch.no_grad(), UnitCapture(self.ctx.model, self.ctx.layout, layer_inputs=True, layers=cap_layers) as cap:
            self.ctx.model(input_ids=info.ids, attention_mask=info.valid.long(), use_cache=False)
        heads, neurons = [], []
        lead = None
        for l in range(L):
            if l in self.pred.layers:
                h = _rows_at(cap.layer_inputs[l - self.offset], info.feature_rows())
                with torch.no_grad():
                    ph, pn = self.pred.predict_layer(l, h.float())
                lead = ph.shape[:-1]
                heads.append(ph)
                neurons.append(pn)
            else:
                heads.append(None)
                neurons.append(None)
        # layers without a predictor (layer 0 of the lookahead variant) stay dense: give them top scores
        dev = info.ids.device
        hs = torch.stack(
            [torch.ones(*lead, self.ctx.layout.n_heads, device=dev) if t is None else t for t in heads], -2
        )
        ns = torch.stack(
            [torch.ones(*lead, self.ctx.layout.ffn_dim, device=dev) if t is None else t for t in neurons], -2
        )
        return hs, ns

    def _layer_keep(self, scores: Tensor, pool: str, l: int) -> Tensor | None:
        """Per-token keep mask [B, T, U] of layer l from its predicted scores (ranked within the layer)."""
        s = self.spec.s(pool)
        if l in self.spec.dense_layers or s == 0.0:
            return None
        return keep_mask(scores.float().unsqueeze(-2), s, "local", dense_layers=())[..., 0, :]

    @contextmanager
    def forward(self, info: ForwardInfo):
        if self.per_token:
            store = _Store()

            def on_input(j: int, h: Tensor) -> None:
                for l in (j + self.offset,):
                    if l in self.pred.layers:
                        with torch.no_grad():
                            ph, pn = self.pred.predict_layer(l, h.float())
                        store.set_layer("heads", l, self._layer_keep(ph, "heads", l))
                        store.set_layer("neurons", l, self._layer_keep(pn, "neurons", l))

            with UnitMasker(
                self.ctx.model,
                self.ctx.layout,
                head_fn=store.head_fn,
                neuron_fn=store.neuron_fn,
                layer_input_fn=on_input,
            ):
                yield None
            return
        if info.reuse is not None:
            store = _Store.of(info.reuse)
        else:
            hs, ns = self._predict(info)
            store = _Store()
            store.set_all("heads", contextual_masks(hs, "heads", self.spec, normalize=False), False)
            store.set_all("neurons", contextual_masks(ns, "neurons", self.spec, normalize=False), False)
        with UnitMasker(self.ctx.model, self.ctx.layout, head_fn=store.head_fn, neuron_fn=store.neuron_fn):
            yield store.state


class OracleMasking(Masking):
    """The example's own true importance: one mask per example from the scores `collect` would compute
    on its gold context + continuation (`ForwardInfo.mask_src`), shared by all its candidates — an
    upper reference, not a method (it reads the gold answer). For a perplexity window: the window's
    own scores. Masks are cached per source sequence, so candidates scored in different batches still
    get the identical mask."""

    reuse_context = True

    def __init__(self, ctx: MethodContext, spec: MaskSpec):
        from pipeline import criteria as crit
        from pipeline.scoring import ScoreSettings

        self.ctx, self.spec = ctx, spec
        self.settings = ScoreSettings(criteria=(ctx.criterion,), layer_inputs=False)
        self.batch_size = ctx.oracle_batch
        self.has_neurons = crit.get(ctx.criterion).neurons is not None
        self._masks: dict[tuple[tuple[int, ...], int], dict[str, Tensor | None]] = {}

    def _compute(self, sources: list[tuple[tuple[int, ...], int]]) -> None:
        from pipeline.scoring import Sequence, score_batch
        from pipeline.traces import head_col, neuron_col

        todo = list(dict.fromkeys(k for k in sources if k not in self._masks))
        lay, c = self.ctx.layout, self.ctx.criterion
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            seqs = [Sequence(f"row{b}", "eval", tuple(t), n) for b, (t, n) in enumerate(chunk)]
            out = score_batch(self.ctx.model, lay, seqs, self.settings)
            B = len(seqs)
            scores = {
                "heads": torch.as_tensor(np.asarray(out[head_col(c)], np.float32).reshape(B, lay.n_layers, lay.n_heads))
            }
            if self.has_neurons:
                scores["neurons"] = torch.as_tensor(
                    np.asarray(out[neuron_col(c)], np.float32).reshape(B, lay.n_layers, lay.ffn_dim)
                )
            keeps = {
                pool: contextual_masks(torch.nan_to_num(scores[pool]), pool, self.spec, normalize=True)
                if pool in scores
                else None
                for pool in POOLS
            }
            for b, key in enumerate(chunk):
                self._masks[key] = {pool: None if k is None else k[b] for pool, k in keeps.items()}

    @contextmanager
    def forward(self, info: ForwardInfo):
        if info.reuse is not None:
            store = _Store.of(info.reuse)
        else:
            if info.mask_src is None:
                raise MethodError("oracle masks need each row's source sequence (ForwardInfo.mask_src)")
            self._compute(info.mask_src)
            store = _Store()
            for pool in POOLS:
                rows = [self._masks[k][pool] for k in info.mask_src]
                store.set_all(pool, None if rows[0] is None else torch.stack(rows).to(info.ids.device), per_token=False)
        with UnitMasker(self.ctx.model, self.ctx.layout, head_fn=store.head_fn, neuron_fn=store.neuron_fn):
            yield store.state


# --------------------------------------------------------------------------------------- registration


def _load_predictor(ctx: MethodContext, kind: str):
    key = f"pred/{kind}/{ctx.criterion}"
    if key not in ctx.cache:
        from pipeline.predictors import load_config, load_predictor, predictor_dir

        if ctx.predictors_dir is None:
            raise MethodError(f"method {kind} needs evaluate.predictors_dir")
        d = predictor_dir(ctx.predictors_dir, kind, ctx.criterion)
        have = load_config(d).get("model_fingerprint")
        if have != ctx.fingerprint:  # a user's mix-up, said as one line (load_predictor refuses it too)
            raise MethodError(
                f"predictor {d} was trained for model fingerprint {have}, not for this model ({ctx.fingerprint}): "
                "retrain it (train stage) or point evaluate.predictors_dir at this model's predictors"
            )
        pred = load_predictor(str(d), model_fingerprint=ctx.fingerprint)
        if pred.kind != kind:
            raise MethodError(f"predictor in {d} is '{pred.kind}', expected '{kind}'")
        ctx.cache[key] = pred.to(next(ctx.model.parameters()).device).eval()
    return ctx.cache[key]


def _static(variant: str) -> Factory:
    def factory(ctx: MethodContext, spec: MaskSpec) -> Masking:
        key = f"static/{variant}/{ctx.criterion}"
        if key not in ctx.cache:
            from pipeline.aggregate import load_static

            if ctx.scores_dir is None:
                raise MethodError("static methods need evaluate.scores_dir")
            ctx.cache[key] = load_static(
                ctx.scores_dir, ctx.criterion, model_fingerprint=ctx.fingerprint, variant=variant
            )
        return StaticMasking(ctx, spec, ctx.cache[key], normalize=variant == "raw_mean")

    return factory


def _dense(ctx: MethodContext, spec: MaskSpec) -> Masking:
    from pipeline.evaluate.forward import dense_masking

    return dense_masking()


def _predicted(cls: type[Masking], kind: str) -> Factory:
    return lambda ctx, spec: cls(ctx, spec, _load_predictor(ctx, kind))


def _dejavu_title(g: str) -> str:
    return "dejavu (dense inputs)" if g == "per_sequence" else "dejavu (sparse inputs)"


register(MethodSpec("dense", _dense, fixed_granularity="none", reference=True))
# static = the mean of the per-example, per-layer-normalised scores (the predictors' "train mean" reference);
# static_raw = the mean of the raw scores (dominated by a few large examples: ranks worse held out, SPEC §4)
register(MethodSpec("static", _static("train_mean"), needs="scores", criterion=True, fixed_granularity="none"))
register(
    MethodSpec(
        "static_raw",
        _static("raw_mean"),
        needs="scores",
        criterion=True,
        fixed_granularity="none",
        normalizes=True,
        title_of=lambda g: "static_raw (raw mean)",
    )
)
register(
    MethodSpec(
        "oracle",
        OracleMasking,
        criterion=True,
        granularities=("per_sequence",),
        fixed_granularity="per_sequence",
        normalizes=True,
        title_of=lambda g: "oracle (gold scores)",
    )
)
register(MethodSpec("shadowllm", _predicted(ShadowLLMMasking, "shadowllm"), needs="predictor", criterion=True))
register(
    MethodSpec(
        "dejavu",
        _predicted(DejaVuMasking, "dejavu"),
        needs="predictor",
        criterion=True,
        title_of=_dejavu_title,
    )
)
register(
    MethodSpec(
        "dejavu_lookahead",
        _predicted(DejaVuMasking, "dejavu_lookahead"),
        needs="predictor",
        criterion=True,
        title_of=lambda g: _dejavu_title(g).replace("dejavu", "dejavu_lookahead"),
    )
)
