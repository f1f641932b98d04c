"""The research report (issue 11, item 4): one command turns a research run's outputs into
`<run>/report.md`, `summary.csv`, `results.csv`, `claims.md` and PNGs.

    shadowllm research-report results/research/qwen2.5-coder-0.5b-run4
    shadowllm research-report results/research/qwen2.5-coder-0.5b --run ...-run3 --run ...-run4   # runs merged

With `--run`, the report of several runs of one calibration (the same `collect` and `model.dtype` in each run's
`params.yaml`: otherwise an error) is written into the first argument: their records (the first run's point wins
where two share a key, e.g. dense), train tables and stage figures together.

What a run directory holds (every piece optional but the records; `scripts/device_accuracy.sh` writes them):
- `**/records.json.gz`: the point records of every `shadowllm evaluate --records` of the run (pool settings,
  scopes, the nine-criteria point set): read together, deduplicated by point key;
- `train_tables.json` or `train_tables-<criterion>.json`: the train stage's `--tables` (held-out ρ and recall of
  every predictor, its size, and the train-mean and ridge baselines), merged by criterion;
- `params.yaml`: the run's parameters (the calibration line); `collect.json`, `peaks.log`: the collect metrics
  and the per-stage wall time / peak host and GPU memory; `dense_full/dense_full.json.gz`: the dense row on the
  whole WikiText-2 test (`scripts/device_accuracy.sh dense-full`, apart from the comparison's 128 windows).

Tables: per (pools, scope), mean accuracy ± stderr and word perplexity of every method at every sparsity; per
task; the static criteria at 50 % heads-only (the paper's OPT-1.3B table); predictor ρ beside the train mean and
ridge, with predictor bytes as a share of the model; the paired claims (`pipeline.evaluate.claims`), each row
per (pools, scope); where both scopes ran, every method local − global, paired.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.evaluate import report
from pipeline.evaluate.catalog import is_reference
from pipeline.evaluate.claims import claims_markdown, load_records, pools_of, scope_markdown, split_tasks
from pipeline.evaluate.report import COLUMNS, PPL_METRIC, plot, plot_rows, summary, tidy_rows, write_csv
from pipeline.io import write_text

SUMMARY_COLUMNS = ["pools", "scope", *report.SUMMARY_COLUMNS]
CRITERIA_POINT = ("heads", 0.5)  # the nine static criteria are compared heads-only at 50 % (SPEC §5)


def run_records(*runs: Path) -> list[dict[str, Any]]:
    """Every point record under each of `runs` (`**/records.json.gz`), one per point key (the first file's wins,
    the runs in the order given)."""
    seen: dict[str, dict[str, Any]] = {}
    for run in runs:
        for rec in load_records(sorted(run.rglob("records.json.gz"))):
            seen.setdefault(rec["key"], rec)
    return list(seen.values())


def groups(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(pools, scope) -> its records, the dense points filed under every group."""
    dense = [r for r in records if is_reference(r["method"])]
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if not is_reference(r["method"]):
            out[(pools_of(r), r["scope"])].append(r)
    return {k: dense + v for k, v in sorted(out.items())}


def _cell(row: dict[str, Any]) -> str:
    acc = "–" if row.get("mean_acc") is None else f"{100 * row['mean_acc']:.1f}"
    if row.get("mean_acc_stderr") is not None:
        acc += f" ± {100 * row['mean_acc_stderr']:.1f}"
    ppl = row.get("word_perplexity")
    return acc + ("" if ppl is None else f" / {ppl:.2f}")


