"""Decode-latency benchmark for contextual sparsity (SPEC §8).

Import-light on purpose: nothing here imports mlflow or dvc, and Triton is imported only by
`pipeline.bench.kernels_triton` (the GPU path). The CPU path (`backend="torch"`) runs the same
engine with torch reference kernels, which is how CI tests it.
"""
