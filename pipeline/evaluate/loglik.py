"""Log-likelihood of continuations, as lm-evaluation-harness 0.4 `HFLM.loglikelihood` computes it.

A request is (context ids, continuation ids) from `encode_pair`. The model input is
`(ctx + cont)[-(max_length + 1):][:-1]`; the result is the summed log-probability of the
continuation tokens and whether each is the greedy argmax (lm-eval's `is_greedy`).

Shared contexts are computed once: requests whose input prefix (everything before the continuation)
is identical form a group; `batch_size` groups' prefixes run as one right-padded batch with a KV cache,
whose logits at each prefix's last token score the first continuation token of every member; the cache
rows are then repeated per member and all members' remaining continuation tokens run as one right-padded
batch (attention mask hides the prefix padding, position ids continue each prefix; a one-token
continuation needs no second pass: RTE, COPA's short answers...). Per-sequence masks are made in the
prefix pass (features at the prefix's last token = the last context token) and handed on to the
continuation pass (`ForwardInfo.reuse`), so every candidate of a context is scored by the same sparse
model; a group is also keyed by the oracle's source sequence, so candidates of two examples that happen
to share a context never share an oracle mask. Methods whose masks are not causal
(`Masking.reuse_context` False) and contexts with one continuation score whole sequences, batched by
length as lm-eval does, with the features read at the same last context token. Right padding needs no
attention mask: under causal attention a real position never sees the padding after it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.tokenize import keep_last
from pipeline.evaluate.forward import ForwardInfo, Masking, dense_masking, reindex
from pipeline.features import context_position


@dataclass(frozen=True)
class Scored:
    loglik: float
    is_greedy: bool
    n_tokens: int


def _prepare(
    ctx: Sequence[int], cont: Sequence[int], max_length: int, bos_id: int | None = None
) -> tuple[list[int], int]:
    """(whole token list truncated from the left to max_length + 1, number of continuation tokens).

    `bos_id` (the model's BOS policy is on): a request starting with the BOS keeps it at position 0 and
    is cut after it (`keep_last`; lm-eval would drop it), as calibration's `mc_sequence` does."""
    if not cont:
        raise ValueError("empty continuation")
    whole = keep_last(list(ctx) + list(cont), max_length + 1, bos_id=bos_id)
    return whole, min(len(cont), len(whole) - 1)


def _score_rows(logits: torch.Tensor, rows: list[tuple[int, list[int]]]) -> list[tuple[float, bool]]:
    """logits [B, T, V]; per row (start position of the scored logits, target tokens)."""
    out = []
    for b, (start, targets) in enumerate(rows):
        lg = logits[b, start : start + len(targets)].float()
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


def pad_batch(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and real-token mask [B, T]."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        valid[b, : len(s)] = True
    return ids.to(device), valid.to(device)


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    masking: Masking | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
    reuse_context: bool = True,
    progress: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
    bos_id: int | None = None,
    mask_sources: Sequence[int] | None = None,
) -> list[Scored]:
    """Score every request; results in request order. `stats` (if given) receives token counts;
    `bos_id` (the model's BOS policy is on) survives left truncation (`_prepare`).

    Masks come from the context only: a per-sequence method reads its features at the last context
    token (`pipeline.features`), and all continuations of a shared context run under the mask its
    prefix pass produced. `mask_sources[i]`: the request whose sequence defines request i's oracle
    mask (the example's gold candidate; default: itself)."""
    masking = masking or dense_masking()
    device = next(model.parameters()).device
    prepared = [_prepare(c, k, max_length, bos_id) for c, k in requests]
    results: list[Scored | None] = [None] * len(prepared)
    st = {"forward_tokens": 0, "request_tokens": sum(len(w) - 1 for w, _ in prepared), "forwards": 0}

    src = list(range(len(prepared))) if mask_sources is None else list(mask_sources)
    source = [(tuple(prepared[j][0]), prepared[j][1]) for j in src]  # (tokens, n scored) per request
    groups: dict[tuple[tuple[int, ...], tuple], list[int]] = defaultdict(list)
    singles: list[int] = []
    if reuse_context and masking.reuse_context:
        for i, (whole, n) in enumerate(prepared):
            groups[(tuple(whole[:-n]), None if mask_sources is None else source[i])].append(i)
        for key in [k for k, v in groups.items() if len(v) < 2]:
            singles += groups.pop(key)
    else:
        singles = list(range(len(prepared)))
    done = 0

    # ---- shared-context groups: prefixes batched (right padded) once, then all continuations on the cache ----
    glist = sorted(groups.items(), key=lambda kv: -len(kv[0][0]))
    for g0 in range(0, len(glist), batch_size):
        chunk = glist[g0 : g0 + batch_size]
        prefixes = [list(p) for (p, _), _ in chunk]
        plen = torch.tensor([len(p) for p in prefixes], device=device)
        ids, pvalid = pad_batch(prefixes, device)
        # the prefix is the context: its last token is the feature token
        info = ForwardInfo(
            ids=ids,
            valid=pvalid,
            last=plen - 1,
            feat_pos=plen - 1,
            mask_src=[source[members[0]] for _, members in chunk],
        )
        with masking.forward(info) as state:
            out = model(input_ids=ids, attention_mask=pvalid.long(), use_cache=True)
        st["forward_tokens"] += int(pvalid.sum().item())
        st["forwards"] += 1
        last_logits = out.logits[torch.arange(len(chunk), device=device), plen - 1].float()
        first = F.log_softmax(last_logits, dim=-1)
        first_arg = last_logits.argmax(-1)
        rows_g, rows_rest, rows_tail = [], [], []  # second-pass rows: group index, input tokens, targets
        for g, (_, members) in enumerate(chunk):
            for i in members:
                whole, n = prepared[i]
                tail = whole[-n:]
                ll0 = first[g, tail[0]].item()
                g0_ok = int(first_arg[g].item()) == tail[0]
                results[i] = Scored(ll0, g0_ok, n)
                if n > 1:
                    rows_g.append((g, i))
                    rows_rest.append(tail[:-1])
                    rows_tail.append(tail[1:])
        if rows_rest:
            cache = _cache_of(out)
            cache.reorder_cache(torch.tensor([g for g, _ in rows_g], device=device))
            cids, cvalid = pad_batch(rows_rest, device)
            gidx = torch.tensor([g for g, _ in rows_g], device=device)
            amask = torch.cat([pvalid[gidx], cvalid], dim=1).long()
            pos = plen[gidx][:, None] + torch.arange(cids.shape[1], device=device)[None, :]
            cinfo = ForwardInfo(
                ids=cids,
                valid=cvalid,
                last=cvalid.sum(1) - 1,
                reuse=None if state is None else reindex(state, gidx),
                mask_src=[source[i] for _, i in rows_g],
            )
            with masking.forward(cinfo):
                logits = model(
                    input_ids=cids, attention_mask=amask, position_ids=pos, **{_CACHE_KW: cache}, use_cache=True
                ).logits
            st["forward_tokens"] += int(cvalid.sum().item())
            st["forwards"] += 1
            for (_, i), (ll, ok) in zip(rows_g, _score_rows(logits, [(0, t) for t in rows_tail])):
                r = results[i]
                results[i] = Scored(r.loglik + ll, r.is_greedy and ok, r.n_tokens)
        done += sum(len(m) for _, m in chunk)
        if progress:
            progress(done, len(prepared))

    # ---- whole sequences, longest first, right padded ----
    singles.sort(key=lambda i: -len(prepared[i][0]))
    for b0 in range(0, len(singles), batch_size):
        chunk = singles[b0 : b0 + batch_size]
        inputs = [prepared[i][0][:-1] for i in chunk]
        ids, valid = pad_batch(inputs, device)
        feat = [context_position(len(prepared[i][0]), prepared[i][1]) for i in chunk]
        info = ForwardInfo(
            ids=ids,
            valid=valid,
            last=valid.sum(1) - 1,
            feat_pos=torch.tensor(feat, device=device),
            mask_src=[source[i] for i in chunk],
        )
        with masking.forward(info):
            logits = model(input_ids=ids, use_cache=False).logits
        st["forward_tokens"] += int(valid.sum().item())
        st["forwards"] += 1
        rows = [(len(prepared[i][0]) - 1 - prepared[i][1], prepared[i][0][-prepared[i][1] :]) for i in chunk]
        for i, (ll, g) in zip(chunk, _score_rows(logits, rows)):
            results[i] = Scored(ll, g, prepared[i][1])
        done += len(chunk)
        if progress:
            progress(done, len(prepared))
    if stats is not None:
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
    return [r for r in results]  # type: ignore[misc]
