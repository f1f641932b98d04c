"""Calibration sequences for `collect`: a seeded slice of each task that evaluation never sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.params import ParamError
from pipeline.scoring import Sequence, mc_sequence, text_sequence

if TYPE_CHECKING:
    from pipeline.collect import CollectParams
    from pipeline.params import DataParams
from pipeline.data import tasks as task_registry
from pipeline.data.split import Split, split_examples, stable_key, with_fewshot
from pipeline.data.tokenize import encode_pair, encode_text_windows, require_bos_id


@dataclass(frozen=True)
class CalibrationPlan:
    tasks: tuple[str, ...]
    mirror_dir: str | None
    n_per_task: int
    calib_fraction: float
    seed: int
    num_fewshot: int
    max_tokens: int
    add_bos: bool  # the model's resolved BOS policy (`pipeline.data.tokenize.resolve_add_bos`)

    @classmethod
    def of(cls, data: DataParams, collect: CollectParams, *, add_bos: bool) -> CalibrationPlan:
        """The calibration examples `collect` scores under these params (evaluation never sees them)."""
        return cls(
            tasks=tuple(collect.tasks),
            mirror_dir=data.mirror_dir,
            n_per_task=collect.n_per_task,
            calib_fraction=data.calib_fraction,
            seed=data.seed,
            num_fewshot=collect.num_fewshot,
            max_tokens=collect.max_tokens,
            add_bos=add_bos,
        )


def text_split(task: str, n_windows: int, *, calib_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded disjoint split of a perplexity task's windows (indices), as `split_examples` does for
    examples: the calibration pool comes first in permutation order, evaluation keeps source order."""
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, stable_key(task)]).permutation(n_windows)
    n_pool = int(calib_fraction * n_windows)
    return [int(i) for i in order[:n_pool]], sorted(int(i) for i in order[n_pool:])


def build(plan: CalibrationPlan, tokenizer: Any) -> tuple[list[Sequence], list[dict[str, Any]]]:
    """Tokenised calibration sequences (tasks in order, `n_per_task` each) and the split records.

    With `plan.add_bos` every sequence starts with the BOS: text windows are [BOS] + max_tokens - 1 text
    tokens (as evaluation's perplexity windows), multiple-choice contexts get it prepended and keep it
    when they are cut from the left to `max_tokens`."""
    bos_id = require_bos_id(tokenizer) if plan.add_bos else None
    seqs: list[Sequence] = []
    records: list[dict[str, Any]] = []
    for name in plan.tasks:
        spec = task_registry.get_task(name)
        if spec.kind == "perplexity":
            text = task_registry.load_text(name, plan.mirror_dir)
            windows = encode_text_windows(tokenizer, text, plan.max_tokens, add_bos=plan.add_bos)
            calib, evals = text_split(name, len(windows), calib_fraction=plan.calib_fraction, seed=plan.seed)
            chosen = calib[: plan.n_per_task]
            seqs += [text_sequence(f"{name}/w{i}", name, windows[i]) for i in chosen if len(windows[i]) > 1]
            records.append(
                Split(
                    name, plan.seed, tuple(f"{name}/w{i}" for i in chosen), tuple(f"{name}/w{i}" for i in evals)
                ).to_dict()
            )
            continue
        examples = task_registry.load_examples(name, plan.mirror_dir)
        calib, _, record = split_examples(
            examples, calib_fraction=plan.calib_fraction, seed=plan.seed, max_calib=plan.n_per_task
        )
        pool = calib  # few-shot demonstrations come from the calibration slice only
        for ex in calib:
            ex = with_fewshot(ex, pool, plan.num_fewshot, plan.seed)
            ctx, cont = encode_pair(tokenizer, ex.contexts[ex.gold], ex.continuations[ex.gold], add_bos=plan.add_bos)
            seqs.append(mc_sequence(ex.id, name, ctx, cont, plan.max_tokens, bos_id=bos_id))
        records.append(record.to_dict())
    if not seqs:
        raise ParamError("no calibration examples (params: collect.n_per_task, data.calib_fraction)")
    return seqs, records


def capped_tasks(plan: CalibrationPlan, records: list[dict[str, Any]]) -> list[str]:
    """One line per task whose calibration pool is smaller than `collect.n_per_task` (`build` then uses the
    whole pool: the default 80 per task exceeds COPA's 50), so the shortfall is said, not silent."""
    lines = []
    for r in records:
        n, total = len(r["calib_ids"]), len(r["calib_ids"]) + len(r["eval_ids"])
        if n < plan.n_per_task:
            lines.append(
                f"{r['task']} has {n} calibration examples (data.calib_fraction {plan.calib_fraction} of {total}), "
                f"fewer than collect.n_per_task {plan.n_per_task}: using {n}"
            )
    return lines
