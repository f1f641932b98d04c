"""Collection throughput: `collect` (forward + activation backward + criteria + Parquet) against a
bare training step (forward + `loss.backward()` with parameter gradients) on the same batches.

Runs anywhere torch runs (no mlflow/dvc); the command line is `shadowllm bench-collect` (stages/bench_collect.py),
on the configured model or, with `--config` and `--sequences`, on random weights of a config over saved
sequences (timing does not depend on weight values: how the GPU numbers were taken without the checkpoint).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.collect import CollectParams, collect
from pipeline.models.adapters import Layout
from pipeline.params import ModelParams, ParamError
from pipeline.scoring import Sequence, grad_attention_kernels, pad_batch, score_batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(seqs: list[Sequence], batch_size: int) -> list[list[Sequence]]:
    ordered = sorted(seqs, key=lambda s: len(s.input_ids))  # as collect batches them
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def bare_step(model: nn.Module, batch: list[Sequence]) -> None:
    """One plain training step's work on the same padded batch: forward, CE, backward into params."""
    device = next(model.parameters()).device
    ids, valid, labels = pad_batch(batch, device)
    with grad_attention_kernels(True):  # the kernels collect's backward uses
        logits = model(input_ids=ids, attention_mask=valid.long(), use_cache=False).logits
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
    model.zero_grad(set_to_none=True)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(
    model: nn.Module,
    layout: Layout,
    seqs: list[Sequence],
    criteria_sets: dict[str, list[str]],
    base: CollectParams,
    *,
    repeats: int = 2,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Seconds (best of `repeats`) over all `seqs` for the bare step and for each criteria set,
    both score-only and the full `collect` into a temporary directory (Parquet included)."""
    device = next(model.parameters()).device
    batch_size = base.batch_size
    batches = _batches(seqs, batch_size)
    n_tok = sum(len(s.input_ids) for s in seqs)
    # warm-up (allocator, kernels) on the first batch
    model.requires_grad_(True)
    bare_step(model, batches[0])
    bare = _time(lambda: [bare_step(model, b) for b in batches], device, repeats)
    model.requires_grad_(False)
    out: dict[str, Any] = {
        "examples": len(seqs),
        "tokens": n_tok,
        "batch_size": batch_size,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "bare_seconds": bare,
        "bare_tokens_per_s": n_tok / bare,
        "sets": {},
    }
    for name, crits in criteria_sets.items():
        settings = replace(base, criteria=list(crits), shard_size=len(seqs))
        score_batch(model, layout, batches[0], settings.score)
        scored = _time(lambda s=settings: [score_batch(model, layout, b, s.score) for b in batches], device, repeats)

        def full(s: CollectParams = settings) -> None:
            with tempfile.TemporaryDirectory() as d:
                collect(model, layout, seqs, d, s, meta or {"model": {"dims": layout.dims()}}, progress=False)

        whole = _time(full, device, repeats)
        out["sets"][name] = {
            "criteria": crits,
            "score_seconds": scored,
            "collect_seconds": whole,
            "examples_per_s": len(seqs) / whole,
            "tokens_per_s": n_tok / whole,
            "ratio_to_bare": whole / bare,
        }
    return out


CRITERIA_SETS = {
    "plainact": ["plainact"],
    "predictable": ["plainact", "fisher", "grad_norm", "l2_norm", "snip"],
    "all": ["plainact", "fisher", "grad_norm", "l2_norm", "snip", "grasp", "nwot", "jacov", "epenas"],
}


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"collect throughput on {res['device']} ({res['dtype']}), {res['examples']} examples, "
        f"{res['tokens']} tokens, batch {res['batch_size']}",
        f"  bare forward+backward: {res['bare_seconds']:.3f} s  ({res['bare_tokens_per_s']:.0f} tok/s)",
        f"  {'criteria':<12} {'ex/s':>8} {'tok/s':>9} {'collect s':>10} {'ratio':>7}",
    ]
    for name, s in res["sets"].items():
        lines.append(
            f"  {name:<12} {s['examples_per_s']:8.2f} {s['tokens_per_s']:9.0f} "
            f"{s['collect_seconds']:10.3f} {s['ratio_to_bare']:6.2f}x"
        )
    return "\n".join(lines)


def save_sequences(seqs: list[Sequence], path: str | Path) -> None:
    Path(path).write_text(json.dumps([[s.id, s.task, list(s.input_ids), s.n_target] for s in seqs]))


def load_sequences(path: str | Path) -> list[Sequence]:
    return [Sequence(i, t, tuple(ids), n) for i, t, ids, n in json.loads(Path(path).read_text())]


def random_model(config: str, mp: ModelParams) -> tuple[nn.Module, Layout]:
    """Random weights (seed 0) of a config (a directory holding config.json, or a model id), in `model.dtype` on
    `model.device`: collection timing does not depend on the weight values."""
    from transformers import AutoModelForCausalLM

    from pipeline.models.adapters import resolve
    from pipeline.models.loading import load_config, parse_dtype

    cfg = load_config(config, trust_remote_code=mp.trust_remote_code)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=parse_dtype(mp.dtype)).to(mp.device).eval()
    return model, resolve(model)


def criteria_sets(names: list[str]) -> dict[str, list[str]]:
    """The named criteria sets (CRITERIA_SETS); an unknown name is a one-line error."""
    unknown = [s for s in names if s not in CRITERIA_SETS]
    if unknown:
        raise ParamError(f"unknown criteria sets {unknown}; known: {', '.join(CRITERIA_SETS)}")
    return {k: CRITERIA_SETS[k] for k in names}


def inputs(
    params: dict[str, Any], config: str | None, sequences: str | Path | None
) -> tuple[nn.Module, Layout, list[Sequence], CollectParams]:
    """What `shadowllm bench-collect` times: random weights of `config` over saved `sequences`, or (both None)
    the `model.id` checkpoint over the calibration sequences of `data:` / `collect:`; and the collect params."""
    from pipeline.calibration import CalibrationPlan, build
    from pipeline.data.tokenize import resolve_add_bos
    from pipeline.models.loading import check_model, open_model
    from pipeline.params import DataParams

    mp, dp, cp = ModelParams.from_params(params), DataParams.from_params(params), CollectParams.from_params(params)
    if config is not None:
        model, layout = random_model(config, mp)
        return model, layout, load_sequences(sequences), cp
    check_model(mp)
    m = open_model(mp)
    seqs, _ = build(CalibrationPlan.of(dp, cp, add_bos=resolve_add_bos(mp.add_bos, m.tokenizer)), m.tokenizer)
    return m.model, m.layout, seqs, cp
