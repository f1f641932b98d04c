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
    from pipeline.predictors import predictor_dir, save_predictor
    from pipeline.predictors.fit import evaluate_train_mean
    from pipeline.predictors.params import TrainParams
    from pipeline.predictors.report import headlines, report, summary, write_curves
    from pipeline.predictors.training import Rows, check_inputs, feature_columns, train_predictor
    from pipeline.tracking import stage_run

    with reported():
        params = load_params(params_path, overrides)
        p, criteria = TrainParams.from_params(params), agg.AggregateParams.from_params(params).targets
        traces, scores_meta = agg.open_traces(traces_dir), agg.load_meta(scores_dir)
        check_inputs(p, criteria, traces, scores_meta)
        ids = [str(i) for i in traces.column("example_id")]
        if agg.order_hash(ids) != scores_meta["example_order"]:
            raise agg.InputError("scores rows are not in the traces' example order: rerun the aggregate stage")
        model_meta = traces.meta["model"]
        with stage_run("train", tags={"model_fingerprint": model_meta["fingerprint"]}) as run:
            run.log_params({"train": p.as_dict(), "targets": criteria, "trace_params_hash": traces.meta["params_hash"]})
            feats = {col: traces.array(col) for col in feature_columns(p.kinds)}
            rows = Rows.of(ids, p)
            metrics = {"split": rows.record, "predictors": {}, "train_mean": {}, "ridge": {}}
            plots_dir.mkdir(parents=True, exist_ok=True)
            for c in criteria:
                y = agg.load_targets(scores_dir, c)
                metrics["predictors"][c], metrics["ridge"][c] = {}, {}
                metrics["train_mean"][c] = evaluate_train_mean(
                    y["heads"], y["neurons"], rows.train, rows.val, p.sparsities
                )
                run.log_metrics({f"train_mean-{c}": metrics["train_mean"][c]})
                for k in p.kinds:
                    name = predictor_dir(out_dir, k, c).name

                    def log_epoch(rec: dict[str, float], name: str = name) -> None:
                        run.log_metrics(
                            {f"{name}.{key}": v for key, v in rec.items() if key != "epoch"}, int(rec["epoch"])
                        )

                    t = train_predictor(k, c, feats, y, rows, p, model_meta, on_epoch=log_epoch)
                    metrics["predictors"][c][k], metrics["ridge"][c][k] = t.metrics, t.ridge
                    meta = {
                        "model_id": model_meta.get("id"),
                        "model_fingerprint": model_meta["fingerprint"],
                        "trace_params_hash": traces.meta["params_hash"],
                        "split": rows.record,
                        "metrics": t.metrics,
                        "train": params["train"],
                    }  # as written in params.yaml (config.json unchanged)
                    save_predictor(t.pred, predictor_dir(out_dir, k, c), meta)
                    write_curves(t.result.curves, plots_dir / f"{name}.csv", plots_dir / f"{name}.png", name)
                    run.log_metrics({name: t.metrics, f"ridge-{name}": t.ridge})
                    click.echo(summary(name, t.metrics, t.ridge))
            report_file = report_path or out_dir / "report.md"
            write_text(report_file, report(metrics, p, criteria, model_meta.get("id")))
            tables = tables_path or metrics_path.with_name(f"{metrics_path.stem}_tables.json")
            write_json(tables, metrics)
            write_json(metrics_path, headlines(metrics, p.sparsities))
            for artifact in (report_file, metrics_path, tables, plots_dir):
                run.log_artifact(artifact)


if __name__ == "__main__":
    cli()
