"""The `collect` stage around `pipeline.collect.collect`: its checked params, the calibration plan, the
trace metadata, and the split record, metrics and summary line that it writes beside the shards.

Deliberately not in `pipeline.collect.CODE_FILES`: an edit here changes no trace shard's hash."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.calibration import CalibrationPlan
from pipeline.collect import CollectParams, CollectStats
from pipeline.data.tasks import check_tasks
from pipeline.data.tokenize import resolve_add_bos
from pipeline.params import DataParams, ModelParams

if TYPE_CHECKING:
    from pipeline.models.loading import Loaded
    from pipeline.scoring import Sequence


def checked_params(params: dict[str, Any]) -> tuple[ModelParams, DataParams, CollectParams]:
    """`model:`, `data:` and `collect:` of params, the tasks checked against the data mirror (no data parsed)."""
    mp, dp, cp = ModelParams.from_params(params), DataParams.from_params(params), CollectParams.from_params(params)
    check_tasks(cp.tasks, dp.mirror_dir, param="collect.tasks", mirror_param="data.mirror_dir")
    return mp, dp, cp


def calibration_plan(mp: ModelParams, dp: DataParams, cp: CollectParams, tokenizer: Any) -> CalibrationPlan:
    """The calibration plan of `data:` / `collect:` with `model.add_bos` resolved against the tokenizer."""
    return CalibrationPlan.of(dp, cp, add_bos=resolve_add_bos(mp.add_bos, tokenizer))


def trace_meta(m: Loaded, mp: ModelParams, plan: CalibrationPlan, splits: list[dict[str, Any]]) -> dict[str, Any]:
    """The metadata `collect` stores with the traces: model record, calibration plan (less the mirror
    location; its resolved add_bos is hashed) and the split records."""
    calibration = {k: v for k, v in asdict(plan).items() if k != "mirror_dir"}
    return {"model": m.meta(mp), "calibration": calibration, "splits": splits}


def split_record(plan: CalibrationPlan, splits: list[dict[str, Any]]) -> dict[str, Any]:
    """`<traces>/split.json`: the seed and fraction of the calibration split, and each task's record."""
    return {"seed": plan.seed, "calib_fraction": plan.calib_fraction, "tasks": splits}


def run_metrics(stats: CollectStats, m: Loaded, seqs: list[Sequence]) -> dict[str, Any]:
    """The stage's metrics JSON. examples/tokens/rates: the work of this run; *_total: the whole trace set
    (reused shards included)."""
    return dict(
        stats.metrics(),
        load_seconds=round(m.load_seconds, 3),
        model_fingerprint=m.fingerprint,
        examples_total=len(seqs),
        tokens_total=sum(len(s.input_ids) for s in seqs),
    )


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries of `metrics` that MLflow logs as metrics (numbers only)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def summary(stats: CollectStats, metrics: dict[str, Any], out_dir: Path) -> str:
    """The line the stage prints at its end."""
    return (
        f"collect: {stats.examples} examples ({stats.resume_line()}), {metrics['examples_per_s']:.2f} ex/s, "
        f"{metrics['tokens_per_s']:.0f} tok/s, {stats.bytes_written / 1e6:.1f} MB -> {out_dir}"
    )
