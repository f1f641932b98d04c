"""Metric names built from method titles are valid MLflow names (a title's parentheses once failed evaluate)."""

from __future__ import annotations

import pytest

from pipeline.tracking import metric_name


def test_method_titles_become_valid_mlflow_metric_names():
    validation = pytest.importorskip("mlflow.utils.validation")
    for key in (
        "dejavu-l2_norm (dense inputs)/s50/mean_acc",
        "oracle-plainact (gold scores)/s30/piqa_acc",
        "static_raw-fisher (raw mean)/s70/word_perplexity",
    ):
        name = metric_name(key)
        validation._validate_metric_name(name)
        assert name.replace("_", "").replace(" ", "") != "" and "/s" in name
    assert metric_name("shadowllm-plainact/s50/mean_acc") == "shadowllm-plainact/s50/mean_acc"
