"""The evaluation methods' registry core: `MethodSpec` (what a method needs and can do), `MethodContext` (what
its factory may use), `MethodError` and the `METHODS` registry that `register(MethodSpec(...))` fills.

A method is one `MethodSpec` in `METHODS`: what it needs (and so what preflight checks and what enters its
cache key), its granularities, whether its scores are normalised, its table title and the factory that builds
its `Masking`; callers ask the spec, never the name. The built-in methods register themselves where they are
defined (`pipeline.evaluate.methods`: the unit-mask methods, `pipeline.evaluate.thresholds`: the
thresholders); `pipeline.evaluate.catalog` imports both and holds the name lookups, so look methods up
through it. Adding a method touches its own module only (a new built-in module: plus its import in `catalog`;
tests/test_method_registry.py registers one from a test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from pipeline.errors import UserError
from pipeline.evaluate.forward import Masking
from pipeline.masks import MaskSpec
from pipeline.models.adapters import Layout
from pipeline.registry import Registry
from pipeline.units import POOLS

GRANULARITIES = ("per_token", "per_sequence")


class MethodError(UserError):
    """A bad method configuration; the message names the parameter."""


@dataclass
class MethodContext:
    """What a method may need: the model, its layout and fingerprint, where scores/predictors live."""

    model: nn.Module
    layout: Layout
    fingerprint: str
    scores_dir: str | None  # evaluate.scores_dir / predictors_dir; None where no method needs them
    predictors_dir: str | None
    criterion: str | None  # the method being built's (the runner sets it per method)
    granularity: str  # per_token | per_sequence, likewise
    calibration: Callable[[], list[list[int]]] | None  # thresholders' calibration token lists
    oracle_batch: int  # gold sequences per oracle scoring pass (evaluate.oracle_batch_size)
    cache: dict[str, Any] = field(default_factory=dict)  # loaded predictors / static scores


Factory = Callable[[MethodContext, MaskSpec], Masking]
Needs = Literal["nothing", "scores", "predictor", "calibration"]


@dataclass(frozen=True)
class MethodSpec:
    """One evaluation method and what it can do; callers ask it, never the method's name.

    `needs`: "scores" (the aggregate stage's `evaluate.scores_dir`), "predictor" (a trained predictor of
    `predictor_kind` under `evaluate.predictors_dir`, `pipeline.predictors.predictor_dir`), "calibration"
    (a seeded sample of collect's calibration split) or "nothing". `criterion`: it is configured as
    `name:criterion`. `fixed_granularity`: the granularity it always has ("none": masks fixed per model),
    else `evaluate.granularity` applies (one of `granularities`). `normalizes`: its raw scores are made
    comparable across layers by `evaluate.normalize` (part of its cache key). `reference`: the unpruned
    model, evaluated once at sparsity 0, with no mask settings in its key. `title_of(granularity)`: what
    tables call it (default: its name). `factory(ctx, spec)` builds its `Masking`. `prunes`: the pools it can
    sparsify (CATS and GRIFFIN: neurons only); `skips`: how its masks save weight bytes
    (`pipeline.evaluate.thresholds.WeightBytes.skippable`: "units" = head/neuron masks known before the layer
    runs, "inputs" = input channels of every linear, "gated_neurons" = CATS' up rows and down columns), which
    `evaluate.sparsity_unit: bytes` uses to solve its unit sparsity for a byte-sparsity target."""

    name: str
    factory: Factory
    needs: Needs = "nothing"
    criterion: bool = False
    granularities: tuple[str, ...] = GRANULARITIES
    fixed_granularity: str | None = None
    normalizes: bool = False
    reference: bool = False
    predictor_kind: str | None = None
    title_of: Callable[[str], str] | None = None
    prunes: tuple[str, ...] = POOLS
    skips: Literal["units", "inputs", "gated_neurons"] = "units"

    def __post_init__(self):
        if self.needs == "predictor" and self.predictor_kind is None:
            object.__setattr__(self, "predictor_kind", self.name)

    def granularity(self, configured: str) -> str:
        """The granularity it runs at when `evaluate.granularity` is `configured`."""
        return self.fixed_granularity or configured

    def title(self, criterion: str | None, gran: str) -> str:
        """Its name in tables: e.g. 'dejavu-l2_norm (dense inputs)'."""
        t = self.title_of(gran) if self.title_of else self.name
        if not criterion:
            return t
        base, _, note = t.partition(" ")
        return f"{base}-{criterion}" + (f" {note}" if note else "")

    def artifact(self, criterion: str | None, *, scores_dir: str | None, predictors_dir: str | None) -> Path | None:
        """The directory of what it reads (static scores, its predictor), None if it reads none or the
        directory parameter is unset."""
        if self.needs == "scores":
            return None if scores_dir is None else Path(scores_dir)
        if self.needs == "predictor":
            from pipeline.predictors import predictor_dir

            return None if predictors_dir is None else predictor_dir(predictors_dir, self.predictor_kind, criterion)
        return None

    def check_artifact(self, criterion: str | None, *, scores_dir: str | None, predictors_dir: str | None) -> None:
        """Preflight: what it reads exists (ParamError naming the parameter, before any weights are read)."""
        from pipeline.params import ParamError

        param = {"scores": "evaluate.scores_dir", "predictor": "evaluate.predictors_dir"}.get(self.needs)
        if param is None:
            return
        label = f"{self.name}-{criterion}" if criterion else self.name
        d = self.artifact(criterion, scores_dir=scores_dir, predictors_dir=predictors_dir)
        if d is None:
            raise ParamError(f"parameter {param} is required by method {label}")
        if self.needs == "scores" and not (d / "scores.json").is_file():
            raise ParamError(f"parameter {param}: {d}/scores.json not found (run the aggregate stage first)")
        if self.needs == "predictor" and not d.is_dir():
            raise ParamError(
                f"parameter {param}: no predictor {d} for method {label} "
                f"(run the train stage for {self.predictor_kind} with criterion {criterion})"
            )

    def build(self, ctx: MethodContext, spec: MaskSpec) -> Masking:
        """A bound `Masking` at `spec` (dense when the spec prunes nothing)."""
        if self.criterion and not ctx.criterion:
            raise MethodError(f"method {self.name} needs a criterion (params: evaluate.methods)")
        if ctx.granularity not in self.granularities:
            raise MethodError(
                f"method {self.name} supports granularity {', '.join(self.granularities)}, "
                f"not {ctx.granularity} (params: evaluate.granularity)"
            )
        return self.factory(ctx, spec)


METHODS: Registry[MethodSpec] = Registry("method", error=MethodError)


def register(spec: MethodSpec) -> MethodSpec:
    return METHODS.register(spec.name, spec)
