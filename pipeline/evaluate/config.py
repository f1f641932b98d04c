"""The `evaluate:` params section (`EvaluateParams`, no defaults: params.yaml is their one source) and the
evaluation config built from it with the `model:`, `data:` and `collect:` sections, validated before any
model weights are read. Every error is one line naming the parameter (ParamError)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pipeline.calibration import CalibrationPlan
from pipeline.collect import CollectParams
from pipeline.data import tasks as task_registry
from pipeline.errors import UserError
from pipeline.evaluate.catalog import METHODS
from pipeline.evaluate.registry import MethodSpec
from pipeline.masks import MaskSpec
from pipeline.params import DataParams, ModelParams, ParamError, Section, at_least, fraction, nonempty
from pipeline.units import POOLS


@dataclass(frozen=True)
class PerplexityParams(Section):
    """`evaluate.perplexity:` — the perplexity task (null = none) and its windows."""

    SECTION: ClassVar[str] = "evaluate.perplexity"
    task: str | None
    seq_len: int = at_least(2)
    max_windows: int | None = at_least(1)  # null = the full test text
    batch_size: int = at_least(1)

    def check(self, where: str) -> None:
        if self.task is not None and task_registry.get_task(self.task, param=f"{where}.task").kind != "perplexity":
            raise ParamError(f"parameter {where}.task: {self.task} is not a perplexity task")


@dataclass(frozen=True)
class EvaluateParams(Section):
    """`evaluate:` — which tasks, methods, sparsities and mask settings; where the inputs and the cache live."""

    SECTION: ClassVar[str] = "evaluate"
    tasks: list[str]
    limit: int | dict[str, int | None] | None = at_least(1)  # eval-split examples per task (null = all)
    perplexity: PerplexityParams
    methods: list[str | dict[str, str | None]] = nonempty()  # "name", "name:criterion" or {name, criterion}
    sparsities: list[float] = fraction()
    sparsity_unit: Literal["units", "bytes"]  # what `sparsities` are: each pool's unit share, or weight-byte targets
    pools: list[Literal["heads", "neurons"]] = nonempty()
    scope: Literal["local", "global", "hybrid"]
    hybrid_min_keep: float = field(metadata={"min": 0.0, "max": 1.0})
    normalize: Literal["minmax", "none"]
    granularity: Literal["per_token", "per_sequence"]
    batch_size: int = at_least(1)
    oracle_batch_size: int = at_least(1)  # gold sequences per oracle scoring pass (memory, not results)
    max_length: int = at_least(2)
    num_fewshot: int = at_least(0)
    scores_dir: str | None
    predictors_dir: str | None
    cache_dir: str
    calibration_examples: int | None = at_least(1)  # thresholders' calibration sample (null = all)

    @classmethod
    def from_mapping(cls, sec: dict[str, Any], where: str) -> EvaluateParams:
        if "add_bos" in sec:
            raise ParamError(
                f"parameter {where}.add_bos was replaced by model.add_bos (auto | true | false): "
                "one BOS policy per model, shared by collect and evaluate"
            )
        return super().from_mapping(sec, where)

    def check(self, where: str) -> None:
        for t in self.tasks:
            if task_registry.get_task(t, param=f"{where}.tasks").kind == "perplexity":
                raise ParamError(
                    f"parameter {where}.tasks: {t} is a perplexity task; put it under {where}.perplexity.task"
                )
        if isinstance(self.limit, dict):
            for k, v in self.limit.items():
                if k not in self.tasks:
                    raise ParamError(f"parameter {where}.limit.{k}: not one of {where}.tasks")
                if v is not None and v < 1:
                    raise ParamError(f"parameter {where}.limit.{k} must be >= 1, got {v!r}")
        if not self.tasks and self.perplexity.task is None:
            raise ParamError(
                f"parameter {where}.tasks is empty and {where}.perplexity.task is not set: nothing to evaluate"
            )


@dataclass(frozen=True)
class MethodRef:
    """One entry of `evaluate.methods`: a registered method and its criterion (None where it takes none)."""

    spec: MethodSpec
    criterion: str | None = None

    @classmethod
    def of(cls, name: str, criterion: str | None = None) -> MethodRef:
        return cls(METHODS.get(name, "evaluate.methods"), criterion)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.name if not self.criterion else f"{self.name}-{self.criterion}"


def _method_ref(entry: str | dict[str, Any], where: str) -> MethodRef:
    if isinstance(entry, str):
        name, _, criterion = entry.partition(":")
    else:
        unknown = sorted(set(entry) - {"name", "criterion"})
        if unknown or not isinstance(entry.get("name"), str):
            raise ParamError(f"parameter {where} must be a name, 'name:criterion' or a mapping (name, criterion)")
        name, criterion = entry["name"], entry.get("criterion")
    spec = METHODS.get(name, "evaluate.methods")
    if not spec.criterion:
        return MethodRef(spec)
    if not criterion:
        raise ParamError(f"parameter {where} ({name}) needs a criterion")
    from pipeline import criteria as crit

    try:
        crit.get(criterion)
    except Exception as err:
        raise ParamError(f"parameter {where}.criterion: {err}") from None
    return MethodRef(spec, criterion)


@dataclass(frozen=True)
class EvalConfig:
    """Everything a sweep reads, from the `model:`, `data:`, `evaluate:` and `collect:` sections (the last
    for the thresholders' calibration sample and the perplexity windows collect calibrated on)."""

    model: ModelParams
    data: DataParams
    evaluate: EvaluateParams
    collect: CollectParams
    methods: list[MethodRef]
    add_bos: bool | str  # model.add_bos: "auto" until the Evaluator resolves it against the tokenizer

    @classmethod
    def of(cls, mp: ModelParams, dp: DataParams, ep: EvaluateParams, cp: CollectParams) -> EvalConfig:
        if ep.tasks:
            task_registry.check_tasks(ep.tasks, dp.mirror_dir, param="evaluate.tasks", mirror_param="data.mirror_dir")
        if ep.perplexity.task is not None:
            task_registry.check_tasks(
                [ep.perplexity.task], dp.mirror_dir, param="evaluate.perplexity.task", mirror_param="data.mirror_dir"
            )
        methods = [_method_ref(m, f"evaluate.methods[{i}]") for i, m in enumerate(ep.methods)]
        for m in methods:
            if m.spec.fixed_granularity is None and ep.granularity not in m.spec.granularities:
                raise ParamError(f"parameter evaluate.granularity: {m.name} does not support {ep.granularity}")
            if m.spec.needs == "calibration":  # its thresholds are calibrated on collect's calibration split
                try:
                    task_registry.check_tasks(cp.tasks, dp.mirror_dir, param="collect.tasks")
                except UserError as err:
                    raise ParamError(f"method {m.name} calibrates on collect.tasks' calibration split: {err}") from None
        return cls(mp, dp, ep, cp, methods, mp.add_bos)

    def check_inputs(self) -> None:
        """Preflight: the static scores and predictors the methods read exist (ParamError)."""
        for m in self.methods:
            m.spec.check_artifact(m.criterion, scores_dir=self.scores_dir, predictors_dir=self.predictors_dir)

    # ---- the settings the sweep reads
    tasks = property(lambda self: list(self.evaluate.tasks))
    ppl_task = property(lambda self: self.evaluate.perplexity.task)
    seq_len = property(lambda self: self.evaluate.perplexity.seq_len)
    max_windows = property(lambda self: self.evaluate.perplexity.max_windows)
    ppl_batch_size = property(lambda self: self.evaluate.perplexity.batch_size)
    sparsities = property(lambda self: sorted(set(self.evaluate.sparsities)))
    sparsity_unit = property(lambda self: self.evaluate.sparsity_unit)
    pools = property(lambda self: list(self.evaluate.pools))
    scope = property(lambda self: self.evaluate.scope)
    min_keep = property(lambda self: self.evaluate.hybrid_min_keep)
    normalize = property(lambda self: self.evaluate.normalize)
    granularity = property(lambda self: self.evaluate.granularity)
    batch_size = property(lambda self: self.evaluate.batch_size)
    max_length = property(lambda self: self.evaluate.max_length)
    num_fewshot = property(lambda self: self.evaluate.num_fewshot)
    scores_dir = property(lambda self: self.evaluate.scores_dir)
    predictors_dir = property(lambda self: self.evaluate.predictors_dir)
    cache_dir = property(lambda self: self.evaluate.cache_dir)
    mirror_dir = property(lambda self: self.data.mirror_dir)
    calib_fraction = property(lambda self: self.data.calib_fraction)
    seed = property(lambda self: self.data.seed)

    @property
    def limit(self) -> dict[str, int | None]:
        """Eval-split examples per task (None = all)."""
        lim = self.evaluate.limit
        return {t: lim.get(t) if isinstance(lim, dict) else lim for t in self.evaluate.tasks}

    @property
    def calib_text(self) -> dict[str, int]:
        """The collect settings that say which perplexity windows collect calibrated on ({} if none)."""
        if self.ppl_task is None or self.ppl_task not in self.collect.tasks:
            return {}
        return {"max_tokens": self.collect.max_tokens, "n_per_task": self.collect.n_per_task}

    @property
    def calibration(self) -> dict[str, Any]:
        """The thresholders' calibration sample: collect's calibration split, `evaluate.calibration_examples` of it."""
        c = self.collect
        return {
            "tasks": list(c.tasks),
            "n_per_task": c.n_per_task,
            "max_tokens": c.max_tokens,
            "num_fewshot": c.num_fewshot,
            "n_examples": self.evaluate.calibration_examples,
        }

    def calibration_plan(self, add_bos: bool) -> CalibrationPlan:
        return CalibrationPlan.of(self.data, self.collect, add_bos=add_bos)

    def artifact_hash(self, m: MethodRef) -> str | None:
        """Content hash of what method `m` reads (part of its points' keys), None if it reads nothing."""
        if m.spec.needs == "calibration":  # thresholds depend on the sample (split seed/fraction: task settings)
            return hashlib.sha256(json.dumps(self.calibration, sort_keys=True).encode()).hexdigest()[:16]
        d = m.spec.artifact(m.criterion, scores_dir=self.scores_dir, predictors_dir=self.predictors_dir)
        return None if d is None else _file_hash(list(d.glob("*")))

    def mask_spec(self, sparsity: float) -> MaskSpec:
        return MaskSpec(
            sparsity={p: (sparsity if p in self.pools else 0.0) for p in POOLS},
            scope=self.scope,
            min_keep=self.min_keep,
            normalize=self.normalize,
        )

    def logged(self) -> dict[str, Any]:
        """The parsed sections, as MLflow logs them."""
        return {
            "model": self.model.as_dict(),
            "data": self.data.as_dict(),
            "evaluate": self.evaluate.as_dict(),
            "collect": self.collect.as_dict(),
        }


def _file_hash(paths: list) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def parse(params: dict[str, Any]) -> EvalConfig:
    """Validate `params` (the whole params.yaml mapping) -> EvalConfig. Raises ParamError."""
    try:
        sections = (ModelParams, DataParams, EvaluateParams, CollectParams)
        return EvalConfig.of(*(s.from_params(params) for s in sections))
    except ParamError:
        raise
    except UserError as err:  # an unknown task or method, a missing mirror file: still one line naming it
        raise ParamError(str(err)) from None
