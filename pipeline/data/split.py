"""Seeded, recorded, disjoint calibration/evaluation split, and lm-eval style few-shot prefixes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import DataError
from .tasks import Example, get_task


def stable_key(text: str) -> int:
    """Stable 32-bit key of a string (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


@dataclass(frozen=True)
class Split:
    """Which example ids of one task are calibration and which are evaluation, and the seed that chose them."""

    task: str
    seed: int
    calib_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "seed": self.seed,
            "calib_ids": list(self.calib_ids),
            "eval_ids": list(self.eval_ids),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        return cls(str(d["task"]), int(d["seed"]), tuple(d["calib_ids"]), tuple(d["eval_ids"]))


def split_examples(
    examples: list[Example], *, calib_fraction: float, seed: int, max_calib: int | None = None
) -> tuple[list[Example], list[Example], Split]:
    """Split one task's examples into (calibration, evaluation, record).

    A permutation from ``default_rng([seed, crc32(task)])`` reserves the first ``floor(calib_fraction * n)``
    examples as the calibration pool; the rest, in source order, are the evaluation set. ``max_calib`` only
    caps how many of the pool are used (in permutation order), so the evaluation set depends on
    (task, seed, calib_fraction) alone and never overlaps any calibration example.
    """
    if not examples:
        raise DataError("split_examples: no examples to split (empty dataset)")
    tasks = {e.task for e in examples}
    if len(tasks) != 1:
        raise DataError(f"split_examples: examples of one task expected, got {sorted(tasks)}")
    if not 0.0 <= calib_fraction < 1.0:
        raise DataError(f"calib_fraction must be in [0, 1), got {calib_fraction}")
    if max_calib is not None and max_calib < 0:
        raise DataError(f"max_calib must be >= 0, got {max_calib}")
    if len({e.id for e in examples}) != len(examples):
        raise DataError("split_examples: duplicate example ids")
    task = tasks.pop()
    n = len(examples)
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, stable_key(task)]).permutation(n)
    n_pool = int(calib_fraction * n)
    pool = order[:n_pool]
    calib_idx = pool if max_calib is None else pool[:max_calib]
    eval_idx = np.sort(order[n_pool:])
    if len(eval_idx) == 0:
        raise DataError(f"calib_fraction {calib_fraction} leaves no evaluation examples for task '{task}'")
    calib = [examples[i] for i in calib_idx]
    evals = [examples[i] for i in eval_idx]
    record = Split(task, int(seed), tuple(e.id for e in calib), tuple(e.id for e in evals))
    return calib, evals, record


def fewshot_prefix(example: Example, pool: list[Example], k: int, seed: int) -> str:
    """lm-eval style few-shot prefix: ``k`` solved pool examples (never ``example`` itself), each
    ``contexts[gold] + continuations[gold]``, joined and followed by the task's fewshot delimiter ("\\n\\n"),
    to be prepended to every context of ``example``. Deterministic in (seed, example id); "" when k == 0."""
    if k < 0:
        raise DataError(f"fewshot count must be >= 0, got {k}")
    if k == 0:
        return ""
    candidates = [p for p in pool if p.id != example.id]
    if len(candidates) < k:
        raise DataError(
            f"fewshot count {k} exceeds the {len(candidates)} calibration examples available for '{example.id}'"
        )
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, stable_key(example.id)])
    picks = rng.choice(len(candidates), size=k, replace=False)
    delim = get_task(example.task).fewshot_delimiter
    shots = [
        candidates[i].contexts[candidates[i].gold] + candidates[i].continuations[candidates[i].gold] for i in picks
    ]
    return delim.join(shots) + delim


def with_fewshot(example: Example, pool: list[Example], k: int, seed: int) -> Example:
    """``example`` with ``fewshot_prefix`` prepended to every context (same id)."""
    prefix = fewshot_prefix(example, pool, k, seed)
    if not prefix:
        return example
    return replace(example, contexts=tuple(prefix + c for c in example.contexts))
