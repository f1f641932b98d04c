"""What the train stage reports: per-epoch curves (CSV for DVC plots, PNG), the Markdown report, the
one-line summary of each trained predictor."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.io import atomic_path
from pipeline.plots import figure, save_png
from pipeline.predictors.params import TrainParams
from pipeline.units import sparsity_key


def write_curves(curves: list[dict[str, float]], csv_path: Path, png_path: Path, title: str) -> None:
    """One row per epoch (from 0) to `csv_path`; loss and selection-slice ρ against epoch to `png_path`."""
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curves[0]))
        w.writeheader()
        w.writerows(curves)
    ep = [r["epoch"] for r in curves]
    fig, (loss, rho) = figure(ncols=2, figsize=(10, 3.5))
    loss.plot(ep, [r["train_loss"] for r in curves], label="train")
    loss.plot(ep, [r["val_loss"] for r in curves], label="selection slice")
    loss.set(xlabel="epoch", ylabel="MSE", yscale="log", title=f"{title}: loss")
    loss.legend()
    rho.plot(ep, [r["val_spearman_heads"] for r in curves], label="heads")
    rho.plot(ep, [r["val_spearman_neurons"] for r in curves], label="neurons")
    rho.set(xlabel="epoch", ylabel="Spearman ρ (joint)", title=f"{title}: selection-slice ρ")
    rho.legend()
    save_png(fig, png_path, dpi=100)


def summary(name: str, m: dict[str, Any], r: dict[str, Any]) -> str:
    """One line on a trained predictor: its held-out ρ, ridge's, the chosen epochs, time and size."""
    t = m["train"]
    return (
        f"train {name}: ρ heads {m['heads']['spearman_joint']:.3f} (joint) "
        f"{m['heads']['spearman_per_layer']:.3f} (per layer), ρ neurons "
        f"{m['neurons']['spearman_joint']:.3f} / {m['neurons']['spearman_per_layer']:.3f} "
        f"[ridge {r['heads']['spearman_joint']:.3f} / {r['heads']['spearman_per_layer']:.3f}, "
        f"{r['neurons']['spearman_joint']:.3f} / {r['neurons']['spearman_per_layer']:.3f}; best epoch "
        f"{t['best_epoch']['heads']} / {t['best_epoch']['neurons']}; {t['seconds']:.0f} s]; "
        f"{m['size']['params']:,} params ({100 * m['size']['share_of_model']:.1f}% of model)"
    )


def headlines(metrics: dict[str, Any], sparsities: list[float]) -> dict[str, Any]:
    """The DVC metrics of the train stage: a few numbers per predictor (held-out joint ρ and recall at the
    middle sparsity, heads and neurons; its size), the two baselines' joint ρ, the split's sizes. The full
    tables (every ρ and recall, training record, sizes) are the stage's `--tables` JSON; same nesting."""
    mid = sorted(sparsities)[len(sparsities) // 2] if sparsities else None
    keys = ["spearman_joint"] + ([f"recall_global_{sparsity_key(mid)}"] if mid is not None else [])

    def units(m: dict[str, Any], keys: list[str]) -> dict[str, Any]:
        return {u: {k: m[u][k] for k in keys} for u in ("heads", "neurons")}

    return {
        "split": {k: metrics["split"][k] for k in ("n_train", "n_val")},
        "predictors": {
            c: {k: {**units(m, keys), "params": m["size"]["params"]} for k, m in by_kind.items()}
            for c, by_kind in metrics["predictors"].items()
        },
        "ridge": {
            c: {k: units(r, ["spearman_joint"]) for k, r in by_kind.items()} for c, by_kind in metrics["ridge"].items()
        },
        "train_mean": {c: units(m, ["spearman_joint"]) for c, m in metrics["train_mean"].items()},
    }


def report(metrics: dict[str, Any], p: TrainParams, criteria: list[str], model_id: str | None) -> str:
    """The Markdown report of the train stage's metrics (`criteria`: `aggregate.targets`)."""
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
        key = f"recall_global_{sparsity_key(mid)}" if mid is not None else None
        rec = f" {h[key]:.3f} / {n[key]:.3f} |" if key is not None else ""
        return (
            f"| {c} | {name} | {h['spearman_joint']:.3f} | {h['spearman_per_layer']:.3f} | "
            f"{n['spearman_joint']:.3f} | {n['spearman_per_layer']:.3f} |{rec} {rest} |"
        )

    for c in criteria:
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
    short = shortfalls(metrics, p.kinds, criteria)
    lines += (
        [f"- {s}" for s in short]
        if short
        else [
            "None: every predictor's held-out ρ (joint and per layer, heads and "
            "neurons) is above the train mean's and at least ridge's."
        ]
    )
    return "\n".join(lines) + "\n"


def shortfalls(metrics: dict[str, Any], kinds: list[str], criteria: list[str]) -> list[str]:
    """One line per (criterion, kind, unit, ρ) where the predictor is not above the train mean or is below ridge."""
    out = []
    for c in criteria:
        for k in kinds:
            for unit in ("heads", "neurons"):
                for key, label in (("spearman_joint", "joint"), ("spearman_per_layer", "per layer")):
                    got = metrics["predictors"][c][k][unit][key]
                    mean, ridge = metrics["train_mean"][c][unit][key], metrics["ridge"][c][k][unit][key]
                    if not got > mean or got < ridge:
                        out.append(
                            f"{c} / {k} / {unit} ρ {label}: {got:.3f} vs train mean {mean:.3f}, ridge {ridge:.3f}"
                        )
    return out
