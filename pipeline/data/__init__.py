"""Evaluation data: YAML task registry (tasks.py), calibration/evaluation split (split.py),
lm-eval tokenisation (tokenize.py)."""
