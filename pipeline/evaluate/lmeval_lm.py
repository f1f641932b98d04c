"""lm-evaluation-harness 0.4 as a front end: the sparse model registered as lm-eval's `LM` named `shadowllm`.

    shadowllm lm-eval --model shadowllm --tasks piqa,lambada_openai --limit 100 \\
        --model_args model=models/smollm2-135m,method=static:plainact,sparsity=0.5,pools=heads

Every task lm-eval knows (its own YAMLs, or `--include_path` ones such as `local_<task>` on the data mirror) runs
under any registered method at any sparsity; docs/lmeval.md has the usage and the parity figures. Importing this
module imports lm-eval (the `lmeval` extra) and registers the adapter; nothing else in the package imports it.

Settings. `params.yaml` (model arg `params`, default `params.yaml`) is the one source of defaults: the adapter
builds the project's `EvalConfig` from it, with the model args in `ARG_PARAMS` (and any dotted key, such as
`evaluate.calibration_examples=32`) applied as `--set` overrides, so a misspelt key is the same one-line error as
in `shadowllm evaluate`. lm-eval's own `--batch_size` and `--device` are not used: lm-eval fills in 1 and cuda:0
when they are not given, which cannot be told from a choice; set `evaluate.batch_size=…` and `model.device=…` in
`--model_args` instead (default: params.yaml's).

Scoring. `loglikelihood` tokenises each (context, continuation) request as `shadowllm evaluate` does
(`encode_pair`, the model's resolved BOS policy) and hands all of them at once to the project's scorer
(`pipeline.evaluate.loglik.loglikelihoods`). lm-eval sends one request per candidate, but the scorer groups
requests whose context tokens are identical: each group's prefix runs once, its per-sequence mask is computed
there, from the features at the last context token, and every continuation of that context is scored on the
prefix's KV cache under that one mask; a context with a single continuation (Winogrande's options, LAMBADA)
reads its features at the same token. So a mask never depends on the candidate, and the scores equal those of
`shadowllm evaluate` on the same documents (results/evaluate/lm_eval_frontend.md). The oracle is the exception:
lm-eval does not say which candidate is gold, so a context's candidates share the oracle mask of the first of them
lm-eval sent (a lone request: its own), not the gold candidate's; use `shadowllm evaluate` for the oracle.

`loglikelihood_rolling` (perplexity tasks) cuts each document into lm-eval's rolling windows
(`get_rolling_token_windows`, context length 1, `evaluate.max_length` tokens, the tokenizer's prefix token first)
and scores every window as plain text, as the project's perplexity does: per-sequence features at the window's
last input token (`pipeline.features.text_position`), never at a scored target. `generate_until` is not
supported (a masked decode loop is the benchmark's, not the evaluator's): such tasks fail with one line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only while empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from pipeline.errors import UserError

NAME = "shadowllm"

# model arg -> params.yaml key it overrides; the value types are lm-eval's parse of `key=value`
ARG_PARAMS = {
    "model": "model.id",
    "dtype": "model.dtype",
    "add_bos": "model.add_bos",
    "mirror_dir": "data.mirror_dir",
    "method": "evaluate.methods",  # one method: name or name:criterion
    "sparsity": "evaluate.sparsities",  # one sparsity
    "pools": "evaluate.pools",  # heads | neurons | heads+neurons
    "scope": "evaluate.scope",
    "hybrid_min_keep": "evaluate.hybrid_min_keep",
    "normalize": "evaluate.normalize",
    "granularity": "evaluate.granularity",
    "max_length": "evaluate.max_length",
    "scores_dir": "evaluate.scores_dir",
    "predictors_dir": "evaluate.predictors_dir",
}
_LISTS = {"method": lambda v: [str(v)], "sparsity": lambda v: [float(v)], "pools": lambda v: str(v).split("+")}


def overrides(model_args: dict[str, Any]) -> list[str]:
    """The `--set key=value` assignments of the model args (unknown plain names are a UserError)."""
    out = []
    for arg, value in model_args.items():
        key = ARG_PARAMS.get(arg, arg if "." in arg else None)
        if key is None:
            known = ", ".join([*ARG_PARAMS, "params", "threads", "a dotted params key"])
            raise UserError(f"unknown model arg {arg!r} for --model {NAME}; known: {known}")
        value = _LISTS.get(arg, lambda v: v)(value)
        out.append(f"{key}={json.dumps(value)}")
    return out


class SparseLM(LM):
    """One method at one sparsity on one model, as an lm-eval `LM` (module docstring)."""

    def __init__(
        self,
        params: str = "params.yaml",
        threads: int | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        **model_args: Any,
    ) -> None:
        super().__init__()
        from pipeline.evaluate.config import parse
        from pipeline.evaluate.runner import Evaluator
        from pipeline.models.loading import check_model, open_model
        from pipeline.params import load, set_override

        del batch_size, max_batch_size, device  # lm-eval's, always set (module docstring): params.yaml decides
        p = load(params)
        for assignment in overrides(model_args):
            set_override(p, assignment)
        cfg = parse(p)
        reference = len(cfg.methods) == 1 and cfg.methods[0].spec.reference  # unpruned: no sparsity to pick
        if len(cfg.methods) != 1 or (not reference and len(cfg.sparsities) != 1):
            raise UserError(f"--model {NAME} runs one method at one sparsity: set method= and sparsity=")
        cfg.check_inputs()
        check_model(cfg.model)
        if threads:
            torch.set_num_threads(int(threads))
        m = open_model(cfg.model)
        self.ev = Evaluator(cfg, m.model, m.tokenizer, m.layout, m.fingerprint, model_id=cfg.model.id, log=print)
        self.cfg, self.model, self.tok = self.ev.cfg, m.model, m.tokenizer  # cfg: add_bos resolved
        self.method = cfg.methods[0]
        unit, note = self.ev.unit_sparsity(self.method, 0.0 if reference else cfg.sparsities[0])
        if unit is None:
            raise UserError(f"--model {NAME}: {note}")
        self.masking = self.ev.masking(self.method, unit)
        self.sparsity = unit
        self.describe = (
            f"{self.method.label} at sparsity {unit:g} of {'+'.join(cfg.pools)} ({cfg.scope}, "
            f"{self.method.spec.granularity(cfg.granularity)}) on {cfg.model.id} ({m.fingerprint})"
            + (f"; {note}" if note else "")
        )
        print(f"{NAME}: {self.describe}", file=sys.stderr)

    # ---- lm-eval's interface
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from pipeline.data.tokenize import encode_pair

        pairs = [encode_pair(self.tok, c, k, add_bos=self.cfg.add_bos) for c, k in (r.args for r in requests)]
        scored = self._loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)
        out = [(s.loglik, s.is_greedy) for s in scored]
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        from pipeline.data.tokenize import _encode, prefix_token_id

        windows, owner = [], []
        for i, r in enumerate(requests):
            ids = _encode(self.tok, r.args[0])  # no special tokens, as lm-eval's HFLM for a causal model
            for w in get_rolling_token_windows(ids, prefix_token_id(self.tok), self.cfg.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        lls = self._text_windows(windows, disable_tqdm=disable_tqdm)
        out = [0.0] * len(requests)
        for i, ll in zip(owner, lls):
            out[i] += ll
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, res)
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        raise UserError(
            f"--model {NAME} scores log-likelihoods only (multiple-choice, loglikelihood and perplexity tasks); "
            "generate_until tasks are not supported"
        )

    # ---- scoring
    def _loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False):
        from pipeline.evaluate.loglik import loglikelihoods

        with tqdm(total=len(pairs), disable=disable_tqdm, desc=f"{NAME} loglikelihood") as bar:
            return loglikelihoods(
                self.model,
                pairs,
                masking=self.masking,
                batch_size=self.cfg.batch_size,
                max_length=self.cfg.max_length,
                bos_id=int(self.tok.bos_token_id) if self.cfg.add_bos else None,
                progress=lambda done, total: bar.update(done - bar.n),
            )

    @torch.no_grad()
    def _text_windows(self, windows: list[tuple[list[int], list[int]]], disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each window's continuation tokens; the window is plain text: per-sequence
        masks read the last input token (`text_position` of context + continuation)."""
        from pipeline.evaluate.forward import ForwardInfo
        from pipeline.evaluate.loglik import _score_rows, pad_batch
        from pipeline.features import text_position

        device = next(self.model.parameters()).device
        seqs = [(list(c) + list(k))[-(self.cfg.max_length + 1) :] for c, k in windows]
        n = [min(len(k), len(s) - 1) for (_, k), s in zip(windows, seqs)]
        out = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        bs = self.cfg.batch_size
        for b0 in tqdm(range(0, len(order), bs), disable=disable_tqdm, desc=f"{NAME} rolling"):
            chunk = order[b0 : b0 + bs]
            ids, valid = pad_batch([seqs[i][:-1] for i in chunk], device)
            info = ForwardInfo(
                ids=ids,
                valid=valid,
                last=valid.sum(1) - 1,
                feat_pos=torch.tensor([text_position(len(seqs[i])) for i in chunk], device=device),
                mask_src=[(tuple(seqs[i]), n[i]) for i in chunk],
            )
            with self.masking.forward(info):
                logits = self.model(input_ids=ids, use_cache=False).logits
            rows = [(len(seqs[i]) - 1 - n[i], seqs[i][-n[i] :]) for i in chunk]
            for i, (ll, _) in zip(chunk, _score_rows(logits, rows)):
                out[i] = ll
        return out


register_model(NAME)(SparseLM)


def harness_main(argv: list[str]) -> None:
    """lm-eval's own command line on `argv`, with `--model shadowllm` registered (`shadowllm lm-eval ...`)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
