"""DVC stage `train`: traces (features) + scores (targets) -> one predictor per (kind, criterion),
held-out ranking metrics beside two baselines, training curves, a Markdown report.

shadowllm train --params params.yaml --traces data/traces --scores data/scores --out data/predictors \
    --metrics results/train.json --plots results/plots/train --report results/train_report.md \
    --tables results/train_tables.json

Criteria trained: `aggregate.targets` (one place to swap the criterion); everything else: `train.*`.
Writes <out>/<kind>-<criterion>/{model.safetensors,config.json}, the report (default <out>/report.md), the
headline metrics (--metrics, for `dvc metrics show`) and the full tables (--tables),
<plots>/<kind>-<criterion>.csv (DVC plot: one row per epoch) and .png.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import load_params, params_option, reported, set_option

DIR, FILE = click.Path(file_okay=False, path_type=Path), click.Path(dir_okay=False, path_type=Path)


@click.command("train")
@params_option
@click.option("--traces", "traces_dir", required=True, type=DIR, help="trace directory (features)")
@click.option("--scores", "scores_dir", required=True, type=DIR, help="scores directory (targets)")
@click.option("--out", "out_dir", required=True, type=DIR, help="predictor directory to write")
@click.option("--metrics", "metrics_path", required=True, type=FILE, help="metrics JSON to write")
@click.option("--plots", "plots_dir", required=True, type=DIR, help="training-curve directory")
@click.option("--report", "report_path", default=None, type=FILE, help="Markdown report (default: <out>/report.md)")
@click.option(
    "--tables",
    "tables_path",
    default=None,
    type=FILE,
    help="every held-out metric, size and training record as JSON (default: <metrics>_tables.json); "
    "--metrics holds the headline figures only",
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


if __name__ == "__main__":
    cli()
