"""Where predictor features are read: one definition for `collect` and every evaluator (SPEC §5, §6).

A predictor maps the features of one token to the importance of every unit. Training reads them from
the calibration traces, evaluation from the sequence being scored; both must read the *same* token, or
the predictor is run on inputs it never saw (measured on the committed default run before this rule:
held-out ρ of ShadowLLM-plainact heads fell from 0.700 to 0.634 when read one token later, below the
static train mean, 0.678).

- A context + continuation sequence (multiple choice, calibration): the **last context token**, i.e. the
  token right before the first scored one. It is causal and candidate-independent, so all candidates of
  an example share one per-sequence mask and one KV prefix, and a mask never depends on the tokens it
  scores.
- Plain text (a perplexity window or a text calibration sequence, where every token after the first is
  scored): the **second to last** token, so that the window's last token, itself a scored target, never
  influences the mask (the tokens before it do: use `per_token` granularity for a fully causal mask).
"""

from __future__ import annotations


def context_position(n_tokens: int, n_target: int) -> int:
    """Index of the last context token of a sequence of `n_tokens` whose last `n_target` are scored."""
    if not 0 < n_target < n_tokens:
        raise ValueError(f"n_target {n_target} must be in [1, {n_tokens - 1}]")
    return n_tokens - n_target - 1


def text_position(n_tokens: int) -> int:
    """Index of the feature token of a plain-text sequence (every token after the first is scored)."""
    if n_tokens < 2:
        raise ValueError(f"a text sequence needs at least 2 tokens, has {n_tokens}")
    return n_tokens - 2
