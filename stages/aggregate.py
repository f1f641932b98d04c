"""`aggregate` stage: traces -> static scores of every collected criterion, per-example predictor
targets (per-layer min-max) of `aggregate.targets`, and a layer x unit heat map of `aggregate.heatmap`.

    python -m stages.aggregate --params params.yaml --traces results/traces --out results/scores \
        --plots results/plots/aggregate
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline import criteria as crit
from pipeline.params import ParamError, load, require, section

DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class AggregateParams:
    targets: list[str]
    heatmap: str
    dtype: str


def check_target(name: str, where: str, collected: list[str]) -> str:
    """A criterion usable as a predictor target: known, predictable, collected."""
    if not isinstance(name, str) or name not in crit.CRITERIA:
        raise ParamError(f"parameter {where}: unknown criterion {name!r}; known: {', '.join(sorted(crit.CRITERIA))}")
    if not crit.CRITERIA[name].predictable:
        raise ParamError(f"parameter {where}: criterion '{name}' is static-only and cannot be a predictor target")
    if name not in collected:
        raise ParamError(
            f"parameter {where}: criterion '{name}' is not in the traces (collected: {', '.join(collected)}); "
            "add it to collect.criteria"
        )
    return name


def parse_params(params: dict[str, Any], collected: list[str]) -> AggregateParams:
    sec = section(params, "aggregate")
    targets = require(sec, "targets", "aggregate", list)
    if not targets:
        raise ParamError("parameter aggregate.targets must name at least one criterion")
    targets = [check_target(t, "aggregate.targets", collected) for t in targets]
    if len(set(targets)) != len(targets):
        raise ParamError(f"parameter aggregate.targets has duplicates: {targets}")
    heatmap = sec.get("heatmap", targets[0])
    if heatmap not in collected:
        raise ParamError(
            f"parameter aggregate.heatmap: criterion {heatmap!r} is not in the traces "
            f"(collected: {', '.join(collected)})"
        )
    dtype = sec.get("target_dtype", "float32")
    if dtype not in DTYPES:
        raise ParamError(f"parameter aggregate.target_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return AggregateParams(targets, heatmap, dtype)


def heatmap(static: dict[str, np.ndarray], criterion: str, path: Path) -> None:
    """Layer x unit image of static scores (each layer min-max scaled, so every row uses the full colour range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.aggregate import minmax_per_layer
    from pipeline.io import atomic_path

    units = list(static)
    fig, axes = plt.subplots(1, len(units), figsize=(6 * len(units), 4), squeeze=False)
    for ax, unit in zip(axes[0], units):
        img = ax.imshow(
            minmax_per_layer(static[unit][None])[0],
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            origin="lower",
        )
        ax.set(xlabel=unit[:-1] + " index", ylabel="layer", title=f"{criterion}: static {unit} (per-layer min-max)")
        fig.colorbar(img, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(params_path: str, traces_dir: str, out_dir: str, plots_dir: str | None = None) -> dict[str, Any]:
    from pipeline.traces import Traces

    params = load(params_path)
    traces = Traces.open(traces_dir)  # metadata only: shards are read column by column below
    p = parse_params(params, traces.criteria)

    from pipeline import aggregate as agg
    from pipeline.tracking import stage_run

    out = Path(out_dir)
    with stage_run("aggregate", tags={"model_fingerprint": traces.meta["model"]["fingerprint"]}) as mlrun:
        mlrun.log_params({"aggregate": section(params, "aggregate"), "trace_params_hash": traces.meta["params_hash"]})
        static = {c: agg.static_scores(traces, c) for c in traces.criteria}
        raw_static = {c: agg.static_scores(traces, c, raw=True) for c in traces.criteria}
        targets, non_finite = {}, {}
        for c in p.targets:
            targets[c], non_finite[c] = agg.targets(traces, c)
            if non_finite[c]:
                click.echo(f"aggregate: {non_finite[c]} non-finite {c} scores clipped to their layer's range", err=True)
        meta = agg.scores_meta(traces, list(static), p.targets, non_finite=non_finite)
        agg.save_scores(out, static, targets, meta, dtype=p.dtype, raw_static=raw_static)
        png = Path(plots_dir or out) / f"heatmap-{p.heatmap}.png"
        heatmap(static[p.heatmap], p.heatmap, png)
        metrics = {"n_examples": meta["n_examples"], "non_finite": non_finite}
        mlrun.log_metrics(metrics)
        mlrun.log_artifact(out / agg.META_FILE)
        mlrun.log_artifact(png)
    click.echo(
        f"aggregate: {meta['n_examples']} examples; static {', '.join(static)}; targets {', '.join(p.targets)} -> {out}"
    )
    return meta


@click.command("aggregate")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option(
    "--traces", "traces_dir", required=True, type=click.Path(file_okay=False), help="trace directory (collect)"
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="scores directory to write")
@click.option(
    "--plots",
    "plots_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="directory for the heat map (default: --out; keep it outside --out so that changing "
    "aggregate.heatmap does not invalidate the scores)",
)
def cli(params_path: str, traces_dir: str, out_dir: str, plots_dir: str | None) -> None:
    """Static importance and per-layer-normalised predictor targets from the traces."""
    try:
        run(params_path, traces_dir, out_dir, plots_dir)
    except (ParamError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    cli()
