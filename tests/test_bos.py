"""One BOS policy per model (`model.add_bos`): resolved from the tokenizer, used by calibration, multiple-choice
scoring and perplexity windows, kept by left truncation, part of every point's cache key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from pipeline.calibration import CalibrationPlan, build
from pipeline.data.errors import DataError
from pipeline.data.tokenize import encode_pair, resolve_add_bos, tokenizer_adds_bos
from pipeline.evaluate.loglik import loglikelihoods
from pipeline.evaluate.perplexity import perplexity
from pipeline.models.adapters import resolve
from tests.conftest import tiny_config

CORPUS = [
    "the cat sat on the mat and the dog ran in the park",
    "goal do a thing b other",
    "Question: How do I open a jar? Answer: Twist the lid.",
] * 10
TEXT = " = Title = \n\n the cat sat on the mat . \n\n and the dog ran in the park . \n" * 4


def _tokenizer(needs_bos: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose encoding with special tokens prepends <s> (a Llama-style tokenizer) or not."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    if needs_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bos_tok() -> PreTrainedTokenizerFast:
    return _tokenizer(needs_bos=True)


@pytest.fixture(scope="module")
def bos_model(bos_tok):
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.vocab_size = len(bos_tok)
    config.max_position_embeddings = 512
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


class InputSpy:
    """Records the input_ids of every forward pass of `model`."""

    def __init__(self, model):
        self.rows: list[list[int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows += ids.tolist()

    def close(self):
        self.handle.remove()


def _enc(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


def _mirror(tmp_path: Path) -> Path:
    mirror = tmp_path / "mirror"
    (mirror / "piqa").mkdir(parents=True, exist_ok=True)
    long_goal = "the cat sat on the mat and the dog ran in the park " * 3
    rows = [
        {"goal": f"{long_goal}goal {i}", "sol1": f"do a {i}", "sol2": f"do b thing {i}", "label": i % 2}
        for i in range(12)
    ]
    (mirror / "piqa" / "piqa_validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (mirror / "wikitext2").mkdir(exist_ok=True)
    (mirror / "wikitext2" / "wiki.test.raw").write_text(TEXT)
    return mirror


# ----------------------------------------------------------------------------- resolution


def test_auto_follows_the_tokenizer_and_true_false_override(bos_tok):
    plain = _tokenizer(needs_bos=False)
    assert tokenizer_adds_bos(bos_tok) and not tokenizer_adds_bos(plain)
    assert resolve_add_bos("auto", bos_tok) is True and resolve_add_bos("auto", plain) is False
    assert resolve_add_bos(False, bos_tok) is False and resolve_add_bos(True, plain) is True
    with pytest.raises(DataError, match="model.add_bos"):
        resolve_add_bos("yes", bos_tok)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer, eos_token="</s>")
    assert resolve_add_bos("auto", no_bos) is False
    with pytest.raises(DataError, match="bos"):
        resolve_add_bos(True, no_bos)


def test_default_model_smollm2_resolves_to_no_bos():
    path = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("models/smollm2-135m not prepared (dvc repro prepare_model)")
    from transformers import AutoTokenizer

    assert resolve_add_bos("auto", AutoTokenizer.from_pretrained(str(path))) is False


# ----------------------------------------------------------------------------- every input path


def test_every_perplexity_window_starts_with_bos_which_is_never_scored(bos_tok, bos_model):
    ids = _enc(bos_tok, TEXT)
    spy = InputSpy(bos_model)
    try:
        r = perplexity(bos_model, bos_tok, TEXT, seq_len=16, batch_size=2, add_bos=True)
    finally:
        spy.close()
    assert r["add_bos"] is True and r["n_windows"] == -(-len(ids) // 15)
    assert spy.rows and all(row[0] == bos_tok.bos_token_id for row in spy.rows)
    assert sorted(t for row in spy.rows for t in row[1:]) == sorted(ids)  # every text token once, no BOS inside
    assert r["n_scored_tokens"] == len(ids)  # the BOS is input only: every text token, and only those, scored
    off = perplexity(bos_model, bos_tok, TEXT, seq_len=16, add_bos=False)
    assert off["n_scored_tokens"] == len(ids) - off["n_windows"] and off["loglik"] != r["loglik"]


def test_every_calibration_sequence_starts_with_bos_also_when_cut_from_the_left(tmp_path, bos_tok):
    mirror = _mirror(tmp_path)
    plan = CalibrationPlan(
        tasks=("piqa", "wikitext2"),
        mirror_dir=str(mirror),
        n_per_task=4,
        calib_fraction=0.5,
        seed=1,
        num_fewshot=0,
        max_tokens=12,
        add_bos=True,
    )
    seqs, _ = build(plan, bos_tok)
    assert {s.task for s in seqs} == {"piqa", "wikitext2"}
    for s in seqs:
        assert s.input_ids[0] == bos_tok.bos_token_id and bos_tok.bos_token_id not in s.input_ids[1:]
        assert len(s.input_ids) <= 12 and s.n_target <= len(s.input_ids) - 1
    # the piqa contexts are longer than max_tokens: they were cut after the BOS, the gold answer kept
    mc = [s for s in seqs if s.task == "piqa"]
    assert all(len(s.input_ids) == 12 for s in mc)
    off, _ = build(CalibrationPlan(**{**plan.__dict__, "add_bos": False}), bos_tok)
    assert not any(bos_tok.bos_token_id in s.input_ids for s in off)


def test_multiple_choice_truncation_keeps_the_bos(bos_tok, bos_model):
    ctx, cont = encode_pair(
        bos_tok, "the cat sat on the mat and the dog ran in the park Answer:", " Twist the lid.", add_bos=True
    )
    max_length = 8
    spy = InputSpy(bos_model)
    try:
        (s,) = loglikelihoods(
            bos_model, [(ctx, cont)], max_length=max_length, reuse_context=False, bos_id=bos_tok.bos_token_id
        )
    finally:
        spy.close()
    assert spy.rows[0][0] == bos_tok.bos_token_id and len(spy.rows[0]) == max_length
    kept = [ctx[0]] + (ctx + cont)[-max_length:]
    (ref,) = loglikelihoods(bos_model, [(kept[: -len(cont)], cont)], max_length=64, reuse_context=False)
    assert s.loglik == pytest.approx(ref.loglik, abs=1e-5) and s.n_tokens == ref.n_tokens


# ----------------------------------------------------------------------------- cache key


def _params(tmp_path: Path, add_bos) -> dict:
    from tests.test_evaluate import full_params

    return full_params(
        model={"id": "unused", "add_bos": add_bos},
        data={"mirror_dir": str(_mirror(tmp_path)), "calib_fraction": 0.5, "seed": 1},
        evaluate={
            "tasks": ["piqa"],
            "limit": 2,
            "methods": ["dense"],
            "sparsities": [0.5],
            "perplexity": {"task": "wikitext2", "seq_len": 16, "max_windows": 2},
            "max_length": 16,
            "cache_dir": str(tmp_path / "cache"),
        },
    )


def test_a_changed_bos_setting_misses_the_cache_and_is_recorded(tmp_path, bos_tok, bos_model):
    from pipeline.evaluate.config import parse
    from pipeline.evaluate.runner import Evaluator
    from pipeline.params import ParamError

    layout = resolve(bos_model)

    def run(add_bos):
        ev = Evaluator(
            parse(_params(tmp_path, add_bos)), bos_model, bos_tok, layout, "fp0", model_id="tiny", log=lambda s: None
        )
        return {r["task"]: r for r in ev.run()}

    off = run(False)
    assert set(off) == {"piqa", "wikitext2"} and not any(r["cached"] for r in off.values())
    assert all(r["ident"]["task_settings"]["add_bos"] is False for r in off.values())
    on = run(True)
    assert not any(r["cached"] for r in on.values())  # perplexity and multiple choice both rerun
    assert all(r["ident"]["task_settings"]["add_bos"] is True for r in on.values())
    assert on["wikitext2"]["details"]["add_bos"] is True
    assert (
        on["wikitext2"]["metrics"]["token_perplexity"]["value"]
        != off["wikitext2"]["metrics"]["token_perplexity"]["value"]
    )
    # "auto" resolves to True for this tokenizer: the same policy, the same points
    assert all(r["cached"] for r in run("auto").values())
    # the old per-stage keys are gone: one policy per model
    p = _params(tmp_path, "auto")
    p["evaluate"]["add_bos"] = False
    with pytest.raises(ParamError, match="model.add_bos"):
        parse(p)
