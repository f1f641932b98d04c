"""DVC stage `aggregate`: traces -> static scores of every collected criterion, per-example predictor
targets (per-layer min-max) of `aggregate.targets`, and a layer x unit heat map of `aggregate.heatmap`.

shadowllm aggregate --params params.yaml --traces data/traces --out data/scores --plots results/plots/aggregate
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import load_params, params_option, path, reported, set_option


@click.command("aggregate")
@params_option
@path("--traces", "traces_dir", "trace directory (collect)", required=True, kind="dir")
@path("--out", "out_dir", "scores directory to write", required=True, kind="dir")
@path(
    "--plots",
    "plots_dir",
    "directory for the heat map (default: --out; "
    "keep it outside --out so that changing aggregate.heatmap does not invalidate the scores)",
    kind="dir",
)
@set_option
def cli(params_path: Path, traces_dir: Path, out_dir: Path, plots_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Static importance and per-layer-normalised predictor targets from the traces."""
    from pipeline import aggregate as agg
    from pipeline.tracking import stage_run

    with reported():
        p = agg.AggregateParams.from_params(load_params(params_path, overrides))
        traces = agg.open_traces(traces_dir)  # metadata only: shards are read column by column
        p.check_collected(traces.criteria)
        with stage_run("aggregate", tags={"model_fingerprint": traces.meta["model"]["fingerprint"]}) as run:
            run.log_params({"aggregate": p.as_dict(), "trace_params_hash": traces.meta["params_hash"]})
            meta, static = agg.aggregate(traces, p, out_dir)
            for c, n in meta["non_finite"].items():
                if n:
                    click.echo(f"aggregate: {n} non-finite {c} scores clipped to their layer's range", err=True)
            png = (plots_dir or out_dir) / f"heatmap-{p.heatmap}.png"
            agg.heatmap(static[p.heatmap], p.heatmap, png)
            run.log_metrics({"n_examples": meta["n_examples"], "non_finite": meta["non_finite"]})
            run.log_artifact(out_dir / agg.META_FILE)
            run.log_artifact(png)
    click.echo(
        f"aggregate: {meta['n_examples']} examples; static {', '.join(static)}; "
        f"targets {', '.join(p.targets)} -> {out_dir}"
    )
