"""The per-part profile's pure pieces: attribution of kernel time to labelled ranges, bytes per part, summary."""

from __future__ import annotations

import pytest
import torch

from pipeline.bench import bounds, profile, shapes


def test_attribute_by_enclosing_range():
    kernels = [(1, 2, "k"), (3, 5, "k"), (6, 7, "k"), (10, 11, "k")]
    spans = [(5.6, 8, "o"), (0, 2.5, "qkv"), (2.9, 5.5, "attention")]
    assert profile.attribute(kernels, spans) == {"qkv": 1.0, "attention": 2.0, "o": 1.0, "other": 1.0}
    assert profile.attribute([], spans) == {}


def test_part_bytes_add_up_to_the_bound_accounting():
    s = shapes.get("llama-3-8b")
    heads = torch.ones(s.layers, s.heads, dtype=torch.bool)
    heads[1:, ::2] = False
    neurons = torch.ones(s.layers, s.ffn, dtype=torch.bool)
    neurons[1:, 1::2] = False
    parts = profile.part_bytes(s, heads, neurons, context=192.0, predictor_bytes=1000)
    total = bounds.step_bytes(s, heads, neurons, batch=1, context=192.0, predictor_bytes=1000)
    assert parts["qkv"] + parts["o"] == pytest.approx(total["attn_bytes"])
    assert parts["mlp_in"] + parts["mlp_out"] == pytest.approx(total["mlp_bytes"])
    assert parts["attention"] == pytest.approx(total["kv_bytes"])
    assert sum(parts.values()) == pytest.approx(total["total_bytes"])


def test_summarize_fraction_of_copy():
    prof = {"parts_us": {"qkv": 10.0, "sample": 2.0}, "kernels_us": {}, "kernel_sum_us": 12.0}
    out = profile.summarize(prof, {"qkv": 4e7}, step_ms=0.015, copy_gbps=4000.0)
    qkv = next(r for r in out["parts"] if r["part"] == "qkv")
    assert qkv["frac_of_copy"] == pytest.approx(1.0)  # 40 MB at 4000 GB/s = 10 µs
    assert qkv["lost_us"] == pytest.approx(0.0)
    assert out["between_kernels_us"] == pytest.approx(3.0)
    sample = next(r for r in out["parts"] if r["part"] == "sample")
    assert sample["frac_of_copy"] is None and sample["lost_us"] == pytest.approx(2.0)
