"""Compare our dense scores with lm-evaluation-harness 0.4 run on the same model, files and documents.

    shadowllm compare-lmeval --lmeval-out DIR --cache results/cache --limit 100 --out FILE.md

DIR is lm-eval's `--output_path` of a run with `--log_samples` and `--samples` set to our evaluation ids
(task names `local_<task>`). Writes a Markdown table of both accuracies with stderr, the difference in
stderr units, and the per-document agreement (same prediction, max |Δ loglik|).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.evaluate.catalog import is_reference


def _load_lmeval(out_dir: Path) -> tuple[dict, dict]:
    results = sorted(out_dir.rglob("results_*.json"))
    if not results:
        raise UserError(f"no lm-eval results_*.json under {out_dir}")
    res = json.loads(results[-1].read_text())
    samples = {}
    for f in out_dir.rglob("samples_*.jsonl"):
        task = f.name[len("samples_") :].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return res, samples


def _load_ours(cache: Path, limit: int | None) -> dict[str, dict]:
    out = {}
    for f in cache.glob("*.json"):
        r = json.loads(f.read_text())
        if not is_reference(r.get("method", "")) or "per_example" not in r:
            continue
        if r["ident"]["task_settings"].get("limit") != limit:
            continue
        out[r["task"]] = r
    return out


def compare(lmeval_out: Path, cache: Path, limit: int | None) -> str:
    """The comparison table (Markdown) of the dense points cached under `cache` evaluated with `limit`."""
    res, samples = _load_lmeval(lmeval_out)
    ours = _load_ours(cache, limit)
    lines = [
        "| task | n | metric | ours | lm-eval 0.4.13 | Δ / stderr | same prediction | max abs Δ loglik |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for task in sorted(ours):
        key = f"local_{task}"
        if key not in res["results"]:
            continue
        lm = res["results"][key]
        o = ours[task]
        by_id = {int(e["id"].split("/")[1]): e for e in o["per_example"]}
        sam = {int(s["doc_id"]): s for s in samples.get(key, [])}
        common = sorted(set(by_id) & set(sam))
        for metric in ("acc", "acc_norm"):
            if metric not in o["metrics"] or f"{metric},none" not in lm:
                continue
            ov, os_ = o["metrics"][metric]["value"], o["metrics"][metric]["stderr"]
            lv, ls = lm[f"{metric},none"], lm[f"{metric}_stderr,none"]
            same = sum(by_id[i][metric] == sam[i][metric] for i in common)
            dll = max(
                (abs(a - float(b[0])) for i in common for a, b in zip(by_id[i]["loglik"], sam[i]["filtered_resps"])),
                default=float("nan"),
            )
            z = (ov - lv) / os_ if os_ else 0.0
            lines.append(
                f"| {task} | {o['metrics'][metric]['n']} | {metric} | {100 * ov:.1f} ± {100 * os_:.1f} | "
                f"{100 * lv:.1f} ± {100 * ls:.1f} | {z:+.2f} | {same}/{len(common)} | {dll:.2e} |"
            )
            summary.append(abs(z) <= 1.0)
    lines.append("")
    lines.append(f"All within one stderr: {all(summary)} ({sum(summary)}/{len(summary)} task-metric pairs).")
    return "\n".join(lines) + "\n"
