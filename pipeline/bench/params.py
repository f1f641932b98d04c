"""`benchmark:` of params.yaml as one typed schema (no defaults here: params.yaml holds them)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from pipeline.params import ParamError, Section, at_least, fraction, nonempty

from . import shapes
from .predictors import PredictorSpec

Method = Literal["dense", "static", "shadowllm", "dejavu", "teal", "wina", "cats", "griffin"]

# benchmark predictor -> the train stage's predictor kind whose widths `widths_from_train` takes
TRAIN_KIND = {"shadowllm": "shadowllm", "dejavu": "dejavu_lookahead"}


def _check_model(name: str, where: str) -> None:
    try:
        shapes.get(name)
    except KeyError as e:
        raise ParamError(f"parameter {where}: {e.args[0]}") from None


@dataclass(frozen=True)
class Widths(Section):
    """Predictor widths, named as in `train.widths` (rank 0: full-rank output layer)."""

    hidden_heads: int = at_least(1)
    hidden_neurons: int = at_least(1)
    rank_heads: int = at_least(0)
    rank_neurons: int = at_least(0)

    @property
    def spec(self) -> PredictorSpec:
        return PredictorSpec(self.hidden_heads, self.hidden_neurons, self.rank_neurons, self.rank_heads)


@dataclass(frozen=True)
class Extra(Section):
    """One ablation, reported apart. `batch`, `overlap`, `pdl`, `shadowllm`, `dejavu` may be left out (null):
    then it is measured as the main grid is (batch 1, `benchmark.overlap`, PDL on, `benchmark.<predictor>`
    widths)."""

    INHERITED: ClassVar[tuple[str, ...]] = ("batch", "overlap", "pdl", "shadowllm", "dejavu")
    name: str
    model: str
    method: Method
    sparsity: float = fraction()
    batch: int | None = at_least(1, max=16)
    overlap: bool | None
    pdl: bool | None
    shadowllm: Widths | None
    dejavu: Widths | None

    @classmethod
    def from_mapping(cls, sec: dict[str, Any], where: str) -> Extra:
        return super().from_mapping({**dict.fromkeys(cls.INHERITED), **sec}, where)

    def check(self, where: str) -> None:
        _check_model(self.model, f"{where}.model")


@dataclass(frozen=True)
class ProfilePoint(Section):
    """A batch-1 configuration of the summary model profiled per part."""

    method: Method
    sparsity: float = fraction()


@dataclass(frozen=True)
class Thresholders(Section):
    """The thresholders' grid (issue 12 item 3): each method at each per-tensor (per-unit) sparsity and batch,
    with its measured byte sparsity; dense of the same batch is measured with it where the main grid has none."""

    models: list[str]
    methods: list[Method] = nonempty()
    sparsities: list[float] = fraction(nonempty=True)
    batches: list[int] = at_least(1, max=16, nonempty=True)
    sweep_tiles: bool  # sweep the thresholded column GEMV's tiles (thr_col, thr_col_dot) on decode steps first

    def check(self, where: str) -> None:
        for i, m in enumerate(self.models):
            _check_model(m, f"{where}.models[{i}]")


@dataclass(frozen=True)
class BenchmarkParams(Section):
    """`benchmark:` — what the GPU decode-latency benchmark measures, and how."""

    SECTION: ClassVar[str] = "benchmark"
    models: list[str] = nonempty()
    methods: list[Method] = nonempty()
    sparsities: list[float] = fraction(nonempty=True)
    batches: list[int] = at_least(1, max=16, nonempty=True)
    batch_models: list[str]
    prompt_len: int = at_least(1)
    gen_len: int = at_least(1)
    warmup_steps: int = at_least(0)
    repeats: int = at_least(1)
    overlap: bool
    shadowllm: Widths
    dejavu: Widths
    widths_from_train: bool
    extra: list[Extra]
    thresholders: Thresholders
    compiled_models: list[str]
    profile: list[ProfilePoint]
    sweep_tiles: bool
    micro_model: str | None
    summary_model: str
    time_budget_s: float = at_least(0)
    seed: int = at_least(0)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> BenchmarkParams:
        """The section, with the predictor widths of `train.widths` when `widths_from_train` is set."""
        bp = super().from_params(params)
        if not bp.widths_from_train:
            return bp
        widths = (params.get("train") or {}).get("widths") or {}
        taken = {}
        for name, kind in TRAIN_KIND.items():
            where = f"train.widths.{kind}"
            if not isinstance(widths.get(kind), dict):
                raise ParamError(f"missing parameter {where} (benchmark.widths_from_train is true)")
            taken[name] = Widths.from_mapping(widths[kind], where)
        return replace(bp, **taken)

    def check(self, where: str) -> None:
        for i, m in enumerate(self.models):
            _check_model(m, f"{where}.models[{i}]")
        for i, m in enumerate(self.batch_models):
            _check_model(m, f"{where}.batch_models[{i}]")
        for i, m in enumerate(self.compiled_models):
            _check_model(m, f"{where}.compiled_models[{i}]")
        _check_model(self.summary_model, f"{where}.summary_model")
        if self.micro_model is not None:
            _check_model(self.micro_model, f"{where}.micro_model")

    def uses(self, method: str) -> bool:
        """Whether the grid, an ablation or the thresholders' grid measures `method`."""
        return (
            method in self.methods
            or any(e.method == method for e in self.extra)
            or (bool(self.thresholders.models) and method in self.thresholders.methods)
        )
