#!/usr/bin/env bash
# The main job: the project's environment (scripts/env.sh: .venv, set up when needed), then `dvc repro`
# of the default pipeline (pass dvc arguments through, e.g. `bash scripts/repro.sh train`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" MLFLOW_DISABLE_TELEMETRY=true
dvc repro "$@"
