"""Outputs of a sweep: tidy results CSV, DVC metrics JSON, plot data + PNGs, Markdown report."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.evaluate.catalog import is_reference
from pipeline.io import write_json, write_text
from pipeline.units import sparsity_key

COLUMNS = [
    "model",
    "method",
    "criterion",
    "sparsity",
    "granularity",
    "task",
    "metric",
    "value",
    "n",
    "stderr",
    "scope",
    "effective_sparsity_heads",
    "effective_sparsity_neurons",
    "seconds",
    "byte_sparsity",
    "byte_sparsity_std",
]
SUMMARY_COLUMNS = [  # summary.csv: one row per (method label, sparsity)
    "label",
    "method",
    "criterion",
    "sparsity",
    "granularity",
    "eff_heads",
    "eff_neurons",
    "byte_sparsity",
    "byte_sparsity_std",
    "byte_net",
    "mean_acc",
    "mean_acc_stderr",
    "mean_acc_norm",
    "n_examples",
    "word_perplexity",
    "token_perplexity",
    "ppl_windows",
]
PPL_METRIC = "word_perplexity"
SMOKE_STDERR = 0.015  # mean-accuracy stderr above which a report says it cannot rank methods


def tidy_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        sd = r.get("sparsity_detail", {})
        for metric, v in r["metrics"].items():
            rows.append(
                {
                    "model": r["model"],
                    "method": r["method"],
                    "criterion": r["criterion"],
                    "sparsity": r["sparsity"],
                    "granularity": r["granularity"],
                    "task": r["task"],
                    "metric": metric,
                    "value": v["value"],
                    "n": v["n"],
                    "stderr": ""
                    if v.get("stderr") is None or (isinstance(v["stderr"], float) and math.isnan(v["stderr"]))
                    else v["stderr"],
                    "scope": r.get("scope", ""),
                    "effective_sparsity_heads": sd.get("heads", {}).get("effective", 0.0),
                    "effective_sparsity_neurons": sd.get("neurons", {}).get("effective", 0.0),
                    "seconds": round(float(r.get("seconds", 0.0)), 2),
                    "byte_sparsity": _get(sd, "bytes", "byte_sparsity", "mean"),
                    "byte_sparsity_std": _get(sd, "bytes", "byte_sparsity", "std"),
                }
            )
    rows.sort(key=lambda x: (x["method"], x["criterion"], x["sparsity"], x["task"], x["metric"]))
    return rows


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return "" if d is None else d


def pooled_bytes(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """Byte sparsity of one (method, sparsity) over all its tasks' tokens (docs/thresholds.md): the token-weighted
    mean, the spread over the pooled tokens, and the mean net of the predictor share. None if no record has it."""
    parts = [r["sparsity_detail"]["bytes"] for r in records if "bytes" in r.get("sparsity_detail", {})]
    parts = [b for b in parts if b["byte_sparsity"]["n_tokens"]]
    if not parts:
        return None
    n = sum(b["byte_sparsity"]["n_tokens"] for b in parts)
    mean = sum(b["byte_sparsity"]["n_tokens"] * b["byte_sparsity"]["mean"] for b in parts) / n
    sq = (
        sum(
            b["byte_sparsity"]["n_tokens"] * (b["byte_sparsity"]["std"] ** 2 + b["byte_sparsity"]["mean"] ** 2)
            for b in parts
        )
        / n
    )
    return {
        "byte_sparsity": mean,
        "byte_sparsity_std": math.sqrt(max(sq - mean * mean, 0.0)),
        "byte_net": mean - parts[0]["predictor_share"],
    }


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in columns})
    write_text(path, buf.getvalue())


def _primary(metrics: dict[str, Any]) -> tuple[str, dict] | None:
    """acc_norm where the task reports it, else acc (the per-task accuracy averaged in `mean_acc_norm`)."""
    for m in ("acc_norm", "acc"):
        if m in metrics:
            return m, metrics[m]
    return None


def summary(records: list[dict[str, Any]], tasks: list[str], ppl_task: str | None) -> list[dict[str, Any]]:
    """One row per (method label, sparsity): mean acc, mean acc_norm-or-acc over tasks, perplexities, n."""
    by: dict[tuple[str, float], dict[str, Any]] = defaultdict(dict)
    meta: dict[tuple[str, float], dict[str, Any]] = {}
    for r in records:
        k = (r["label"], float(r["sparsity"]))
        by[k][r["task"]] = r
        meta[k] = r
    out = []

    def order(kv: tuple) -> tuple:  # the dense reference first
        return (not is_reference(meta[kv[0]]["method"]), kv[0][0], kv[0][1])

    for (label, s), per in sorted(by.items(), key=order):
        row: dict[str, Any] = {
            "label": label,
            "method": meta[(label, s)]["method"],
            "criterion": meta[(label, s)]["criterion"],
            "sparsity": s,
            "granularity": meta[(label, s)]["granularity"],
        }
        sd = meta[(label, s)].get("sparsity_detail", {})
        row["eff_heads"] = sd.get("heads", {}).get("effective", 0.0)
        row["eff_neurons"] = sd.get("neurons", {}).get("effective", 0.0)
        row.update(pooled_bytes(list(per.values())) or {})
        accs, accn, ns = [], [], []
        for t in tasks:
            if t not in per:
                continue
            mt = per[t]["metrics"]
            if "acc" in mt:
                accs.append(mt["acc"]["value"])
                row[f"{t}/acc"] = mt["acc"]["value"]
                ns.append(mt["acc"]["n"])
            p = _primary(mt)
            if p:
                accn.append(p[1]["value"])
                row[f"{t}/{p[0]}"] = p[1]["value"]
        complete = len(accs) == len(tasks)
        row["mean_acc"] = sum(accs) / len(accs) if accs and complete else None
        ses = [per[t]["metrics"]["acc"]["stderr"] for t in tasks if t in per and "acc" in per[t]["metrics"]]
        row["mean_acc_stderr"] = (
            math.sqrt(sum(x * x for x in ses)) / len(ses)
            if ses and complete and all(math.isfinite(x) for x in ses)
            else None
        )
        row["mean_acc_norm"] = sum(accn) / len(accn) if accn and complete else None
        row["n_examples"] = sum(ns)
        if ppl_task and ppl_task in per:
            pm = per[ppl_task]["metrics"]
            row["word_perplexity"] = pm["word_perplexity"]["value"]
            row["token_perplexity"] = pm["token_perplexity"]["value"]
            row["ppl_windows"] = pm["token_perplexity"]["n"]
        out.append(row)
    return out


def metrics_json(summ: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Nested for DVC: {label: {s<pct>: {mean_acc, word_perplexity, <task>_<metric>...}}}."""
    out: dict[str, Any] = {}
    for row in summ:
        d = out.setdefault(row["label"], {}).setdefault(sparsity_key(row["sparsity"]), {})
        for k in (
            "mean_acc",
            "mean_acc_stderr",
            "mean_acc_norm",
            "word_perplexity",
            "token_perplexity",
            "eff_heads",
            "eff_neurons",
            "byte_sparsity",
            "byte_sparsity_std",
            "byte_net",
        ):
            if row.get(k) is not None:
                d[k] = round(float(row[k]), 6)
    for r in records:
        d = out[r["label"]][sparsity_key(r["sparsity"])]
        for m, v in r["metrics"].items():
            d[f"{r['task']}_{m}"] = round(float(v["value"]), 6)
    return out


