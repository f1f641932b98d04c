"""encode_pair (lm-eval 0.4 `_encode_pair`) and perplexity windows on a tiny in-memory byte-level BPE."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.data.errors import DataError
from pipeline.data.tokenize import encode_pair, encode_text_windows, keep_last

CORPUS = [
    "Question: How do I open a jar?\nAnswer: Twist the lid.",
    "The man turned on the faucet therefore water flowed from the spout.",
    "Sarah was a much better surgeon than Maria so she always got the easier cases.",
] * 20


def _tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer()


def enc(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


def test_pair_concatenates_to_whole(tok):
    ctx, cont = encode_pair(tok, "Question: How do I open a jar?\nAnswer:", " Twist the lid.")
    assert ctx + cont == enc(tok, "Question: How do I open a jar?\nAnswer: Twist the lid.")
    assert ctx == enc(tok, "Question: How do I open a jar?\nAnswer:")
    assert tok.decode(cont) == " Twist the lid."
    assert tok.bos_token_id not in ctx + cont


def test_trailing_whitespace_moves_to_continuation(tok):
    ctx, cont = encode_pair(tok, "The man turned on the faucet therefore ", "water flowed")
    assert ctx == enc(tok, "The man turned on the faucet therefore")
    assert tok.decode(cont) == " water flowed"
    assert (ctx, cont) == encode_pair(tok, "The man turned on the faucet therefore", " water flowed")
    ctx2, cont2 = encode_pair(tok, "so she\n\n ", "always")
    assert ctx2 == enc(tok, "so she") and tok.decode(cont2) == "\n\n always"


def test_continuation_is_whole_minus_context_length(tok):
    # A boundary where the context's last token merges with the continuation: lm-eval keeps enc(context)
    # and takes whole[len(enc(context)):], even though ctx + cont then differs from the whole encoding.
    context, continuation = "Twi", "st the lid."
    whole = enc(tok, context + continuation)
    ctx, cont = encode_pair(tok, context, continuation)
    assert ctx == enc(tok, context) and cont == whole[len(ctx) :]


def test_add_bos_and_empty_context(tok):
    ctx, cont = encode_pair(tok, "Answer:", " Twist", add_bos=True)
    assert ctx == [tok.bos_token_id] + enc(tok, "Answer:") and cont == enc(tok, " Twist")
    assert encode_pair(tok, "", " Twist the lid.") == ([tok.bos_token_id], enc(tok, " Twist the lid."))
    no_bos = _tokenizer(bos=False)
    assert encode_pair(no_bos, "", "Twist")[0] == [no_bos.eos_token_id]
    with pytest.raises(DataError, match="bos"):
        encode_pair(no_bos, "Answer:", " Twist", add_bos=True)


def test_windows_cover_text_exactly(tok):
    text = "\n\n".join(CORPUS)
    ids = enc(tok, text)
    for seq_len in (1, 7, 64, len(ids), len(ids) + 5):
        wins = encode_text_windows(tok, text, seq_len)
        assert [t for w in wins for t in w] == ids
        assert all(len(w) == seq_len for w in wins[:-1]) and 1 <= len(wins[-1]) <= seq_len
        assert len(wins) == -(-len(ids) // seq_len)
    with pytest.raises(DataError, match="seq_len"):
        encode_text_windows(tok, text, 0)
    with pytest.raises(DataError, match="empty"):
        encode_text_windows(tok, "", 8)


def test_bos_windows_are_bos_then_seq_len_minus_one_text_tokens(tok):
    text = "\n\n".join(CORPUS)
    ids = enc(tok, text)
    for seq_len in (2, 7, 64, len(ids) + 1, len(ids) + 5):
        wins = encode_text_windows(tok, text, seq_len, add_bos=True)
        assert all(w[0] == tok.bos_token_id and tok.bos_token_id not in w[1:] for w in wins)
        assert [t for w in wins for t in w[1:]] == ids
        assert all(len(w) == seq_len for w in wins[:-1]) and 2 <= len(wins[-1]) <= seq_len
        assert len(wins) == -(-len(ids) // (seq_len - 1))
    assert encode_text_windows(tok, text, 64, add_bos=False) == encode_text_windows(tok, text, 64)
    with pytest.raises(DataError, match="seq_len"):
        encode_text_windows(tok, text, 1, add_bos=True)
    with pytest.raises(DataError, match="bos"):
        encode_text_windows(_tokenizer(bos=False), text, 8, add_bos=True)


def test_left_truncation_keeps_a_leading_bos():
    assert keep_last([0, 5, 6, 7, 8], 3, bos_id=0) == [0, 7, 8]
    assert keep_last([0, 5, 6, 7, 8], 3) == [6, 7, 8]  # no BOS policy: plain lm-eval truncation
    assert keep_last([5, 6, 7, 8], 3, bos_id=0) == [6, 7, 8]  # no BOS in front: nothing to keep
    assert keep_last([0, 5, 6], 3, bos_id=0) == [0, 5, 6]  # short enough: unchanged