def method_table(summ: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per method, one column per sparsity: mean acc ± se / word ppl."""
    sparsities = sorted({r["sparsity"] for r in summ if r["sparsity"] > 0})
    by = {(r["label"], r["sparsity"]): r for r in summ}
    labels = list(dict.fromkeys(r["label"] for r in summ))
    L = ["| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    for label in labels:
        if (label, 0.0) in by:  # the dense reference: one value, shown in every column
            L.append(f"| {label} | " + " | ".join(_cell(by[(label, 0.0)]) for _ in sparsities) + " |")
            continue
        L.append(
            f"| {label} | " + " | ".join(_cell(by[(label, s)]) if (label, s) in by else "–" for s in sparsities) + " |"
        )
    return L


def task_table(summ: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    L = ["| method | sparsity | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for r in summ:
        cells = ["–" if r.get(f"{t}/acc") is None else f"{100 * r[f'{t}/acc']:.1f}" for t in tasks]
        L.append(f"| {r['label']} | {r['sparsity']:.2f} | " + " | ".join(cells) + " |")
    return L


def criteria_table(records: list[dict[str, Any]], tasks: list[str], ppl_task: str | None) -> list[str]:
    """The static criteria at `CRITERIA_POINT`, best perplexity first (empty without such points)."""
    pools, s = CRITERIA_POINT
    pts = [
        r
        for r in records
        if r["method"] == "static" and pools_of(r) == pools and float(r["sparsity"]) == s and r["scope"] == "global"
    ]
    if not pts:
        return []
    summ = summary(pts, tasks, ppl_task)
    summ.sort(key=lambda r: (r.get("word_perplexity") is None, r.get("word_perplexity") or 0.0))
    L = [
        f"## The static criteria at {s:.0%} {pools}-only (global)",
        "",
        "| criterion | word ppl | token ppl | mean acc ± se |",
        "|---|---|---|---|",
    ]
    for r in summ:
        wp, tp = r.get("word_perplexity"), r.get("token_perplexity")
        acc = "–" if r.get("mean_acc") is None else f"{100 * r['mean_acc']:.1f} ± {100 * r['mean_acc_stderr']:.1f}"
        wps, tps = ("–" if v is None else f"{v:.2f}" for v in (wp, tp))
        L.append(f"| {r['criterion']} | {wps} | {tps} | {acc} |")
    return L + [""]


def predictor_table(tables: dict[str, Any]) -> list[str]:
    """Held-out ρ (joint / per layer) of every predictor beside its criterion's train mean and its ridge."""
    L = [
        "## Predictors, held out (ρ joint / per layer)",
        "",
        "| criterion | model | heads | neurons | bytes (bf16) | share of model |",
        "|---|---|---|---|---|---|",
    ]

    def rho(m: dict[str, Any], pool: str) -> str:
        return f"{m[pool]['spearman_joint']:.3f} / {m[pool]['spearman_per_layer']:.3f}"

    for c in sorted(tables.get("predictors", {})):
        tm = tables["train_mean"].get(c)
        if tm:
            L.append(f"| {c} | train mean (static) | {rho(tm, 'heads')} | {rho(tm, 'neurons')} | – | – |")
        for k, m in sorted(tables["predictors"][c].items()):
            size = m.get("size", {})
            share = size.get("share_of_model")
            mib = size.get("bytes_bf16", 0) / 2**20
            shares = "–" if share is None else f"{100 * share:.1f} %"
            L.append(f"| {c} | {k} | {rho(m, 'heads')} | {rho(m, 'neurons')} | {mib:.1f} MiB | {shares} |")
            r = tables.get("ridge", {}).get(c, {}).get(k)
            if r:
                L.append(f"| {c} | {k}: ridge | {rho(r, 'heads')} | {rho(r, 'neurons')} | – | – |")
    return L + [""]


def train_tables(*runs: Path) -> dict[str, Any]:
    """`train_tables.json` and `train_tables-<label>.json` (one train call per criterion, or per criterion and
    some of its kinds) of each of `runs`, merged by criterion and kind (the first run's entry wins)."""
    out: dict[str, Any] = {}
    for f in [f for run in runs for f in sorted(run.glob("train_tables*.json"))]:
        t = json.loads(f.read_text())
        for part in ("predictors", "train_mean", "ridge"):
            for criterion, v in t.get(part, {}).items():
                if part == "train_mean":  # one per criterion, whatever kinds were trained
                    out.setdefault(part, {}).setdefault(criterion, v)
                else:
                    kinds = out.setdefault(part, {}).setdefault(criterion, {})
                    for kind, m in v.items():
                        kinds.setdefault(kind, m)
    return out


def _calibration(run: Path) -> dict[str, Any] | None:
    """The settings a run's traces depend on (its `params.yaml`: `collect`, `model.dtype`), None without one."""
    pf = run / "params.yaml"
    if not pf.is_file():
        return None
    import yaml

    p = yaml.safe_load(pf.read_text()) or {}
    return {"collect": p.get("collect", {}), "dtype": p.get("model", {}).get("dtype")}


def check_same_calibration(runs: list[Path]) -> None:
    """Runs merged into one report must share their calibration: their records compare methods whose predictors
    and static rankings come from it."""
    from pipeline.errors import UserError

    first = _calibration(runs[0])
    for run in runs[1:]:
        other = _calibration(run)
        if other == first:
            continue
        if first is None or other is None:
            why = "params.yaml missing"
        else:
            a, b = first["collect"], other["collect"]
            why = ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))
            why += ", model.dtype" * (first["dtype"] != other["dtype"])
        why = why.lstrip(", ")
        raise UserError(f"{run} was calibrated differently from {runs[0]} ({why}): one report per calibration")