HEADLINES = ("mean_acc", "mean_acc_stderr", "word_perplexity", "byte_sparsity")


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics_json` cut to the DVC metrics file's headline figures (`HEADLINES`) per method and sparsity;
    every other figure is in summary.csv (per method) and results.csv (per task), and in MLflow."""
    return {
        label: {s: {k: v[k] for k in HEADLINES if k in v} for s, v in by_s.items()} for label, by_s in metrics.items()
    }


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """`metrics_json`'s nesting as flat `<label>/<s..>/<metric>` names (MLflow)."""
    return {
        f"{label}/{s}/{k}": v for label, by_s in metrics.items() for s, vals in by_s.items() for k, v in vals.items()
    }


def plot_rows(summ: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Each method's curve, with the dense point prepended at sparsity 0."""
    dense = [r for r in summ if is_reference(r["method"])]
    rows = []
    labels = sorted({r["label"] for r in summ if not is_reference(r["method"])})
    for label in labels or ["dense"]:
        pts = dense + [r for r in summ if r["label"] == label and not is_reference(r["method"])]
        for r in sorted(pts, key=lambda x: x["sparsity"]):
            if r.get(key) is not None:
                b = r.get("byte_sparsity")
                rows.append({"method": label, "sparsity": r["sparsity"], "byte_sparsity": b, key: r[key]})
    return rows


X_LABELS = {
    "sparsity": "sparsity (nominal, heads and neurons)",
    "byte_sparsity": "byte sparsity (weight bytes a decode step skips, measured mean)",
    "byte_target": "byte sparsity (target; pools at each method's solved unit sparsity)",
}


def plot(
    rows: list[dict[str, Any]],
    key: str,
    path: Path,
    title: str,
    ylabel: str,
    log: bool = False,
    x: str = "sparsity",
    x_label: str | None = None,
) -> None:
    """Every method's curve of `key` against `x` on one figure (points without an x value left out)."""
    from pipeline.plots import figure, save_png

    fig, ax = figure(figsize=(7, 4.5) if x == "byte_sparsity" else (6, 4))
    for label in sorted({r["method"] for r in rows}):
        pts = sorted((r for r in rows if r["method"] == label and r.get(x) is not None), key=lambda r: r[x])
        ax.plot([p[x] for p in pts], [p[key] for p in pts], marker="o", label=label)
    ax.set_xlabel(x_label or X_LABELS[x])
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    save_png(fig, path, dpi=110)


def _fmt(v: Any, pct: bool = False, nd: int = 2) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.{nd}f}"


def markdown(
    summ: list[dict[str, Any]],
    records: list[dict[str, Any]],
    tasks: list[str],
    ppl_task: str | None,
    info: dict[str, Any],
) -> str:
    L = ["# Evaluation report", ""]
    L.append(
        f"Model `{info['model']}` (fingerprint `{info['fingerprint']}`), scope `{info['scope']}`, "
        f"pools {', '.join(info['pools'])}, contextual granularity `{info['granularity']}`. "
        f"Evaluation split: data.seed {info['seed']}, calib_fraction {info['calib_fraction']} "
        f"(calibration examples never evaluated); per-task limit: {info['limit']}. "
        f"Perplexity: {ppl_task or 'off'}, seq_len {info['seq_len']}, windows {info['max_windows'] or 'all'}. "
        f"BOS (resolved model.add_bos): {'on' if info.get('add_bos') else 'off'}."
    )
    if info.get("sparsity_unit") == "bytes":
        L.append("")
        L.append(
            "**Sparsity = byte-sparsity target** (`evaluate.sparsity_unit: bytes`): each method ran at the unit "
            "sparsity that skips that share of the weight bytes by the count of what its masks skip "
            "(`WeightBytes.skippable`); the bytes column is what it measurably skipped. A target a method cannot "
            "reach (CATS and GRIFFIN prune FFN neurons only) has no row."
        )
    L.append("")
    L.append("## Mean accuracy and perplexity per method and sparsity")
    L.append("")
    L.append(
        "mean acc = mean over tasks of acc; mean acc_norm* = acc_norm where the task has it, else acc. "
        "Effective sparsity counts the dense layer 0. n = examples behind each accuracy mean "
        "(sum over tasks); ppl windows = WikiText-2 windows behind the perplexities. Bytes skipped = the share of "
        "weight bytes a decode step does not read, mean ± sd over the evaluated tokens (docs/thresholds.md)."
    )
    L.append("")
    worst = max((r["mean_acc_stderr"] for r in summ if r.get("mean_acc_stderr") is not None), default=None)
    if worst is not None and worst > SMOKE_STDERR:
        L.append(
            f"**Smoke run**: the mean-accuracy stderr reaches {100 * worst:.1f} points (> {100 * SMOKE_STDERR:.1f}): "
            "too few examples to rank methods; this run shows that the pipeline works, not which method wins."
        )
        L.append("")
    hdr = [
        "method",
        "sparsity",
        "eff. heads",
        "eff. neurons",
        "bytes skipped ± sd",
        "mean acc ± se",
        "mean acc_norm*",
        "n",
    ]
    if ppl_task:
        hdr += ["word ppl", "token ppl", "ppl windows"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "---|" * len(hdr))
    for r in summ:
        cells = [
            r["label"] + ("" if r["granularity"] == "none" else f" ({r['granularity']})"),
            f"{r['sparsity']:.2f}",
            _fmt(r["eff_heads"], nd=3),
            _fmt(r["eff_neurons"], nd=3),
            "–" if r.get("byte_sparsity") is None else f"{r['byte_sparsity']:.3f} ± {r['byte_sparsity_std']:.3f}",
            _fmt(r.get("mean_acc"), pct=True)
            + ("" if r.get("mean_acc_stderr") is None else f" ± {100 * r['mean_acc_stderr']:.1f}"),
            _fmt(r.get("mean_acc_norm"), pct=True),
            str(r.get("n_examples", 0)),
        ]
        if ppl_task:
            cells += [_fmt(r.get("word_perplexity")), _fmt(r.get("token_perplexity")), str(r.get("ppl_windows", "–"))]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("## Per task (acc / acc_norm, %, ± stderr)")
    L.append("")
    hdr = ["method", "sparsity"] + tasks
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "---|" * len(hdr))
    recs = defaultdict(dict)
    for r in records:
        recs[(r["label"], r["sparsity"])][r["task"]] = r
    for r in summ:
        per = recs[(r["label"], r["sparsity"])]
        cells = [r["label"], f"{r['sparsity']:.2f}"]
        for t in tasks:
            if t not in per:
                cells.append("–")
                continue
            m = per[t]["metrics"]
            s = f"{100 * m['acc']['value']:.1f}±{100 * m['acc']['stderr']:.1f}"
            if "acc_norm" in m:
                s += f" / {100 * m['acc_norm']['value']:.1f}"
            s += f" (n={m['acc']['n']})"
            cells.append(s)
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("## Plots")
    L.append("")
    L.append("![accuracy vs sparsity](plots/accuracy.png) ![accuracy vs byte sparsity](plots/accuracy_bytes.png)")
    if ppl_task:
        L.append("")
        L.append(
            "![perplexity vs sparsity](plots/perplexity.png) ![perplexity vs byte sparsity](plots/perplexity_bytes.png)"
        )
    L.append("")
    L.append(
        "Tidy results: `results.csv` (model, method, criterion, sparsity, granularity, task, metric, value, n, "
        "stderr, ...). Per-point caches: `" + info["cache_dir"] + "/<key>.json`."
    )
    L.append("")
    return "\n".join(L)


def write_all(
    out_dir: str | Path,
    records: list[dict[str, Any]],
    cfg: Any,
    info: dict[str, Any],
    metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    out = Path(out_dir)
    tasks = list(cfg.tasks)
    summ = summary(records, tasks, cfg.ppl_task)
    write_csv(out / "results.csv", tidy_rows(records), COLUMNS)
    write_csv(out / "summary.csv", summ, SUMMARY_COLUMNS)
    nominal = X_LABELS["byte_target" if cfg.sparsity_unit == "bytes" else "sparsity"]
    acc_rows = plot_rows(summ, "mean_acc")
    write_csv(out / "plots" / "accuracy.csv", acc_rows, ["method", "sparsity", "byte_sparsity", "mean_acc"])
    acc_title = "Mean zero-shot accuracy vs sparsity"
    plot(acc_rows, "mean_acc", out / "plots" / "accuracy.png", acc_title, "mean acc", x_label=nominal)
    plot(acc_rows, "mean_acc", out / "plots" / "accuracy_bytes.png", acc_title, "mean acc", x="byte_sparsity")
    if cfg.ppl_task:
        ppl_rows = plot_rows(summ, PPL_METRIC)
        write_csv(out / "plots" / "perplexity.csv", ppl_rows, ["method", "sparsity", "byte_sparsity", PPL_METRIC])
        for name, x, xl in (("perplexity", "sparsity", nominal), ("perplexity_bytes", "byte_sparsity", None)):
            plot(
                ppl_rows,
                PPL_METRIC,
                out / "plots" / f"{name}.png",
                f"{cfg.ppl_task} word perplexity vs sparsity",
                "word perplexity (log)",
                log=True,
                x=x,
                x_label=xl,
            )
    md = markdown(summ, records, tasks, cfg.ppl_task, info)
    write_text(out / "report.md", md)
    full = metrics_json(summ, records)
    metrics = headline_metrics(full)
    write_json(Path(metrics_path) if metrics_path else out / "metrics.json", metrics)
    return {"summary": summ, "metrics": metrics, "metrics_full": full}
