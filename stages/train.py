"""`train` stage: traces (features) + scores (targets) -> one predictor per (kind, criterion),
held-out ranking metrics, training curves, a Markdown report.

    python -m stages.train --params params.yaml --traces results/traces --scores results/scores \
        --out results/predictors --metrics results/metrics/train.json --plots results/plots/train

Criteria trained: `aggregate.targets` (one place to swap the criterion); everything else: `train.*`.
Writes <out>/<kind>-<criterion>/{model.safetensors,config.json}, <out>/report.md (or --report),
<plots>/<kind>-<criterion>.csv (DVC plot: one row per epoch) and .png.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.params import ParamError, check_fraction, load, require, section

if TYPE_CHECKING:
    from pipeline.predictors.fit import FitSettings

WIDTH_KEYS = ("hidden_heads", "hidden_neurons", "rank_heads", "rank_neurons")
FEATURE_COLUMN = {"l0_heads": "feat_l0", "layer_input": "feat_layers"}


@dataclass(frozen=True)
class TrainParams:
    kinds: list[str]
    criteria: list[str]
    widths: dict[str, dict[str, int]]
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    val_fraction: float
    seed: int
    device: str
    sparsities: list[float]
    standardize: bool
    target_transform: str
    select_fraction: float
    ridge_alphas: list[float]


def _int(sec: dict[str, Any], key: str, where: str, minimum: int) -> int:
    v = require(sec, key, where)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ParamError(f"parameter {where}.{key} must be an integer >= {minimum}, got {v!r}")
    return v


def _float(sec: dict[str, Any], key: str, where: str) -> float:
    v = require(sec, key, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ParamError(f"parameter {where}.{key} must be a number >= 0, got {v!r}")
    return float(v)


def parse_params(params: dict[str, Any]) -> TrainParams:
    """Validate `train.*` and `aggregate.targets` (names only: no files are read here)."""
    from pipeline import criteria as crit
    from pipeline.predictors import PREDICTORS
    from pipeline.predictors.fit import TARGET_TRANSFORMS

    sec = section(params, "train")
    kinds = require(sec, "kinds", "train", list)
    if not kinds:
        raise ParamError("parameter train.kinds must name at least one predictor kind")
    for k in kinds:
        if k not in PREDICTORS:
            raise ParamError(f"parameter train.kinds: unknown predictor kind {k!r}; known: {', '.join(PREDICTORS)}")
    criteria = require(section(params, "aggregate"), "targets", "aggregate", list)
    for c in criteria:
        if c not in crit.CRITERIA:
            raise ParamError(
                f"parameter aggregate.targets: unknown criterion {c!r}; known: {', '.join(sorted(crit.CRITERIA))}"
            )
        if not crit.CRITERIA[c].predictable:
            raise ParamError(
                f"parameter aggregate.targets: criterion '{c}' is static-only and cannot be a predictor target"
            )
    all_widths = require(sec, "widths", "train", dict)
    widths = {}
    for k in kinds:
        w = all_widths.get(k)
        if not isinstance(w, dict):
            raise ParamError(
                f"missing parameter train.widths.{k} (hidden_heads, hidden_neurons, rank_heads, rank_neurons)"
            )
        unknown = set(w) - set(WIDTH_KEYS)
        if unknown:
            raise ParamError(
                f"parameter train.widths.{k}: unknown key(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(WIDTH_KEYS)}"
            )
        widths[k] = {
            key: _int(w, key, f"train.widths.{k}", 1)
            if key.startswith("hidden")
            else (_int(w, key, f"train.widths.{k}", 0) if key in w else 0)
            for key in WIDTH_KEYS
        }
    sparsities = require(sec, "sparsities", "train", list)
    sparsities = [check_fraction(s, "train.sparsities") for s in sparsities]
    val_fraction = check_fraction(require(sec, "val_fraction", "train"), "train.val_fraction")
    if val_fraction == 0:
        raise ParamError("parameter train.val_fraction must be > 0 (metrics are measured on the held-out split)")
    device = str(require(sec, "device", "train"))
    if not (device == "cpu" or device.startswith("cuda")):
        raise ParamError(f"parameter train.device must be 'cpu' or 'cuda[:N]', got {device!r}")
    standardize = require(sec, "standardize", "train")
    if not isinstance(standardize, bool):
        raise ParamError(f"parameter train.standardize must be true or false, got {standardize!r}")
    transform = require(sec, "target_transform", "train")
    if transform not in TARGET_TRANSFORMS:
        raise ParamError(
            f"parameter train.target_transform must be one of {', '.join(TARGET_TRANSFORMS)}, got {transform!r}"
        )
    select_fraction = check_fraction(require(sec, "select_fraction", "train"), "train.select_fraction")
    if select_fraction == 0:
        raise ParamError(
            "parameter train.select_fraction must be > 0 "
            "(best-epoch and ridge-α selection use that slice of the training rows)"
        )
    alphas = require(sec, "ridge_alphas", "train", list)
    if not alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 for a in alphas):
        raise ParamError(f"parameter train.ridge_alphas must be a non-empty list of numbers > 0, got {alphas!r}")
    return TrainParams(
        kinds=list(kinds),
        criteria=list(criteria),
        widths=widths,
        epochs=_int(sec, "epochs", "train", 1),
        lr=_float(sec, "lr", "train"),
        weight_decay=_float(sec, "weight_decay", "train"),
        batch_size=_int(sec, "batch_size", "train", 1),
        val_fraction=val_fraction,
        seed=_int(sec, "seed", "train", 0),
        device=device,
        sparsities=sparsities,
        standardize=standardize,
        target_transform=transform,
        select_fraction=select_fraction,
        ridge_alphas=[float(a) for a in alphas],
    )


def fit_settings(p: TrainParams) -> FitSettings:
    """The recipe of `pipeline.predictors.fit` from the parsed params (every field from params.yaml)."""
    from pipeline.predictors.fit import FitSettings

    return FitSettings(
        epochs=p.epochs,
        lr=p.lr,
        weight_decay=p.weight_decay,
        batch_size=p.batch_size,
        val_fraction=p.val_fraction,
        seed=p.seed,
        device=p.device,
        standardize=p.standardize,
        target_transform=p.target_transform,
        select_fraction=p.select_fraction,
        ridge_alphas=tuple(p.ridge_alphas),
    )


def check_inputs(p: TrainParams, traces, scores_meta: dict[str, Any]) -> None:
    """The scores come from these traces, hold every target, and the traces hold every needed feature."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.predictors import PREDICTORS

    if scores_meta["trace_params_hash"] != traces.meta["params_hash"]:
        raise ParamError(
            f"scores were aggregated from traces {scores_meta['trace_params_hash']}, not from these "
            f"({traces.meta['params_hash']}): rerun the aggregate stage"
        )
    for c in p.criteria:
        if c not in scores_meta["targets"]:
            raise ParamError(
                f"parameter aggregate.targets: no targets for '{c}' in the scores "
                f"(have {', '.join(scores_meta['targets'])}): rerun the aggregate stage"
            )
    columns = set(pq.read_schema(traces.shards[0]).names)
    for k in p.kinds:
        col = FEATURE_COLUMN[PREDICTORS[k].input_kind]
        if col not in columns:
            raise ParamError(
                f"parameter train.kinds: '{k}' needs trace column {col}, absent (collect with layer_inputs)"
            )
    if p.device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError(f"parameter train.device is {p.device!r} but no CUDA device is available")