def _dense_full_line(runs: list[Path]) -> str | None:
    """The dense row on the whole WikiText-2 test, from the first run that has one."""
    for run in runs:
        f = run / "dense_full" / "dense_full.json.gz"
        if f.is_file():
            m = load_records([f])[0]["metrics"]
            n = m["token_perplexity"]["n"]
            return (
                f"Dense on the whole WikiText-2 test ({n} windows, `{run.name}/dense_full`): word perplexity "
                f"{m['word_perplexity']['value']:.2f}, token perplexity {m['token_perplexity']['value']:.2f} "
                "(the tables below use the first 128 windows for every method, dense included)."
            )
    return None


def _calibration_line(run: Path) -> str | None:
    """What the predictors and static rankings were calibrated on, from the run's `params.yaml` (the evaluation's
    own settings are in the records)."""
    pf = run / "params.yaml"
    if not pf.is_file():
        return None
    import yaml

    p = yaml.safe_load(pf.read_text()) or {}
    c, m = p.get("collect", {}), p.get("model", {})
    return (
        f"Calibration (`params.yaml`): up to {c.get('n_per_task')} examples per task of {len(c.get('tasks', []))}, "
        f"{c.get('num_fewshot')}-shot, at most {c.get('max_tokens')} tokens, "
        f"criteria {', '.join(c.get('criteria', []))}; "
        f"weights {m.get('dtype')} on {m.get('device')}."
    )


def _stage_lines(run: Path) -> list[str]:
    L = []
    cj = run / "collect.json"
    if cj.is_file():
        c = json.loads(cj.read_text())
        n_ex, n_tok = c.get("examples_total", c.get("examples")), c.get("tokens_total", c.get("tokens"))
        L.append(
            f"- collect: {n_ex} examples, {n_tok} tokens, {c.get('tokens_per_s', float('nan')):.0f} tok/s, "
            f"{c.get('seconds', float('nan')):.1f} s"
        )
    peaks = run / "peaks.log"
    if peaks.is_file():
        L += [f"- {line.strip()}" for line in peaks.read_text().splitlines() if line.strip()]
    return L


def _settings(records: list[dict[str, Any]], tasks: list[str]) -> str:
    r = next((r for r in records if r["task"] in tasks), records[0])  # a task's settings, not the perplexity's
    ts = r.get("ident", {}).get("task_settings", {})
    n = {x["task"]: x["metrics"]["acc"]["n"] for x in records if is_reference(x["method"]) and "acc" in x["metrics"]}
    ppl = [x for x in records if is_reference(x["method"]) and "token_perplexity" in x["metrics"]]
    win = ppl[0]["metrics"]["token_perplexity"]["n"] if ppl else None
    return (
        f"Model `{r.get('model')}` (fingerprint `{r.get('model_fingerprint')}`); evaluation: per-task limit "
        f"{ts.get('limit')}, {ts.get('num_fewshot')}-shot, BOS {'on' if ts.get('add_bos') else 'off'}; "
        "examples per task "
        + ", ".join(f"{t} {k}" for t, k in sorted(n.items()))
        + (f"; WikiText-2 windows {win}" if win else "")
        + "."
    )


