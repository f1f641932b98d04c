"""Tokenisation exactly as lm-evaluation-harness 0.4 scores continuations, and perplexity windows."""
from __future__ import annotations

from typing import Any

from .errors import DataError


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval's prefix token for an empty context: BOS if the tokenizer has one, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("tokenizer has neither a bos nor an eos token: cannot score an empty context")


def encode_pair(tokenizer: Any, context: str, continuation: str, *,
                add_bos: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval 0.4 ``_encode_pair``.

    Trailing whitespace of the context moves to the continuation; whole = enc(context + continuation),
    ctx = enc(context), cont = whole[len(ctx):]; no special tokens. ``add_bos`` prepends the BOS id to the
    context. An empty context becomes ``[prefix_token_id]`` and the continuation is encoded alone.
    """
    if context == "":
        return [prefix_token_id(tokenizer)], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx):]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise DataError("add_bos is set but the tokenizer has no bos token")
        ctx = [int(tokenizer.bos_token_id)] + ctx
    return ctx, cont


def encode_text_windows(tokenizer: Any, text: str, seq_len: int) -> list[list[int]]:
    """The whole text tokenised once (no special tokens), cut into non-overlapping windows of ``seq_len``
    tokens; the last, partial window is kept."""
    if seq_len <= 0:
        raise DataError(f"seq_len must be > 0, got {seq_len}")
    ids = _encode(tokenizer, text)
    if not ids:
        raise DataError("text to window is empty after tokenisation")
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
