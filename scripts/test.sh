#!/usr/bin/env bash
# The tests: the project's environment (scripts/env.sh: .venv, set up when needed), lint and format, unit tests
# on tiny random models, then (marked slow) the end-to-end `dvc repro` of the default pipeline on a reduced
# config with the real default model. Pass pytest arguments through, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
ruff check . && ruff format --check .   # pyproject.toml [tool.ruff]
# Tiny test models run fastest on one thread; the end-to-end test gives its `dvc repro` all cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python3 -m pytest -q -ra "$@"