def build(run: Path, title: str | None = None, runs: list[Path] | None = None) -> dict[str, Any]:
    """Write the report files into `run`, from `run` itself or from `runs` (merged, `check_same_calibration`);
    returns {"summary": rows, "records": n, "files": [...]}."""
    sources = list(runs) if runs else [run]
    check_same_calibration(sources)
    records = run_records(*sources)
    if not records:
        from pipeline.errors import UserError

        where = ", ".join(str(s) for s in sources)
        raise UserError(f"no records.json.gz under {where}: run `shadowllm evaluate --records ...` first")
    tasks, ppl_task = split_tasks(records)
    tables = train_tables(*sources)
    L = [f"# {title or run.name}: research report", "", _settings(records, tasks), ""]
    if runs:
        L += ["Runs merged: " + ", ".join(f"`{s.name}`" for s in sources) + " (one calibration).", ""]
    calib = _calibration_line(sources[0])
    if calib:
        L += [calib, ""]
    full = _dense_full_line(sources)
    if full:
        L += [full, ""]
    for src in sources:
        stage = _stage_lines(src)
        if stage:
            L += [f"## Stages{f' ({src.name})' if runs else ''}", "", *stage, ""]
    all_rows, files = [], []
    for (pools, scope), recs in groups(records).items():
        summ = summary(recs, tasks, ppl_task)
        for r in summ:
            all_rows.append({"pools": pools, "scope": scope, **r})
        L += [f"## {pools}, {scope}: mean accuracy ± stderr (points) / word perplexity", "", *method_table(summ), ""]
        L += ["<details><summary>per task (acc, %)</summary>", "", *task_table(summ, tasks), "", "</details>", ""]
        tag = f"{pools}-{scope}"
        acc_rows = plot_rows(summ, "mean_acc")
        plot(
            acc_rows, "mean_acc", run / "plots" / f"accuracy-{tag}.png", f"Mean accuracy, {pools}, {scope}", "mean acc"
        )
        files.append(f"plots/accuracy-{tag}.png")
        if ppl_task:
            plot(
                plot_rows(summ, PPL_METRIC),
                PPL_METRIC,
                run / "plots" / f"perplexity-{tag}.png",
                f"{ppl_task} word perplexity, {pools}, {scope}",
                "word perplexity (log)",
                log=True,
            )
            files.append(f"plots/perplexity-{tag}.png")
        L += [
            f"![accuracy {tag}](plots/accuracy-{tag}.png)"
            + (f" ![perplexity {tag}](plots/perplexity-{tag}.png)" if ppl_task else ""),
            "",
        ]
    L += criteria_table(records, tasks, ppl_task)
    if tables:
        L += predictor_table(tables)
    L += [claims_markdown(records, tasks, ppl_task), ""]
    if scope_md := scope_markdown(records, tasks, ppl_task):
        L += [scope_md, ""]
    write_csv(run / "summary.csv", all_rows, SUMMARY_COLUMNS + [f"{t}/acc" for t in tasks])
    write_csv(run / "results.csv", tidy_rows(records), COLUMNS)
    write_text(run / "report.md", "\n".join(L))
    files += ["report.md", "summary.csv", "results.csv"]
    return {"summary": all_rows, "records": len(records), "files": files}


def headline_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Flat `<pools>/<scope>/<label>/<s>/<metric>` figures for MLflow (finite values only)."""
    out = {}
    for r in rows:
        for k in ("mean_acc", "mean_acc_stderr", "word_perplexity", "byte_sparsity"):
            v = r.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[f"{r['pools']}/{r['scope']}/{r['label']}/s{round(100 * r['sparsity'])}/{k}"] = float(v)
    return out
