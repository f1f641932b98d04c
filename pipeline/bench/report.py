"""Benchmark outputs: targets summary, tidy CSV, JSON, a Markdown table and plots, all written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from pipeline.io import write_text
from pipeline.plots import figure, save_png

COLUMNS = [
    "model",
    "method",
    "batch",
    "head_sparsity",
    "neuron_sparsity",
    "ms_per_token",
    "ms_p10",
    "ms_p90",
    "tokens_per_s",
    "achieved_gbps",
    "bound_ms",
    "frac_of_bound",
    "speedup_vs_dense",
    "speedup_vs_compiled",
    "speedup_bound",
    "total_bytes",
    "predictor_bytes",
    "predictor_params",
    "predictor_share",
    "kept_heads_mean",
    "kept_neurons_mean",
    "byte_sparsity",
    "grid",
    "status",
]


def _find(rows, **kw):
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def summarize(rows: list[dict], micro: dict | None, target_model: str = "llama-3-8b") -> dict:
    """The issue's targets, each with its measured value and pass/fail (None when not measured)."""
    out: dict = {}
    dense = _find(rows, model=target_model, method="dense", batch=1)
    out["dense_frac_of_bound"] = {"value": dense and dense["frac_of_bound"], "target": 0.80}
    sh50 = _find(rows, model=target_model, method="shadowllm", batch=1, head_sparsity=0.5)
    dj50 = _find(rows, model=target_model, method="dejavu", batch=1, head_sparsity=0.5)
    st50 = _find(rows, model=target_model, method="static", batch=1, head_sparsity=0.5)
    out["shadowllm50_speedup_vs_dense"] = {
        "value": sh50 and dense and dense["ms_per_token"] / sh50["ms_per_token"],
        "target": 1.6,
    }
    out["shadowllm50_speedup_vs_compiled"] = {"value": sh50 and sh50.get("speedup_vs_compiled"), "target": 2.0}
    out["shadowllm50_speedup_vs_dejavu"] = {
        "value": sh50 and dj50 and dj50["ms_per_token"] / sh50["ms_per_token"],
        "target": 1.15,
    }
    out["static50_speedup_vs_dense"] = {
        "value": st50 and dense and dense["ms_per_token"] / st50["ms_per_token"],
        "target": None,
    }
    sh0 = _find(rows, model=target_model, method="shadowllm", batch=1, head_sparsity=0.0)
    st0 = _find(rows, model=target_model, method="static", batch=1, head_sparsity=0.0)
    share = None
    if sh0 and st0:
        share = (sh0["ms_per_token"] - st0["ms_per_token"]) / sh0["ms_per_token"]
    out["shadowllm0_predictor_share"] = {
        "value": share,
        "target": 0.05,
        "lower_is_better": True,
        "note": "(shadowllm@0% − static@0%) / shadowllm@0%: same kernels, predictor added",
    }
    if sh0 and dense:
        out["shadowllm0_over_dense"] = {"value": sh0["ms_per_token"] / dense["ms_per_token"] - 1, "target": None}
    gather = [r for r in (micro or {}).get("kernels", []) if r["kernel"] in ("gateup", "down", "qkv", "o")]
    at50 = [r for r in gather if r["sparsity"] == 0.5]
    if at50:
        out["gather_kernels_min_frac_of_copy_at50"] = {
            "value": min(r["frac_of_copy"] for r in at50),
            "target": 0.85,
            "note": "min over gate/up, down, qkv, o at 50% sparsity; bytes actually read / time / copy bandwidth",
            "per_kernel": {f"{r['kernel']}@{r['sparsity']}": r["frac_of_copy"] for r in gather},
        }
    for _k, v in out.items():
        t, val = v.get("target"), v.get("value")
        if t is not None and val is not None:
            v["met"] = bool(val <= t) if v.get("lower_is_better") else bool(val >= t)
    return out


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})
    return buf.getvalue()


