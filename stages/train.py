"""DVC stage `train`: traces (features) + scores (targets) -> one predictor per (kind, criterion),
held-out ranking metrics beside two baselines, training curves, a Markdown report.

shadowllm train --params params.yaml --traces data/traces --scores data/scores --out data/predictors \
    --metrics results/train.json --plots results/plots/train --report results/train_report.md \
    --tables results/train_tables.json

Criteria trained: `aggregate.targets` (one place to swap the criterion); everything else: `train.*`.
Writes <out>/<kind>-<criterion>/{model.safetensors,config.json} and <plots>/<kind>-<criterion>.{csv,png}
(DVC plot: one row per epoch) beside the files of --report, --metrics and --tables.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import load_params, params_option, path, reported, set_option


@click.command("train")
@params_option
@path("--traces", "traces_dir", "trace directory (features)", required=True, kind="dir")
@path("--scores", "scores_dir", "scores directory (targets)", required=True, kind="dir")
@path("--out", "out_dir", "predictor directory to write", required=True, kind="dir")
@path("--metrics", "metrics_path", "metrics JSON to write", required=True, kind="file")
@path("--plots", "plots_dir", "training-curve directory", required=True, kind="dir")
@path("--report", "report_path", "Markdown report (default: <out>/report.md)", kind="file")
@path(
    "--tables",
    "tables_path",
    "every held-out metric, size and training record as JSON (default: <metrics>_tables.json); "
    "--metrics holds the headline figures only",
    kind="file",
)
@set_option
def cli(
    params_path: Path,
    traces_dir: Path,
    scores_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    report_path: Path | None,
    tables_path: Path | None,
    overrides: tuple[str, ...],
) -> None:
    """Train every predictor kind on every target criterion and measure held-out ranking quality."""
    from pipeline import aggregate as agg
    from pipeline.io import write_json, write_text
    from pipeline.predictors.params import TrainParams
    from pipeline.predictors.report import headlines, report
    from pipeline.predictors.training import open_inputs, train_all
    from pipeline.tracking import stage_run

    with reported():
        params = load_params(params_path, overrides)
        p, criteria = TrainParams.from_params(params), agg.AggregateParams.from_params(params).targets
        traces, ids = open_inputs(p, criteria, traces_dir, scores_dir)
        model_meta = traces.meta["model"]
        with stage_run("train", tags={"model_fingerprint": model_meta["fingerprint"]}) as run:
            run.log_params({"train": p.as_dict(), "targets": criteria, "trace_params_hash": traces.meta["params_hash"]})
            metrics = train_all(
                p, params["train"], criteria, traces, ids, scores_dir, out_dir, plots_dir, run.log_metrics, click.echo
            )
            report_file = report_path or out_dir / "report.md"
            write_text(report_file, report(metrics, p, criteria, model_meta.get("id")))
            tables = tables_path or metrics_path.with_name(f"{metrics_path.stem}_tables.json")
            write_json(tables, metrics)
            write_json(metrics_path, headlines(metrics, p.sparsities))
            for artifact in (report_file, metrics_path, tables, plots_dir):
                run.log_artifact(artifact)
