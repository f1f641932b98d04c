"""The train stage's work: inputs checked to belong together (`open_inputs`), the seeded rows, `train_predictor`
— build, fit, evaluate held out, size, and the ridge baseline of one (kind, criterion) — and `train_all`, every
(criterion, kind) with its predictor, curves and metrics written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import aggregate as agg
from pipeline.params import ParamError
from pipeline.predictors.base import Predictor
from pipeline.predictors.fit import (
    FitResult,
    evaluate,
    evaluate_train_mean,
    fit,
    score_predictions,
    selection_split,
    split_indices,
)
from pipeline.predictors.params import TrainParams
from pipeline.predictors.registry import PREDICTORS, build
from pipeline.predictors.report import summary, write_curves
from pipeline.predictors.ridge import Ridge
from pipeline.predictors.size import cost
from pipeline.predictors.store import predictor_dir, save_predictor
from pipeline.predictors.targets import TARGET_TRANSFORMS
from pipeline.traces import Traces


def feature_columns(kinds: list[str]) -> list[str]:
    """The trace columns the predictors of `kinds` read, sorted."""
    return sorted({PREDICTORS.get(k).feature_column for k in kinds})


def check_inputs(params: TrainParams, criteria: list[str], traces: Traces, scores_meta: dict[str, Any]) -> None:
    """The scores come from these traces, hold every target, and the traces hold every needed feature."""
    import pyarrow.parquet as pq

    if scores_meta["trace_params_hash"] != traces.meta["params_hash"]:
        raise ParamError(
            f"scores were aggregated from traces {scores_meta['trace_params_hash']}, not from these "
            f"({traces.meta['params_hash']}): rerun the aggregate stage"
        )
    for c in criteria:
        if c not in scores_meta["targets"]:
            raise ParamError(
                f"parameter aggregate.targets: no targets for '{c}' in the scores "
                f"(have {', '.join(scores_meta['targets'])}): rerun the aggregate stage"
            )
    columns = set(pq.read_schema(traces.shards[0]).names)
    for k in params.kinds:
        col = PREDICTORS.get(k).feature_column
        if col not in columns:
            raise ParamError(
                f"parameter train.kinds: '{k}' needs trace column {col}, absent (collect with layer_inputs)"
            )
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError(f"parameter train.device is {params.device!r} but no CUDA device is available")


@dataclass(frozen=True)
class Rows:
    """The seeded rows: held out (`val`), training (`train`) = fit rows + selection slice."""

    train: np.ndarray
    val: np.ndarray
    fit: np.ndarray
    select: np.ndarray
    record: dict[str, Any]  # the metrics' `split`

    @classmethod
    def of(cls, example_ids: list[str], params: TrainParams) -> Rows:
        train, val = split_indices(len(example_ids), params.val_fraction, params.seed)
        fit_rows, select = selection_split(train, params)
        record = {
            "n_train": len(train),
            "n_val": len(val),
            "seed": params.seed,
            "val_example_order": agg.order_hash([example_ids[i] for i in val]),
            "n_fit": len(fit_rows),
            "n_select": len(select),
        }
        return cls(train, val, fit_rows, select, record)


@dataclass
class Trained:
    """One trained (kind, criterion): the predictor at its best epochs, its held-out metrics (with
    `size` and `train`), its ridge baseline's metrics (with `alpha`) and the fit's curves."""

    pred: Predictor
    metrics: dict[str, Any]
    ridge: dict[str, Any]
    result: FitResult


def train_predictor(
    kind: str,
    criterion: str,
    feats: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    rows: Rows,
    params: TrainParams,
    model_meta: dict[str, Any],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    transformed: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] | None = None,
) -> Trained:
    """Seeded build, `fit` on the training rows, held-out metrics, size, ridge on the same rows. `transformed`:
    a cache of the criterion's targets after `train.target_transform`, by predicted layers (filled here; the
    predictors of one criterion that predict the same layers share one transform)."""
    torch.manual_seed(params.seed)
    pred = build(kind, criterion, model_meta["dims"], params.widths[kind])
    x = pred.inputs(feats)
    yh, yn = targets["heads"][:, pred.layers], targets["neurons"][:, pred.layers]
    cache = {} if transformed is None else transformed
    key = tuple(pred.layers)
    if key not in cache:
        transform = TARGET_TRANSFORMS[params.target_transform]
        cache[key] = (transform(yh), transform(yn))
    res = fit(pred, x, yh, yn, rows.train, params, on_epoch=on_epoch, transformed=cache[key])
    val_h, val_n = targets["heads"][rows.val], targets["neurons"][rows.val]
    m = evaluate(pred, x[rows.val], val_h, val_n, params.sparsities, params.device)
    m["size"] = cost(pred.n_params(), pred.n_bytes(), model_meta)
    m["train"] = {
        "epochs": params.epochs,
        "seconds": res.seconds,
        "best_epoch": res.best_epoch,
        "selection_score": res.best_score,
        "final_train_loss": res.curves[-1]["train_loss"],
        "final_val_loss": res.curves[-1]["val_loss"],
    }
    ridge = Ridge.fit(pred, x, yh, yn, res, params, transformed=cache[key])
    r = score_predictions(pred, *ridge.predict(x[rows.val]), val_h, val_n, params.sparsities, params.device)
    r["alpha"] = dict(ridge.alpha)
    return Trained(pred.cpu(), m, r, res)


def open_inputs(
    params: TrainParams, criteria: list[str], traces_dir: Path, scores_dir: Path
) -> tuple[Traces, list[str]]:
    """The traces and their example ids, checked against the scores (`check_inputs`, same example order)."""
    traces, scores_meta = agg.open_traces(traces_dir), agg.load_meta(scores_dir)
    check_inputs(params, criteria, traces, scores_meta)
    ids = [str(i) for i in traces.column("example_id")]
    if agg.order_hash(ids) != scores_meta["example_order"]:
        raise agg.InputError("scores rows are not in the traces' example order: rerun the aggregate stage")
    return traces, ids


def train_all(
    params: TrainParams,
    train_section: dict[str, Any],
    criteria: list[str],
    traces: Traces,
    ids: list[str],
    scores_dir: Path,
    out_dir: Path,
    plots_dir: Path,
    log_metrics: Callable[..., None],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Every (criterion, kind) of `criteria` x `params.kinds`: trained, saved under `out_dir/<kind>-<criterion>/`
    (its config.json records `train_section`, the params as written), curves under `plots_dir`, metrics logged
    (`log_metrics(dict, step=None)`) and a summary line echoed. Returns the metrics: split, predictors,
    train_mean and ridge per criterion and kind."""
    model_meta = traces.meta["model"]
    feats = {col: traces.array(col) for col in feature_columns(params.kinds)}
    rows = Rows.of(ids, params)
    metrics: dict[str, Any] = {"split": rows.record, "predictors": {}, "train_mean": {}, "ridge": {}}
    plots_dir.mkdir(parents=True, exist_ok=True)
    for c in criteria:
        y = agg.load_targets(scores_dir, c)
        metrics["predictors"][c], metrics["ridge"][c] = {}, {}
        metrics["train_mean"][c] = evaluate_train_mean(
            y["heads"], y["neurons"], rows.train, rows.val, params.sparsities, params.device
        )
        log_metrics({f"train_mean-{c}": metrics["train_mean"][c]})
        transformed: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        for k in params.kinds:
            name = predictor_dir(out_dir, k, c).name

            def log_epoch(rec: dict[str, float], name: str = name) -> None:
                log_metrics({f"{name}.{key}": v for key, v in rec.items() if key != "epoch"}, int(rec["epoch"]))

            t = train_predictor(k, c, feats, y, rows, params, model_meta, log_epoch, transformed)
            metrics["predictors"][c][k], metrics["ridge"][c][k] = t.metrics, t.ridge
            meta = {
                "model_id": model_meta.get("id"),
                "model_fingerprint": model_meta["fingerprint"],
                "trace_params_hash": traces.meta["params_hash"],
                "split": rows.record,
                "metrics": t.metrics,
                "train": train_section,
            }
            save_predictor(t.pred, predictor_dir(out_dir, k, c), meta)
            write_curves(t.result.curves, plots_dir / f"{name}.csv", plots_dir / f"{name}.png", name)
            log_metrics({name: t.metrics, f"ridge-{name}": t.ridge})
            echo(summary(name, t.metrics, t.ridge))
    return metrics
