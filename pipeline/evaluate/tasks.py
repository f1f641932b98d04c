"""Zero-shot task metrics as lm-evaluation-harness 0.4 computes them, on the evaluation split only.

multiple_choice: acc = [argmax_i loglik_i == gold]; acc_norm = [argmax_i loglik_i / len(choice_i) == gold]
with len in characters of the *choice* (lm-eval's doc_to_choice string, i.e. the continuation without
the task's target_delimiter). Winogrande (shared continuation, one context per option) is partial
scoring: loglik of the same continuation after each option. loglikelihood (LAMBADA): acc = is_greedy,
perplexity = exp(-mean loglik). stderr = sample standard deviation / sqrt(n) (lm-eval `mean_stderr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data import tasks as registry
from pipeline.data.split import Split, split_examples, with_fewshot
from pipeline.data.tasks import Example
from pipeline.data.tokenize import encode_pair


def mean_stderr(x: list[float] | np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    return float(np.std(x, ddof=1) / math.sqrt(len(x)))


@dataclass
class TaskData:
    """One task's evaluation examples (after split and limit) and the split record."""

    name: str
    examples: list[Example]
    split: Split
    n_eval_total: int


def eval_examples(
    name: str,
    mirror_dir: str | None,
    *,
    calib_fraction: float,
    seed: int,
    limit: int | None = None,
    num_fewshot: int = 0,
) -> TaskData:
    """The evaluation split of task `name` (source order), first `limit` of it; never a calibration id."""
    examples = registry.load_examples(name, mirror_dir)
    calib, evals, record = split_examples(examples, calib_fraction=calib_fraction, seed=seed)
    n_total = len(evals)
    if limit is not None:
        evals = evals[:limit]
    if num_fewshot:
        evals = [with_fewshot(e, calib, num_fewshot, seed) for e in evals]
    return TaskData(name, evals, record, n_total)


def requests_of(examples: list[Example], tokenizer: Any, *, add_bos: bool = False) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of every choice of every example, in order; `add_bos` is the model's
    resolved BOS policy (prepended to every context; `loglikelihoods` keeps it when it truncates)."""
    reqs = []
    for ex in examples:
        for ctx, cont in zip(ex.contexts, ex.continuations):
            reqs.append(encode_pair(tokenizer, ctx, cont, add_bos=add_bos))
    return reqs


def per_example(examples: list[Example], lls: list[float], greedy: list[bool]) -> list[dict[str, Any]]:
    """Per-example outcome rows (acc, acc_norm / is_greedy, the logliks)."""
    rows, k = [], 0
    for ex in examples:
        spec = registry.get_task(ex.task)
        n = len(ex.continuations)
        ll = np.array(lls[k : k + n], dtype=np.float64)
        gr = greedy[k : k + n]
        k += n
        row: dict[str, Any] = {"id": ex.id, "gold": ex.gold, "loglik": ll.tolist()}
        if spec.kind == "loglikelihood":
            row["acc"] = float(gr[ex.gold])
            row["loglik_gold"] = float(ll[ex.gold])
        else:
            row["acc"] = float(int(np.argmax(ll)) == ex.gold)
            if spec.continuation is None:
                d = len(spec.target_delimiter)
                clen = np.array([float(len(c) - d) for c in ex.continuations])
            else:
                clen = np.array([float(len(c)) for c in ex.contexts])  # not reported for Winogrande
            row["acc_norm"] = float(int(np.argmax(ll / clen)) == ex.gold)
        rows.append(row)
    return rows


def aggregate(task: str, rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: {"value", "stderr", "n"}} for the metrics the task reports."""
    spec = registry.get_task(task)
    out: dict[str, dict[str, float]] = {}
    n = len(rows)
    for metric in spec.metrics:
        if metric == "perplexity":
            lls = [r["loglik_gold"] for r in rows]
            out[metric] = {"value": math.exp(-float(np.mean(lls))), "stderr": float("nan"), "n": n}
        elif metric in ("acc", "acc_norm"):
            x = [r[metric] for r in rows]
            out[metric] = {"value": float(np.mean(x)), "stderr": mean_stderr(x), "n": n}
    return out
