"""Paired comparisons between methods, with their noise, for the claims a sweep is run to answer.

Two methods evaluated on the same examples are compared per example: for each task, the difference of
their per-example accuracies d_i has mean Δ_t and standard error sd(d)/√n_t; the 7-task mean difference
Δ = mean_t Δ_t has standard error √(Σ_t se_t²)/T. Pairing removes the between-example variance that an
unpaired comparison of two means (each ± ~1.5 points) would carry, so a gap of a point can be resolved.
Perplexity is compared per WikiText-2 window: d_w = mean NLL per token of B minus A on window w; the
ratio of token perplexities is exp(mean_w d_w) (windows of equal length), its standard error from
sd(d)/√W on the log scale.

A verdict is "A > B" / "A < B" when |Δ| > 2·se (about 95 % two-sided), else "within noise".
"""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import write_text

Z = 2.0  # |Δ| / se above which a difference is called


@dataclass(frozen=True)
class Gap:
    """A − B: mean accuracy difference (points of accuracy, 0..1 scale) or log token-perplexity ratio."""

    delta: float
    se: float
    n: int

    @property
    def verdict(self) -> str:
        if not math.isfinite(self.se) or self.se == 0:
            return "A > B" if self.delta > 0 else "A < B" if self.delta < 0 else "equal"
        if abs(self.delta) <= Z * self.se:
            return "within noise"
        return "A > B" if self.delta > 0 else "A < B"