def write_curves(curves: list[dict[str, float]], csv_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curves[0]))
        w.writeheader()
        w.writerows(curves)
    ep = [r["epoch"] for r in curves]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(ep, [r["train_loss"] for r in curves], label="train")
    a.plot(ep, [r["val_loss"] for r in curves], label="selection slice")
    a.set(xlabel="epoch", ylabel="MSE", yscale="log", title=f"{title}: loss")
    a.legend()
    b.plot(ep, [r["val_spearman_heads"] for r in curves], label="heads")
    b.plot(ep, [r["val_spearman_neurons"] for r in curves], label="neurons")
    b.set(xlabel="epoch", ylabel="Spearman ρ (joint)", title=f"{title}: selection-slice ρ")
    b.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def report(metrics: dict[str, Any], p: TrainParams, model_id: str | None) -> str:
    split = metrics["split"]
    mid = sorted(p.sparsities)[len(p.sparsities) // 2] if p.sparsities else None
    lines = [
        f"# Predictor quality — {model_id}",
        "",
        f"Held-out split: {split['n_val']} of {split['n_train'] + split['n_val']} examples (seed {p.seed}), untouched "
        f"by training and by every choice made in it; the {split['n_train']} training rows are split again into "
        f"{split['n_fit']} fit rows and a {split['n_select']}-row selection slice (best epoch, ridge α). "
        "Layers 1..L-1 (layer 0 stays dense). ρ joint = per-example Spearman over all units of layers 1..L-1 "
        "ranked together (the ranking a global mask uses), averaged over examples; ρ layer = mean of the "
        "per-layer ρ (the ranking a local mask uses)."
        + (
            f" Recall = top-k recall of the true kept set at {mid:g} sparsity, global pool, heads / neurons."
            if mid is not None
            else ""
        ),
        "",
        f"Recipe: {p.epochs} epochs, batch {p.batch_size}, AdamW lr {p.lr:g} (cosine), "
        f"weight decay {p.weight_decay:g}, "
        f"input standardisation {'on' if p.standardize else 'off'}, target transform `{p.target_transform}`.",
        "",
        "| criterion | predictor | ρ heads joint | ρ heads layer | ρ neurons joint | ρ neurons layer |"
        + (f" recall@{mid:g} h / n |" if mid is not None else "")
        + " selected h / n | params | MB (fp32) | share of model | share of layer weights |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if mid is not None else "") + "---:|---:|---:|---:|---:|",
    ]

    def row(c: str, name: str, m: dict[str, Any], rest: str) -> str:
        h, n = m["heads"], m["neurons"]
        rec = f" {h[f'recall_global_s{mid:g}']:.3f} / {n[f'recall_global_s{mid:g}']:.3f} |" if mid is not None else ""
        return (
            f"| {c} | {name} | {h['spearman_joint']:.3f} | {h['spearman_per_layer']:.3f} | "
            f"{n['spearman_joint']:.3f} | {n['spearman_per_layer']:.3f} |{rec} {rest} |"
        )

    for c in p.criteria:
        lines.append(row(c, "*train mean (no predictor)*", metrics["train_mean"][c], "– | – | – | – | –"))
        for k in p.kinds:
            m, r = metrics["predictors"][c][k], metrics["ridge"][c][k]
            s, e = m["size"], m["train"]["best_epoch"]
            lines.append(
                row(
                    c,
                    f"*ridge on {k} input*",
                    r,
                    f"α {r['alpha']['heads']:g} / {r['alpha']['neurons']:g} | – | – | – | –",
                )
            )
            lines.append(
                row(
                    c,
                    k,
                    m,
                    f"epoch {e['heads']} / {e['neurons']} | {s['params']:,} | {s['bytes'] / 2**20:.2f} | "
                    f"{100 * s['share_of_model']:.1f}% | {100 * s['share_of_layers']:.1f}%",
                )
            )
    basis = next(iter(next(iter(metrics["predictors"].values())).values()))["size"]["share_basis"]
    lines += [
        "",
        "*train mean*: the mean training target used as every held-out example's prediction (a static "
        "ranking); a predictor is contextual only by what it adds over this row. *ridge*: a linear map from the "
        "predictor's own normalised input to its (transformed) targets, fit on the same rows, α chosen on the "
        "selection slice. *selected*: the best epoch on the selection slice (0 = the starting point, the fit "
        "rows' mean) or ridge's α, heads / neurons.",
        "",
        f"Share of model = predictor parameters / model parameters ({basis}); share of layer weights = "
        "predictor parameters / the decoder layers' q, k, v, o and FFN weights (what a sparse decode reads).",
        "",
        "## Where a predictor does not beat both baselines",
        "",
    ]
    short = shortfalls(metrics, p)
    lines += (
        [f"- {s}" for s in short]
        if short
        else [
            "None: every predictor's held-out ρ (joint and per layer, heads and "
            "neurons) is above the train mean's and at least ridge's."
        ]
    )
    return "\n".join(lines) + "\n"


def shortfalls(metrics: dict[str, Any], p: TrainParams) -> list[str]:
    """One line per (criterion, kind, pool, ρ) where the predictor is not above the train mean or is below ridge."""
    out = []
    for c in p.criteria:
        for k in p.kinds:
            for unit in ("heads", "neurons"):
                for key, label in (("spearman_joint", "joint"), ("spearman_per_layer", "per layer")):
                    got = metrics["predictors"][c][k][unit][key]
                    mean, ridge = metrics["train_mean"][c][unit][key], metrics["ridge"][c][k][unit][key]
                    if not got > mean or got < ridge:
                        out.append(
                            f"{c} / {k} / {unit} ρ {label}: {got:.3f} vs train mean {mean:.3f}, ridge {ridge:.3f}"
                        )
    return out


def run(
    params_path: str,
    traces_dir: str,
    scores_dir: str,
    out_dir: str,
    metrics_path: str,
    plots_dir: str,
    report_path: str | None = None,
) -> dict[str, Any]:
    params = load(params_path)
    p = parse_params(params)

    from pipeline import aggregate as agg
    from pipeline.traces import Traces

    traces = Traces.open(traces_dir)
    scores_meta = agg.load_meta(scores_dir)
    check_inputs(p, traces, scores_meta)

    import torch

    from pipeline.io import write_json, write_text
    from pipeline.predictors import PREDICTORS, build, save_predictor
    from pipeline.predictors.fit import (
        evaluate,
        evaluate_train_mean,
        fit,
        score_predictions,
        selection_split,
        split_indices,
    )
    from pipeline.predictors.ridge import Ridge
    from pipeline.predictors.size import cost
    from pipeline.tracking import stage_run

    model_meta = traces.meta["model"]
    ids = [str(i) for i in traces.column("example_id")]
    if agg.order_hash(ids) != scores_meta["example_order"]:
        raise ValueError("scores rows are not in the traces' example order: rerun the aggregate stage")
    needed = {FEATURE_COLUMN[PREDICTORS[k].input_kind] for k in p.kinds}
    feats = {col: traces.array(col) for col in sorted(needed)}
    train_rows, val_rows = split_indices(len(ids), p.val_fraction, p.seed)
    settings = fit_settings(p)
    fit_rows, select_rows = selection_split(train_rows, settings)
    out, plots = Path(out_dir), Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "split": {
            "n_train": len(train_rows),
            "n_val": len(val_rows),
            "seed": p.seed,
            "val_example_order": agg.order_hash([ids[i] for i in val_rows]),
            "n_fit": len(fit_rows),
            "n_select": len(select_rows),
        },
        "predictors": {},
        "train_mean": {},
        "ridge": {},
    }
    with stage_run("train", tags={"model_fingerprint": model_meta["fingerprint"]}) as mlrun:
        mlrun.log_params({"train": asdict(p), "trace_params_hash": traces.meta["params_hash"]})
        for c in p.criteria:
            y = agg.load_targets(scores_dir, c)
            metrics["predictors"][c], metrics["ridge"][c] = {}, {}
            metrics["train_mean"][c] = evaluate_train_mean(y["heads"], y["neurons"], train_rows, val_rows, p.sparsities)
            mlrun.log_metrics({f"train_mean-{c}": metrics["train_mean"][c]})
            for k in p.kinds:
                name = f"{k}-{c}"
                torch.manual_seed(p.seed)
                pred = build(k, c, model_meta["dims"], p.widths[k])
                x = pred.inputs(feats)
                yh, yn = y["heads"][:, pred.layers], y["neurons"][:, pred.layers]

                def log_epoch(rec: dict[str, float], name: str = name) -> None:
                    mlrun.log_metrics(
                        {f"{name}.{key}": v for key, v in rec.items() if key != "epoch"}, step=int(rec["epoch"])
                    )

                res = fit(pred, x, yh, yn, train_rows, settings, on_epoch=log_epoch)
                m = evaluate(pred, x[val_rows], y["heads"][val_rows], y["neurons"][val_rows], p.sparsities, p.device)
                m["size"] = cost(pred.n_params(), pred.n_bytes(), model_meta)
                m["train"] = {
                    "epochs": p.epochs,
                    "seconds": res.seconds,
                    "best_epoch": res.best_epoch,
                    "selection_score": res.best_score,
                    "final_train_loss": res.curves[-1]["train_loss"],
                    "final_val_loss": res.curves[-1]["val_loss"],
                }
                metrics["predictors"][c][k] = m
                ridge = Ridge.fit(pred, x, yh, yn, res, settings)
                r = score_predictions(
                    pred, *ridge.predict(x[val_rows]), y["heads"][val_rows], y["neurons"][val_rows], p.sparsities
                )
                r["alpha"] = dict(ridge.alpha)
                metrics["ridge"][c][k] = r
                save_predictor(
                    pred.cpu(),
                    out / name,
                    {
                        "model_id": model_meta.get("id"),
                        "model_fingerprint": model_meta["fingerprint"],
                        "trace_params_hash": traces.meta["params_hash"],
                        "train": section(params, "train"),
                        "split": metrics["split"],
                        "metrics": m,
                    },
                )
                write_curves(res.curves, plots / f"{name}.csv", plots / f"{name}.png", name)
                mlrun.log_metrics({name: m, f"ridge-{name}": r})
                click.echo(
                    f"train {name}: ρ heads {m['heads']['spearman_joint']:.3f} (joint) "
                    f"{m['heads']['spearman_per_layer']:.3f} (per layer), ρ neurons "
                    f"{m['neurons']['spearman_joint']:.3f} / {m['neurons']['spearman_per_layer']:.3f} "
                    f"[ridge {r['heads']['spearman_joint']:.3f} / {r['heads']['spearman_per_layer']:.3f}, "
                    f"{r['neurons']['spearman_joint']:.3f} / {r['neurons']['spearman_per_layer']:.3f}; best epoch "
                    f"{res.best_epoch['heads']} / {res.best_epoch['neurons']}; {res.seconds:.0f} s]; "
                    f"{m['size']['params']:,} params ({100 * m['size']['share_of_model']:.1f}% of model)"
                )
        report_file = Path(report_path) if report_path else out / "report.md"
        write_text(report_file, report(metrics, p, model_meta.get("id")))
        write_json(metrics_path, metrics)
        for artifact in (report_file, Path(metrics_path), plots):
            mlrun.log_artifact(artifact)
    return metrics


@click.command("train")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option(
    "--traces", "traces_dir", required=True, type=click.Path(file_okay=False), help="trace directory (features)"
)
@click.option(
    "--scores", "scores_dir", required=True, type=click.Path(file_okay=False), help="scores directory (targets)"
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="predictor directory to write")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False), help="metrics JSON to write")
@click.option("--plots", "plots_dir", required=True, type=click.Path(file_okay=False), help="training-curve directory")
@click.option(
    "--report",
    "report_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Markdown report (default: <out>/report.md)",
)
def cli(
    params_path: str,
    traces_dir: str,
    scores_dir: str,
    out_dir: str,
    metrics_path: str,
    plots_dir: str,
    report_path: str | None,
) -> None:
    """Train every predictor kind on every target criterion and measure held-out ranking quality."""
    try:
        run(params_path, traces_dir, scores_dir, out_dir, metrics_path, plots_dir, report_path)
    except (ParamError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    cli()