def _tile(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def _fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def to_markdown(results: dict) -> str:
    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    copy = results.get("copy", {})
    lines = [
        f"# Decode latency, {results.get('device', '?')}",
        "",
        f"Copy bandwidth (read+write): **{_fmt(copy.get('copy_gbps'), 0)} GB/s**. Prompt "
        f"{results['params']['prompt_len']}, generate {results['params']['gen_len']}, bf16, CUDA graphs; "
        "ms/token = median CUDA-event time of one decode step (one token for each sequence of the batch). "
        "Sparsity = heads and neurons alike, layer 0 dense. bound = bytes read / copy bandwidth.",
        "",
    ]
    lines += ["## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for k, v in results.get("summary", {}).items():
        if v.get("target") is None:
            continue
        lines.append(
            f"| {k} | {_fmt(v.get('value'), 3)} | {'≤' if v.get('lower_is_better') else '≥'} {v['target']} | "
            f"{ {True: 'yes', False: '**no**', None: '–'}[v.get('met')] } |"
        )
    lines += [
        "",
        "## Per configuration",
        "",
        "| model | method | batch | sparsity | ms/token | tok/s | GB/s | bound ms | frac of bound | × dense | "
        "× compiled | bound × | pred MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['batch']} | {r['head_sparsity']:.0%} | {r['ms_per_token']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['achieved_gbps']:.0f} | {r['bound_ms']:.3f} | "
            f"{r['frac_of_bound']:.2f} | {_fmt(r.get('speedup_vs_dense'))} | {_fmt(r.get('speedup_vs_compiled'))} | "
            f"{r['speedup_bound']:.2f} | {r['predictor_bytes'] / 1e6:.0f} |"
        )
    comp = results.get("compiled_rows", [])
    if comp:
        lines += [
            "",
            "## Compiled PyTorch dense baseline",
            "",
            "The plain decoder of the same shapes and weights in stock PyTorch ops, static KV cache, "
            '`torch.compile(mode="reduce-overhead")` (pipeline/bench/compiled.py); "× compiled" above = its ms / '
            "the row's.",
            "",
            "| model | batch | compiled ms/token | our dense ms/token | our dense × compiled |",
            "|---|---|---|---|---|",
        ]
        for c in comp:
            d = _find(results["rows"], model=c["model"], method="dense", batch=c["batch"])
            if c.get("status") != "ok":
                lines.append(f"| {c['model']} | {c['batch']} | {c.get('status')} | – | – |")
                continue
            lines.append(
                f"| {c['model']} | {c['batch']} | {c['ms_per_token']:.3f} | {_fmt(d and d['ms_per_token'], 3)} | "
                f"{_fmt(d and d.get('speedup_vs_compiled'))} |"
            )
    extra = [r for r in results.get("extra_rows", []) if r.get("status") == "ok"]
    if extra:
        lines += [
            "",
            "## Ablations (batch 1)",
            "",
            "| variant | model | method | sparsity | overlap | PDL | ms/token | × dense | pred MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in extra:
            lines.append(
                f"| {r['variant']} | {r['model']} | {r['method']} | {r['head_sparsity']:.0%} | {r.get('overlap')} | "
                f"{r.get('pdl', True)} | "
                f"{r['ms_per_token']:.3f} | {_fmt(r.get('speedup_vs_dense'))} | {r['predictor_bytes'] / 1e6:.0f} |"
            )
    thr = results.get("thresholder_rows", [])
    if thr:
        lines += [
            "",
            "## Thresholders next to the predictors (issue 12 item 3)",
            "",
            "sparsity: the method's own share (per tensor for teal/wina, of each layer's neurons for cats/griffin, "
            "of heads and neurons for the predictors); bytes skipped: the measured share of weight bytes not read "
            "(mean over the steps, the union of reads over the batch). Compare rows at equal bytes skipped.",
            "",
            "| model | batch | method | sparsity | bytes skipped | ms/token | × dense | bound × | frac of bound |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            (r for r in thr if r.get("status") == "ok"), key=lambda r: (r["model"], r["batch"], r["byte_sparsity"])
        ):
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['method']} | {r['sparsity']:.0%} | {r['byte_sparsity']:.3f} | "
                f"{r['ms_per_token']:.3f} | {_fmt(r.get('speedup_vs_dense'))} | {r['speedup_bound']:.2f} | "
                f"{r['frac_of_bound']:.2f} |"
            )
        bad = [r for r in thr if r.get("status") != "ok"]
        if bad:
            lines.append("")
            lines.append(
                f"Not measured: {len(bad)} ("
                + "; ".join(sorted({f"{r['method']}: {r.get('status')}" for r in bad}))[:600]
                + ")."
            )
    micro = results.get("micro") or {}
    if micro.get("kernels"):
        lines += [
            "",
            "## Kernels alone (batch 1, distinct weights per launch)",
            "",
            "| kernel | sparsity | µs | GB/s | frac of copy |",
            "|---|---|---|---|---|",
        ]
        for r in micro["kernels"]:
            lines.append(
                f"| {r['kernel']} | {r['sparsity']:.0%} | {r['us']:.1f} | {r['gbps']:.0f} | {r['frac_of_copy']:.2f} |"
            )
    if micro.get("sweeps"):
        lines += ["", "## Tile sweeps (each candidate's value; the pick is used by every later measurement)", ""]
        lines += ["| role | measured on | pick | candidates |", "|---|---|---|---|"]
        for sw in micro["sweeps"]:
            unit = "ms" if "ms" in sw["best"] else "gbps"

            def cell(r, unit=unit):
                v = r.get(unit)
                value = "error" if v is None else f"{v:.3f}" if unit == "ms" else f"{v:.0f}"
                return f"{_tile(r['config'])}: {value}"

            lines.append(
                f"| {sw['key']} | {sw.get('kernel', '')} ({'ms' if unit == 'ms' else 'GB/s'}) | "
                f"{_tile(sw['best']['config'])} | " + "; ".join(cell(r) for r in sw.get("all", [])) + " |"
            )
    for pr in results.get("profile", []):
        lines += [
            "",
            f"## Profile: {results.get('summary_model')} {pr['method']} at {pr['sparsity']:.0%}, batch 1 "
            "(predictors not overlapped, no PDL)",
            "",
            f"Graph step {pr['step_us']:.0f} µs = device time of the kernels {pr['kernel_sum_us']:.0f} µs "
            f"({pr['n_kernels']:.0f} kernels, timed eagerly) + {pr['between_kernels_us']:.0f} µs between them.",
            "",
            "| part | µs / step | MB read | GB/s | frac of copy | µs over copy speed |",
            "|---|---|---|---|---|---|",
        ]
        for r in pr["parts"]:
            lines.append(
                f"| {r['part']} | {r['us']:.1f} | {r['bytes'] / 1e6:.0f} | {_fmt(r['gbps'], 0)} | "
                f"{_fmt(r['frac_of_copy'])} | {r['lost_us']:.1f} |"
            )
    skipped = [r for r in results["rows"] if r.get("status") != "ok"]
    if skipped:
        lines += [
            "",
            f"Not measured: {len(skipped)} configurations ("
            + ", ".join(sorted({r.get("status", "?") for r in skipped}))
            + ").",
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    if not models:
        return
    n = len(models)
    cols = min(4, n)
    fig, axes = figure(
        nrows=(n + cols - 1) // cols, ncols=cols, figsize=(4.2 * cols, 3.4 * ((n + cols - 1) // cols)), squeeze=False
    )
    for ax, m in zip(axes.flat, models):
        _panel(ax, [r for r in ok if r["model"] == m and r["batch"] == 1], f"{m}, batch 1", "ms / token")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    save_png(fig, path)


def _panel(ax, rows: list[dict], title: str, ylabel: str) -> None:
    """ms/token against sparsity for each sparse method of one (model, batch), dense as a line."""
    for method in ("static", "shadowllm", "dejavu"):
        pts = sorted((r["head_sparsity"], r["ms_per_token"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=method)
    d = [r["ms_per_token"] for r in rows if r["method"] == "dense"]
    if d:
        ax.axhline(d[0], color="k", ls="--", lw=1, label="dense")
    ax.set_title(title)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_batches(rows: list[dict], model: str, path: str | Path) -> bool:
    ok = [r for r in rows if r.get("status") == "ok" and r["model"] == model]
    batches = sorted({r["batch"] for r in ok})
    if len(batches) < 2:
        return False
    fig, axes = figure(nrows=1, ncols=len(batches), figsize=(3.6 * len(batches), 3.2), squeeze=False)
    for ax, b in zip(axes.flat, batches):
        _panel(ax, [r for r in ok if r["batch"] == b], f"{model}, batch {b}", "ms / step")
    save_png(fig, path)
    return True


def write_all(results: dict, out_dir: str | Path, stem: str) -> list[Path]:
    out = Path(out_dir)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.csv"]
    write_text(paths[0], json.dumps(results, indent=1, default=str))
    write_text(paths[1], to_markdown(results))
    write_text(paths[2], to_csv(results["rows"] + results.get("thresholder_rows", [])))
    try:
        plot(results["rows"], out / f"{stem}_ms_vs_sparsity.png")
        paths.append(out / f"{stem}_ms_vs_sparsity.png")
        tm = results.get("summary_model", "llama-3-8b")
        if plot_batches(results["rows"], tm, out / f"{stem}_batches.png"):
            paths.append(out / f"{stem}_batches.png")
    except ImportError:
        pass  # matplotlib missing: tables still written
    return paths


def short_table(results: dict) -> str:
    rows = results["rows"]
    lines = [
        f"copy bandwidth {results.get('copy', {}).get('copy_gbps', 0):.0f} GB/s",
        f"{'model':12s} {'B':>2s} {'dense':>7s} {'frac':>5s} | {'st50':>7s} {'sh50':>7s} {'dj50':>7s} | "
        f"{'sh/dense':>8s} {'sh/dj':>6s} {'sh0%':>7s} {'st0%':>7s}",
    ]
    keys = list(dict.fromkeys((r["model"], r["batch"]) for r in rows if r.get("status") == "ok"))
    for m, b in keys:
        d = _find(rows, model=m, method="dense", batch=b)
        st, sh, dj = (
            _find(rows, model=m, method=x, batch=b, head_sparsity=0.5) for x in ("static", "shadowllm", "dejavu")
        )
        sh0 = _find(rows, model=m, method="shadowllm", batch=b, head_sparsity=0.0)
        st0 = _find(rows, model=m, method="static", batch=b, head_sparsity=0.0)
        g = lambda r: r["ms_per_token"] if r else float("nan")
        lines.append(
            f"{m:12s} {b:2d} {g(d):7.3f} {(d or {}).get('frac_of_bound', float('nan')):5.2f} | {g(st):7.3f} "
            f"{g(sh):7.3f} {g(dj):7.3f} | {g(d) / g(sh):8.2f} {g(dj) / g(sh):6.2f} {g(sh0):7.3f} {g(st0):7.3f}"
        )
    for k, v in results.get("summary", {}).items():
        if v.get("target") is not None:
            lines.append(f"target {k}: {_fmt(v.get('value'), 3)} (goal {v['target']}) met={v.get('met')}")
    return "\n".join(lines)


def metrics_of(results: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics: targets and the headline numbers (full table in the out dir)."""
    ok = [r for r in results.get("rows", []) if r.get("status") == "ok"]
    return {
        "skipped": False,
        "device": results.get("device"),
        "copy_gbps": results.get("copy", {}).get("copy_gbps"),
        "targets": {
            k: {"value": v.get("value"), "target": v.get("target"), "met": v.get("met")}
            for k, v in results.get("summary", {}).items()
        },
        "configs": {
            f"{r['model']}/b{r['batch']}/{r['method']}@{round(r['head_sparsity'] * 100)}": {
                "ms_per_token": r["ms_per_token"],
                "frac_of_bound": r["frac_of_bound"],
                "speedup_vs_dense": r.get("speedup_vs_dense"),
            }
            for r in ok
            if r["head_sparsity"] in (0.0, 0.5)
        },
        "n_measured": len(ok),
        "n_not_measured": len(results.get("rows", [])) - len(ok),
    }


def flat_metrics(results: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers logged to MLflow: target values, ms/token and fraction of the bound per configuration."""
    flat = {f"target.{k}": v["value"] for k, v in metrics.get("targets", {}).items() if _is_num(v.get("value"))}
    for r in (results or {}).get("rows", []):
        if r.get("status") == "ok":
            key = f"{r['model']}.b{r['batch']}.{r['method']}.s{round(r['head_sparsity'] * 100)}"
            flat[f"ms.{key}"] = r["ms_per_token"]
            flat[f"frac_bound.{key}"] = r["frac_of_bound"]
    return flat


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
