"""Perplexity over a long text cut into non-overlapping windows (the GPTQ/SparseGPT/Wanda convention).

The whole text is tokenised once without special tokens and cut into windows of `seq_len` tokens;
each window is an independent forward pass and every token but its first is scored (predicted from
the tokens before it in the same window). The last, partial window is scored too.

BOS (`add_bos`, the model's resolved policy, `pipeline.data.tokenize.resolve_add_bos`): off, a window is
`seq_len` text tokens and its first text token is context only; on, a window is [BOS] + `seq_len - 1`
text tokens, the BOS is input only (never a target) and every text token is scored exactly once. A
model trained with a BOS at position 0 can score windows without it several times worse (issue 9: ~3x);
SmolLM2's tokenizer adds none, so its policy is off.

Reported (see docs/evaluate.md):
- token perplexity  = exp(-Σ loglik / n_scored_tokens);
- word perplexity   = exp(-Σ loglik / n_words), lm-eval 0.4's `word_perplexity` formula with
  n_words = len(re.split(r"\\s+", doc)) summed over the docs (here: one doc, the scored text);
- byte perplexity   = exp(-Σ loglik / n_bytes) and bits_per_byte = -Σ loglik / (n_bytes · ln 2),
  n_bytes = len(doc.encode("utf-8")).
Without BOS the unscored first token of every window (1 in `seq_len`) still counts in n_words and n_bytes,
as the whole text does in lm-eval; the effect is ≤ 1/seq_len on the exponent. The BOS itself is never
part of the doc (not in n_words, n_bytes or n_scored_tokens; it is in n_tokens, the tokens run).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.tokenize import encode_text_windows
from pipeline.evaluate.forward import ForwardInfo, Masking, dense_masking
from pipeline.features import text_position


def count_words(doc: str) -> int:
    """lm-eval 0.4 `weighted_perplexity` word count of one doc."""
    return len(re.split(r"\s+", doc))


@torch.no_grad()
def window_logliks(
    model: nn.Module,
    windows: list[list[int]],
    *,
    batch_size: int = 1,
    masking: Masking | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Summed log-likelihood of tokens 1..n-1 of every window (same order as `windows`)."""
    masking = masking or dense_masking()
    device = next(model.parameters()).device
    out: list[float | None] = [None] * len(windows)
    # equal-length windows batch together (all but the last, partial one): no padding needed
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    done = 0
    i = 0
    while i < len(order):
        n = len(windows[order[i]])
        group = [order[i]]
        while len(group) < batch_size and i + len(group) < len(order) and len(windows[order[i + len(group)]]) == n:
            group.append(order[i + len(group)])
        i += len(group)
        if n < 2:
            for j in group:
                out[j] = 0.0
            continue
        ids = torch.tensor([windows[j] for j in group], dtype=torch.long, device=device)
        # per-sequence masks read the window's second to last token (pipeline.features): the last
        # token, a scored target, never shapes the mask; the oracle scores the window itself
        info = ForwardInfo(
            ids=ids,
            valid=torch.ones_like(ids, dtype=torch.bool),
            last=torch.full((len(group),), n - 1, dtype=torch.long, device=device),
            feat_pos=torch.full((len(group),), text_position(n), dtype=torch.long, device=device),
            mask_src=[(tuple(windows[j]), n - 1) for j in group],
        )
        with masking.forward(info):
            logits = model(input_ids=ids, use_cache=False).logits
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        ll = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)
        for j, v in zip(group, ll.tolist()):
            out[j] = float(v)
        done += len(group)
        if progress is not None:
            progress(done, len(windows))
    return [float(v) for v in out]  # type: ignore[arg-type]


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    masking: Masking | None = None,
    exclude: set[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    add_bos: bool = False,
) -> dict[str, Any]:
    """Token, word and byte perplexity of `text` (first `max_windows` windows when set; windows whose
    index is in `exclude` — those overlapping calibration text — are skipped). `add_bos`: every window
    starts with the BOS, which is never scored (module docstring)."""
    windows = encode_text_windows(tokenizer, text, seq_len, add_bos=add_bos)
    n_all = len(windows)
    exclude = exclude or set()
    keep = [i for i in range(n_all) if i not in exclude]
    if max_windows is not None:
        keep = keep[:max_windows]
    windows = [windows[i] for i in keep]
    t0 = time.perf_counter()
    lls = window_logliks(model, windows, batch_size=batch_size, masking=masking, progress=progress)
    elapsed = time.perf_counter() - t0
    doc = text if len(windows) == n_all else tokenizer.decode([t for w in windows for t in w[int(add_bos) :]])
    n_scored = sum(max(len(w) - 1, 0) for w in windows)
    total = sum(lls)
    n_words, n_bytes = count_words(doc), len(doc.encode("utf-8"))
    full = [ll for w, ll in zip(windows, lls) if len(w) == seq_len]
    n_full = sum(seq_len - 1 for _ in full)
    return {
        "token_perplexity": math.exp(-total / n_scored),
        "word_perplexity": math.exp(-total / n_words),
        "byte_perplexity": math.exp(-total / n_bytes),
        "bits_per_byte": -total / (n_bytes * math.log(2)),
        # GPTQ variant: the last partial window dropped
        "token_perplexity_full_windows": math.exp(-sum(full) / n_full) if n_full else float("nan"),
        "loglik": total,
        "n_scored_tokens": n_scored,
        "n_tokens": sum(len(w) for w in windows),
        "n_windows": len(windows),
        "n_windows_total": n_all,
        "n_windows_excluded": len(exclude),
        "n_words": n_words,
        "n_bytes": n_bytes,
        "seq_len": seq_len,
        "add_bos": bool(add_bos),
        "seconds": elapsed,
        "window_logliks": lls,
    }