def save_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Point records (with per-example outcomes and per-window logliks) as gzipped JSON."""
    data = json.dumps(records, sort_keys=True).encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # same records, same bytes
        f.write(data)
    tmp.replace(path)


def load_records(paths: list[str | Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        with gzip.open(p, "rb") as f:
            out += json.loads(f.read())
    return out


def split_tasks(records: list[dict[str, Any]]) -> tuple[list[str], str | None]:
    """The accuracy tasks of `records` (sorted) and their perplexity task (None without one)."""
    from pipeline.data import tasks as registry

    kinds = {r["task"]: registry.get_task(r["task"]).kind for r in records}
    tasks = sorted(t for t, k in kinds.items() if k != "perplexity")
    return tasks, next((t for t, k in kinds.items() if k == "perplexity"), None)


def pools_of(rec: dict[str, Any]) -> str:
    mask = rec.get("ident", {}).get("mask")
    return "+".join(mask["pools"]) if mask else "dense"


def setting_of(rec: dict[str, Any]) -> tuple[str, str]:
    """(pools, scope) of a point record: the mask setting two methods must share to be compared."""
    return pools_of(rec), rec["scope"]


def index(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, float], dict[str, dict[str, Any]]]:
    """(pools, scope, label, sparsity) -> task -> record; the dense point is filed under every mask setting
    (records of several scopes, e.g. runs merged by the research report, are never paired across scopes)."""
    by: dict[tuple[str, str, str, float], dict[str, dict[str, Any]]] = defaultdict(dict)
    settings = {setting_of(r) for r in records if pools_of(r) != "dense"}
    for r in records:
        for p, sc in settings if pools_of(r) == "dense" else [setting_of(r)]:
            by[(p, sc, r["label"], float(r["sparsity"]))][r["task"]] = r
    return by


def _acc(rec: dict[str, Any], metric: str) -> dict[str, float]:
    key = metric if rec["per_example"] and metric in rec["per_example"][0] else "acc"
    return {e["id"]: float(e[key]) for e in rec["per_example"]}


def accuracy_gap(
    a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]], tasks: list[str], metric: str = "acc"
) -> Gap | None:
    """Paired mean-accuracy difference A − B over `tasks` (None unless both have every task)."""
    deltas, ses, n = [], [], 0
    for t in tasks:
        if t not in a or t not in b:
            return None
        xa, xb = _acc(a[t], metric), _acc(b[t], metric)
        ids = sorted(set(xa) & set(xb))
        if len(ids) < 2:
            return None
        d = np.array([xa[i] - xb[i] for i in ids])
        deltas.append(d.mean())
        ses.append(d.std(ddof=1) / math.sqrt(len(d)))
        n += len(d)
    return Gap(float(np.mean(deltas)), float(math.sqrt(sum(s * s for s in ses)) / len(tasks)), n)


def perplexity_gap(a: dict[str, Any], b: dict[str, Any]) -> Gap | None:
    """log(token ppl A / token ppl B), paired over windows (None without per-window logliks)."""
    la, lb = (r.get("details", {}).get("window_logliks") for r in (a, b))
    if not la or not lb or len(la) != len(lb):
        return None
    n_tok = a["details"]["seq_len"] - 1
    d = (np.array(lb, dtype=np.float64) - np.array(la, dtype=np.float64)) / n_tok  # NLL_A - NLL_B per token
    return Gap(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"), len(d))


def mean_accuracy(per_task: dict[str, dict[str, Any]], tasks: list[str]) -> tuple[float, float] | None:
    """(mean over tasks of acc, its stderr √(Σ se²)/T)."""
    if any(t not in per_task for t in tasks):
        return None
    vals = [per_task[t]["metrics"]["acc"] for t in tasks]
    return (
        float(np.mean([v["value"] for v in vals])),
        float(math.sqrt(sum(v["stderr"] ** 2 for v in vals)) / len(tasks)),
    )


CLAIMS = (
    ("a contextual predictor beats the static ranking of its criterion", "shadowllm-plainact", "static-plainact"),
    ("ShadowLLM beats DejaVu-style", "shadowllm-plainact", "dejavu-l2_norm (dense inputs)"),
    ("ShadowLLM beats DejaVu-style look-ahead", "shadowllm-plainact", "dejavu_lookahead-l2_norm (dense inputs)"),
    ("DejaVu-style beats the static ranking of its criterion", "dejavu-l2_norm (dense inputs)", "static-l2_norm"),
    ("fisher is a better static criterion than plainact", "static-fisher", "static-plainact"),
    ("l2_norm is a better static criterion than plainact", "static-l2_norm", "static-plainact"),
    (
        "the train mean is a better static ranking than the raw mean",
        "static-plainact",
        "static_raw-plainact (raw mean)",
    ),
    (
        "the oracle (gold scores) beats the static ranking (headroom)",
        "oracle-plainact (gold scores)",
        "static-plainact",
    ),
    # predictors vs the training-free thresholders (issue 12): at equal byte sparsity where the sweep ran with
    # evaluate.sparsity_unit: bytes (each record's sparsity is then the byte target)
    ("ShadowLLM beats TEAL", "shadowllm-plainact", "teal"),
    ("ShadowLLM beats WINA (no transform)", "shadowllm-plainact", "wina (no transform)"),
    ("ShadowLLM beats GRIFFIN", "shadowllm-plainact", "griffin"),
    ("ShadowLLM beats CATS", "shadowllm-plainact", "cats"),
    ("DejaVu-style beats TEAL", "dejavu-l2_norm (dense inputs)", "teal"),
    ("TEAL beats the static ranking (plainact)", "teal", "static-plainact"),
    ("TEAL's greedy allocation beats uniform TEAL", "teal (greedy)", "teal"),
)


def _pct(g: Gap | None) -> str:
    return "–" if g is None else f"{100 * g.delta:+.1f} ± {100 * g.se:.1f}"


def _ratio(g: Gap | None) -> str:
    if g is None:
        return "–"
    return f"×{math.exp(g.delta):.3f} (±{100 * g.se:.1f} % )"


def claims_markdown(records: list[dict[str, Any]], tasks: list[str], ppl_task: str | None) -> str:
    """Markdown: for every claim, mask setting (pools, scope) and sparsity, the paired gaps and the verdicts."""
    by = index(records)
    settings = sorted({k[:2] for k in by})
    sparsities = sorted({k[3] for k in by if k[3] > 0})
    L = [
        "## Claims, paired (A − B)",
        "",
        "Accuracy: 7-task mean of per-example differences, points ± stderr (paired); perplexity: token-perplexity "
        f"ratio A / B over the same windows (± stderr of its log). Verdict: |Δ| > {Z:g}·stderr, else within noise; "
        "accuracy and perplexity are judged separately (lower perplexity is better).",
        "",
    ]
    for title, a, b in CLAIMS:
        rows = []
        for p, sc in settings:
            for s in sparsities:
                ra, rb = by.get((p, sc, a, s)), by.get((p, sc, b, s))
                if not ra or not rb:
                    continue
                acc = accuracy_gap(ra, rb, tasks)
                ppl = (
                    perplexity_gap(ra[ppl_task], rb[ppl_task])
                    if ppl_task and ppl_task in ra and ppl_task in rb
                    else None
                )
                pv = "–" if ppl is None else {"A > B": "A worse", "A < B": "A better"}.get(ppl.verdict, ppl.verdict)
                verdict = acc.verdict if acc else "–"
                rows.append(f"| {p} | {sc} | {s:.2f} | {_pct(acc)} | {verdict} | {_ratio(ppl)} | {pv} |")
        if not rows:
            continue
        L += [
            f"### {title}",
            "",
            f"A = `{a}`, B = `{b}`",
            "",
            "| pools | scope | sparsity | Δ mean acc (points) | accuracy | token ppl A / B | perplexity |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    return "\n".join(L)


def scope_markdown(
    records: list[dict[str, Any]], tasks: list[str], ppl_task: str | None, a: str = "local", b: str = "global"
) -> str:
    """Markdown: every method at every pools setting and sparsity evaluated under both scopes `a` and `b`, the
    paired gap a − b (the same examples and windows; '' when no point has both)."""
    by = index(records)
    rows = []
    for p, label, s in sorted({(k[0], k[2], k[3]) for k in by if k[3] > 0}):
        ra, rb = by.get((p, a, label, s)), by.get((p, b, label, s))
        if not ra or not rb:
            continue
        acc = accuracy_gap(ra, rb, tasks)
        ppl = perplexity_gap(ra[ppl_task], rb[ppl_task]) if ppl_task and ppl_task in ra and ppl_task in rb else None
        pv = "–" if ppl is None else {"A > B": f"{a} worse", "A < B": f"{a} better"}.get(ppl.verdict, ppl.verdict)
        verdict = "–" if acc is None else {"A > B": f"{a} better", "A < B": f"{a} worse"}.get(acc.verdict, acc.verdict)
        rows.append(f"| {p} | {label} | {s:.2f} | {_pct(acc)} | {verdict} | {_ratio(ppl)} | {pv} |")
    if not rows:
        return ""
    return "\n".join(
        [
            f"## Scope: {a} − {b}, paired",
            "",
            f"Each method against itself under the other scope, on the same examples and windows (accuracy points "
            f"± stderr; token-perplexity ratio {a} / {b}); verdicts as above.",
            "",
            f"| pools | method | sparsity | Δ mean acc (points) | accuracy | token ppl {a} / {b} | perplexity |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def write_claims(
    path: str | Path, records: list[dict[str, Any]], tasks: list[str], ppl_task: str | None, header: str = ""
) -> str:
    md = (header + "\n\n" if header else "") + claims_markdown(records, tasks, ppl_task)
    write_text(Path(path), md)
    return md
