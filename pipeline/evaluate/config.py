"""The `evaluate:` params section, validated before any model weights are read.

Every error is one line naming the parameter (ParamError)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import params as P
from pipeline.data import tasks as registry
from pipeline.data.errors import DataError
from pipeline.data.tokenize import add_bos_setting
from pipeline.evaluate import methods as M
from pipeline.masks import NORMALIZE, POOLS, SCOPES, MaskSpec

W = "evaluate"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    criterion: str | None = None

    @property
    def label(self) -> str:
        return self.name if not self.criterion else f"{self.name}-{self.criterion}"


@dataclass
class EvalConfig:
    tasks: list[str]
    limit: dict[str, int | None]
    ppl_task: str | None
    seq_len: int
    max_windows: int | None
    methods: list[MethodSpec]
    sparsities: list[float]
    pools: list[str]
    scope: str
    min_keep: float
    normalize: str
    granularity: str
    batch_size: int
    ppl_batch_size: int
    max_length: int
    num_fewshot: int
    add_bos: bool | str  # model.add_bos: "auto" until the Evaluator resolves it against the tokenizer
    scores_dir: str | None
    predictors_dir: str | None
    cache_dir: str
    mirror_dir: str | None
    calib_fraction: float
    seed: int
    calib_text: dict[str, Any] = field(default_factory=dict)  # collect settings to exclude wikitext calibration
    calibration: dict[str, Any] = field(default_factory=dict)  # the thresholders' calibration sample (collect's split)
    raw: dict[str, Any] = field(default_factory=dict)

    def mask_spec(self, sparsity: float) -> MaskSpec:
        return MaskSpec(
            sparsity={p: (sparsity if p in self.pools else 0.0) for p in POOLS},
            scope=self.scope,
            min_keep=self.min_keep,
            normalize=self.normalize,
        )


def _int_or_none(v: Any, name: str, minimum: int = 1) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise P.ParamError(f"parameter {name} must be an integer >= {minimum} or null, got {v!r}")
    return int(v)


def parse(params: dict[str, Any]) -> EvalConfig:
    """Validate `params` (the whole params.yaml mapping) -> EvalConfig. Raises ParamError."""
    try:
        return _parse(params)
    except DataError as err:
        raise P.ParamError(str(err)) from None


def _parse(params: dict[str, Any]) -> EvalConfig:
    e = P.section(params, W)
    d = params.get("data", {}) or {}
    known_keys = {
        "tasks",
        "limit",
        "perplexity",
        "methods",
        "sparsities",
        "pools",
        "scope",
        "hybrid_min_keep",
        "normalize",
        "granularity",
        "batch_size",
        "max_length",
        "num_fewshot",
        "scores_dir",
        "predictors_dir",
        "cache_dir",
        "calibration_examples",
    }
    if "add_bos" in e:
        raise P.ParamError(
            "parameter evaluate.add_bos was replaced by model.add_bos (auto | true | false): "
            "one BOS policy per model, shared by collect and evaluate"
        )
    unknown = sorted(set(e) - known_keys)
    if unknown:
        raise P.ParamError(f"unknown parameter evaluate.{unknown[0]}; known: {', '.join(sorted(known_keys))}")
    tasks = P.require(e, "tasks", W, list)
    for t in tasks:
        spec = registry.get_task(t, param="evaluate.tasks")
        if spec.kind == "perplexity":
            raise P.ParamError(
                f"parameter evaluate.tasks: {t} is a perplexity task; put it under evaluate.perplexity.task"
            )
    mirror = d.get("mirror_dir")
    try:
        if tasks:
            registry.check_tasks(tasks, mirror, param="evaluate.tasks", mirror_param="data.mirror_dir")
    except DataError as err:
        raise P.ParamError(str(err)) from None
    lim = e.get("limit")
    if isinstance(lim, dict):
        for k in lim:
            if k not in tasks:
                raise P.ParamError(f"parameter evaluate.limit.{k}: not one of evaluate.tasks")
        limit = {t: _int_or_none(lim.get(t), f"evaluate.limit.{t}") for t in tasks}
    else:
        limit = {t: _int_or_none(lim, "evaluate.limit") for t in tasks}
    ppl = e.get("perplexity") or {}
    if not isinstance(ppl, dict):
        raise P.ParamError("parameter evaluate.perplexity must be a mapping (task, seq_len, max_windows) or null")
    ppl_task = ppl.get("task")
    if ppl_task is not None:
        if registry.get_task(ppl_task, param="evaluate.perplexity.task").kind != "perplexity":
            raise P.ParamError(f"parameter evaluate.perplexity.task: {ppl_task} is not a perplexity task")
        try:
            registry.check_tasks([ppl_task], mirror, param="evaluate.perplexity.task", mirror_param="data.mirror_dir")
        except DataError as err:
            raise P.ParamError(str(err)) from None
    seq_len = _int_or_none(ppl.get("seq_len", 512), "evaluate.perplexity.seq_len", 2) or 512
    max_windows = _int_or_none(ppl.get("max_windows"), "evaluate.perplexity.max_windows")
    ppl_batch = _int_or_none(ppl.get("batch_size", 1), "evaluate.perplexity.batch_size") or 1
    if not tasks and ppl_task is None:
        raise P.ParamError(
            "parameter evaluate.tasks is empty and evaluate.perplexity.task is not set: nothing to evaluate"
        )

    methods = []
    for i, m in enumerate(P.require(e, "methods", W, list)):
        if isinstance(m, str):
            name, criterion = (m.split(":", 1) + [None])[:2] if ":" in m else (m, None)
        elif isinstance(m, dict):
            name, criterion = m.get("name"), m.get("criterion")
        else:
            raise P.ParamError(f"parameter evaluate.methods[{i}] must be a name, 'name:criterion' or a mapping")
        try:
            meta = M.info(str(name))
        except M.MethodError as err:
            raise P.ParamError(str(err)) from None
        if meta["needs_criterion"]:
            if not criterion:
                raise P.ParamError(f"parameter evaluate.methods[{i}] ({name}) needs a criterion")
            from pipeline import criteria as crit

            try:
                crit.get(str(criterion))
            except Exception as err:
                raise P.ParamError(f"parameter evaluate.methods[{i}].criterion: {err}") from None
        else:
            criterion = None
        methods.append(MethodSpec(str(name), criterion))
    if not methods:
        raise P.ParamError("parameter evaluate.methods is empty")

    sparsities = P.require(e, "sparsities", W, list)
    sparsities = sorted({P.check_fraction(s, "evaluate.sparsities") for s in sparsities})
    pools = list(e.get("pools", list(POOLS)))
    for p in pools:
        if p not in POOLS:
            raise P.ParamError(f"parameter evaluate.pools: unknown pool {p!r}; known: {', '.join(POOLS)}")
    scope = e.get("scope", "global")
    if scope not in SCOPES:
        raise P.ParamError(f"parameter evaluate.scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    normalize = e.get("normalize", "minmax")
    if normalize not in NORMALIZE:
        raise P.ParamError(f"parameter evaluate.normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    min_keep = e.get("hybrid_min_keep", 0.1)
    if not isinstance(min_keep, (int, float)) or not 0 <= min_keep <= 1:
        raise P.ParamError(f"parameter evaluate.hybrid_min_keep must be in [0, 1], got {min_keep!r}")
    gran = e.get("granularity", "per_sequence")
    if gran not in M.GRANULARITIES:
        raise P.ParamError(f"parameter evaluate.granularity must be one of {', '.join(M.GRANULARITIES)}, got {gran!r}")
    for m in methods:
        if M.info(m.name)["fixed_granularity"] is None and gran not in M.info(m.name)["granularities"]:
            raise P.ParamError(f"parameter evaluate.granularity: {m.name} does not support {gran}")
    batch_size = _int_or_none(e.get("batch_size", 16), "evaluate.batch_size") or 16
    max_length = _int_or_none(e.get("max_length", 2048), "evaluate.max_length", 2) or 2048
    num_fewshot = _int_or_none(e.get("num_fewshot", 0), "evaluate.num_fewshot", 0) or 0
    if "calib_fraction" not in d or "seed" not in d:
        raise P.ParamError("missing parameter data.calib_fraction / data.seed (the calibration/evaluation split)")
    calib_fraction = P.check_fraction(d["calib_fraction"], "data.calib_fraction")
    c = params.get("collect", {}) or {}
    calib_text = {}
    if ppl_task is not None and ppl_task in (c.get("tasks") or []):
        calib_text = {"max_tokens": int(c.get("max_tokens", 256)), "n_per_task": int(c.get("n_per_task", 16))}
    calibration = {}
    if c.get("tasks"):  # teal / cats thresholds: a seeded sample of the calibration sequences collect scores
        calibration = {
            "tasks": list(c["tasks"]),
            "n_per_task": int(c.get("n_per_task", 16)),
            "max_tokens": int(c.get("max_tokens", 256)),
            "num_fewshot": int(c.get("num_fewshot", 0)),
            "n_examples": _int_or_none(e.get("calibration_examples", 64), "evaluate.calibration_examples"),
        }
    for m in methods:
        if M.info(m.name)["needs"] == "calibration" and not calibration:
            raise P.ParamError(
                f"method {m.name} calibrates on collect's calibration split: parameter collect.tasks is missing"
            )
    return EvalConfig(
        tasks=list(tasks),
        limit=limit,
        ppl_task=ppl_task,
        seq_len=seq_len,
        max_windows=max_windows,
        methods=methods,
        sparsities=sparsities,
        pools=pools,
        scope=scope,
        min_keep=float(min_keep),
        normalize=normalize,
        granularity=gran,
        batch_size=batch_size,
        ppl_batch_size=ppl_batch,
        max_length=max_length,
        num_fewshot=num_fewshot,
        add_bos=add_bos_setting(params.get("model") or {}),
        scores_dir=e.get("scores_dir"),
        predictors_dir=e.get("predictors_dir"),
        cache_dir=str(e.get("cache_dir", "results/cache")),
        mirror_dir=mirror,
        calib_fraction=calib_fraction,
        seed=int(d["seed"]),
        calib_text=calib_text,
        calibration=calibration,
        raw=dict(e),
    )
