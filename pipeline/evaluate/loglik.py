"""Log-likelihood of continuations, as lm-evaluation-harness 0.4 `HFLM.loglikelihood` computes it.

A request is (context ids, continuation ids) from `encode_pair`. The model input is
`(ctx + cont)[-(max_length + 1):][:-1]`; the result is the summed log-probability of the
continuation tokens and whether each is the greedy argmax (lm-eval's `is_greedy`).

Shared contexts are computed once: requests whose input prefix (everything before the continuation)
is identical form a group; the prefix runs once with a KV cache, whose last logits score the first
continuation token of every member, and the members' remaining continuation tokens run as one
right-padded batch on the repeated cache (a one-token continuation needs no second pass: RTE, COPA's
short answers...). This is only done when the masking method allows it (a mask at a position must
not depend on later tokens): per_sequence masks and two-pass methods score whole sequences, batched
by length as lm-eval does. Right padding needs no attention mask: under causal attention a real
position never sees the padding after it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluate.forward import ForwardInfo, Masking, dense_masking


@dataclass(frozen=True)
class Scored:
    loglik: float
    is_greedy: bool
    n_tokens: int


def _prepare(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """(whole token list truncated from the left to max_length + 1, number of continuation tokens)."""
    if not cont:
        raise ValueError("empty continuation")
    whole = (list(ctx) + list(cont))[-(max_length + 1):]
    return whole, min(len(cont), len(whole) - 1)


def _score_rows(logits: torch.Tensor, rows: list[tuple[int, list[int]]]) -> list[tuple[float, bool]]:
    """logits [B, T, V]; per row (start position of the scored logits, target tokens)."""
    out = []
    for b, (start, targets) in enumerate(rows):
        lg = logits[b, start:start + len(targets)].float()
        logp = F.log_softmax(lg, dim=-1)
        t = torch.tensor(targets, device=lg.device)
        ll = logp.gather(-1, t[:, None]).sum().item()
        greedy = bool((lg.argmax(-1) == t).all().item())
        out.append((ll, greedy))
    return out


def _cache_kw() -> str:
    """transformers 5.x renamed the forward argument `past_key_values` to `cache`."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_KW = _cache_kw()


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None) if name in getattr(out, "keys", lambda: [])() else None
        if c is not None:
            return c
    return out.past_key_values


def _pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        valid[b, :len(s)] = True
    return ids.to(device), valid.to(device)


@torch.no_grad()
def loglikelihoods(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   masking: Masking | None = None, batch_size: int = 16, max_length: int = 2048,
                   reuse_context: bool = True, progress: Callable[[int, int], None] | None = None,
                   stats: dict | None = None) -> list[Scored]:
    """Score every request; results in request order. `stats` (if given) receives token counts."""
    masking = masking or dense_masking()
    device = next(model.parameters()).device
    prepared = [_prepare(c, k, max_length) for c, k in requests]
    results: list[Scored | None] = [None] * len(prepared)
    st = {"forward_tokens": 0, "request_tokens": sum(len(w) - 1 for w, _ in prepared), "forwards": 0}

    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    singles: list[int] = []
    if reuse_context and masking.reuse_context:
        for i, (whole, n) in enumerate(prepared):
            groups[tuple(whole[:-n])].append(i)
        for key in [k for k, v in groups.items() if len(v) < 2]:
            singles += groups.pop(key)
    else:
        singles = list(range(len(prepared)))
    done = 0

    # ---- shared-context groups: prefix once, then the continuations on the repeated cache ----
    for prefix, members in groups.items():
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
        info = ForwardInfo(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool),
                           last=torch.tensor([ids.shape[1] - 1], device=device))
        with masking.forward(info):
            out = model(input_ids=ids, use_cache=True)
        st["forward_tokens"] += ids.shape[1]
        st["forwards"] += 1
        first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
        first_arg = int(out.logits[0, -1].argmax().item())
        tails = [prepared[i][0][-prepared[i][1]:] for i in members]  # continuation tokens
        rest = [t[:-1] for t in tails]  # inputs of the second pass
        ll0 = [first[t[0]].item() for t in tails]
        g0 = [first_arg == t[0] for t in tails]
        need = [j for j, r in enumerate(rest) if r]
        lls, greedy = list(ll0), list(g0)
        if need:
            cache = _cache_of(out)
            cache.batch_repeat_interleave(len(need))
            cids, cvalid = _pad([rest[j] for j in need], device)
            cinfo = ForwardInfo(ids=cids, valid=cvalid, last=cvalid.sum(1) - 1)
            with masking.forward(cinfo):
                logits = model(input_ids=cids, **{_CACHE_KW: cache}, use_cache=True).logits
            st["forward_tokens"] += int(cvalid.sum().item())
            st["forwards"] += 1
            scored = _score_rows(logits, [(0, tails[j][1:]) for j in need])
            for j, (ll, g) in zip(need, scored):
                lls[j] += ll
                greedy[j] = greedy[j] and g
        for j, i in enumerate(members):
            results[i] = Scored(lls[j], greedy[j], len(tails[j]))
        done += len(members)
        if progress:
            progress(done, len(prepared))

    # ---- whole sequences, longest first, right padded ----
    singles.sort(key=lambda i: -len(prepared[i][0]))
    for b0 in range(0, len(singles), batch_size):
        chunk = singles[b0:b0 + batch_size]
        inputs = [prepared[i][0][:-1] for i in chunk]
        ids, valid = _pad(inputs, device)
        info = ForwardInfo(ids=ids, valid=valid, last=valid.sum(1) - 1,
                           full=[prepared[i][0] for i in chunk], n_target=[prepared[i][1] for i in chunk])
        with masking.forward(info):
            logits = model(input_ids=ids, use_cache=False).logits
        st["forward_tokens"] += int(valid.sum().item())
        st["forwards"] += 1
        rows = [(len(prepared[i][0]) - 1 - prepared[i][1], prepared[i][0][-prepared[i][1]:]) for i in chunk]
        for i, (ll, g) in zip(chunk, _score_rows(logits, rows)):
            results[i] = Scored(ll, g, prepared[i][1])
        done += len(chunk)
        if progress:
            progress(done, len(prepared))
    if stats is not None:
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
    return [r for r in results]  # type: ignore[misc]
