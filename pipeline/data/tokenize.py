"""Tokenisation exactly as lm-evaluation-harness 0.4 scores continuations, perplexity windows, and the
model's BOS policy.

BOS policy: one boolean per model, resolved once from `model.add_bos` (`auto` | true | false) by
`resolve_add_bos` and used by every path that builds model inputs — calibration sequences (`collect`),
multiple-choice requests and perplexity windows (`evaluate`). `auto` follows the tokenizer's own
behaviour (does encoding with special tokens put the BOS first?). Text is always encoded without special
tokens; when the policy is on, the BOS id is prepended explicitly and survives left truncation
(`keep_last`). Why: a model trained with a BOS at position 0 (Llama, Gemma, Mistral) scores text
without it badly (issue 9: perplexity ~3x too high), while SmolLM2's BOS `<|im_start|>` is a chat
token that its tokenizer never adds (`auto` resolves to false, the setting its reference numbers use).
"""

from __future__ import annotations

from typing import Any

from .errors import DataError

ADD_BOS_PARAM = "model.add_bos"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def require_bos_id(tokenizer: Any) -> int:
    """The tokenizer's BOS id; DataError when it has none (the BOS policy is on for a model without one)."""
    if tokenizer.bos_token_id is None:
        raise DataError(f"add_bos is set ({ADD_BOS_PARAM}) but the tokenizer has no bos token")
    return int(tokenizer.bos_token_id)


def add_bos_setting(model_params: dict[str, Any]) -> bool | str:
    """The validated `add_bos` entry of the `model:` params section: "auto" (also when absent), True or False.

    Cheap (no tokenizer): stages call it before any weights are read."""
    value = model_params.get("add_bos", "auto")
    if isinstance(value, bool) or value == "auto":
        return value
    raise DataError(f"parameter {ADD_BOS_PARAM} must be auto, true or false, got {value!r}")


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """The tokenizer's own policy: True when encoding a text *with* special tokens puts its BOS first.

    Probed by encoding rather than read from `add_bos_token`, which not every tokenizer class has and
    which a template post-processor (Llama-3's `<|begin_of_text|>`) can bypass."""
    if tokenizer.bos_token_id is None:
        return False
    bos = int(tokenizer.bos_token_id)
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    plain = _encode(tokenizer, probe)
    return bool(with_special) and int(with_special[0]) == bos and not (plain and int(plain[0]) == bos)


def resolve_add_bos(setting: bool | str, tokenizer: Any) -> bool:
    """`model.add_bos` resolved against the tokenizer into the one bool every input path uses.

    "auto" -> `tokenizer_adds_bos`; True needs a tokenizer with a BOS token (DataError otherwise)."""
    setting = add_bos_setting({"add_bos": setting})
    if setting == "auto":
        return tokenizer_adds_bos(tokenizer)
    if setting:
        require_bos_id(tokenizer)
    return bool(setting)


def keep_last(ids: list[int], n: int, *, bos_id: int | None = None) -> list[int]:
    """The last `n` tokens of `ids` (left truncation); when `ids` starts with `bos_id` the BOS stays at
    position 0 and the cut is made after it, so the result is [BOS] + the last n - 1 tokens."""
    ids = list(ids)
    if len(ids) <= n:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and n >= 2:
        return [ids[0]] + ids[len(ids) - (n - 1) :]
    return ids[len(ids) - n :]


def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval's prefix token for an empty context: BOS if the tokenizer has one, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("tokenizer has neither a bos nor an eos token: cannot score an empty context")


def encode_pair(
    tokenizer: Any, context: str, continuation: str, *, add_bos: bool = False
) -> tuple[list[int], list[int]]:
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
    cont = whole[len(ctx) :]
    if add_bos:
        ctx = [require_bos_id(tokenizer)] + ctx
    return ctx, cont


def encode_text_windows(tokenizer: Any, text: str, seq_len: int, *, add_bos: bool = False) -> list[list[int]]:
    """The whole text tokenised once (no special tokens), cut into non-overlapping windows of ``seq_len``
    tokens; the last, partial window is kept.

    With ``add_bos`` every window is [BOS] + the next ``seq_len - 1`` text tokens: each window is an
    independent forward pass, so each gets the position-0 token the model expects. The BOS is input only,
    never a target (scoring starts at position 1), so with BOS every text token is scored exactly once;
    without it the first token of each window is context only.
    """
    if seq_len <= 0:
        raise DataError(f"seq_len must be > 0, got {seq_len}")
    ids = _encode(tokenizer, text)
    if not ids:
        raise DataError("text to window is empty after tokenisation")
    if not add_bos:
        return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2 with a BOS token (BOS + one text token), got {seq_len}")
    bos, step = require_bos_id(tokenizer), seq_len - 1
    return [[bos] + ids[i : i + step] for i in range(0, len(ids), step)]
