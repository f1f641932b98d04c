#!/usr/bin/env bash
# The accuracy stages (collect -> aggregate -> train -> evaluate) of the default model on the GPU machine,
# and the protocol comparison (results/evaluate/protocol/). Runs *there*, from the repo root, over
# back-to-back `device` calls: files outside the repo ($WORK, $SHIP) survive while the machine stays warm.
# That machine has no dvc/mlflow/gguf: tracking is off, gguf travels as a wheel in .whl/, the GGUF model
# and the data mirror travel in .ship/ (prepared here by `bash scripts/device_accuracy.sh ship`).
#
#   ship              (here) split the GGUF into .ship/smollm2, copy the mirror to .ship/data, gguf wheel to .whl
#   stash             (there) keep this call's model part(s) in $SHIP
#   prepare           assemble + verify the GGUF, convert it to safetensors, write $WORK/params.yaml (device cuda)
#   stages            collect, aggregate, train with the repo's params.yaml on cuda
#   sweep             the comparison: heads-only and heads+neurons at 30/50/70 %, then the claims
#   pack              $WORK's reports -> $OUT/accuracy.tgz
# e.g. one call: bash scripts/device_accuracy.sh stash prepare stages sweep pack
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/shadowllm}
SHIP=${SHIP:-/tmp/ship}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
export SHADOWLLM_TRACKING=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cli() { python3 -m stages.cli "$@"; }
stamp() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$WORK/timings.log"; }

# The comparison (issue 9): every method, both pool settings, enough examples for a mean-accuracy stderr
# of about one point (300 per task where the evaluation split has them; COPA has 50, RTE 138) and 128
# WikiText-2 windows per point.
METHODS='[dense, "static:plainact", "static:fisher", "static:l2_norm", "static_raw:plainact", "oracle:plainact",
          "shadowllm:plainact", "dejavu:l2_norm", "dejavu_lookahead:l2_norm"]'
SWEEP=(--set "evaluate.methods=$METHODS" --set 'evaluate.sparsities=[0.3,0.5,0.7]' --set evaluate.limit=300
       --set evaluate.perplexity.max_windows=128 --set evaluate.batch_size=64)

for step in "$@"; do
  case "$step" in
    ship)
      python3 scripts/ship.py split "$(python3 -c 'import pipeline.models.default as d; print(d.find_gguf("models/.cache"))')" \
        --out .ship/smollm2 --part-mib 45
      rm -rf .ship/data && cp -r ../shared/data .ship/data
      mkdir -p .whl && python3 -m pip download -q --no-deps -d .whl "gguf==0.19.0" ;;
    stash)
      mkdir -p "$WORK"
      python3 scripts/ship.py stash .ship/smollm2 --into "$SHIP/smollm2" ;;
    prepare)
      mkdir -p "$WORK"
      stamp prepare
      python3 scripts/ship.py assemble "$SHIP/smollm2" --to "$WORK/gguf/$GGUF"
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
      rm -rf "$WORK/mirror" && cp -r .ship/data "$WORK/mirror"
      PYTHONPATH=/tmp/site python3 -c "from pipeline.models.default import convert_gguf; \
convert_gguf('$WORK/gguf/$GGUF', '$WORK/models/smollm2-135m')"
      python3 scripts/derive_params.py params.yaml "$WORK/params.yaml" "model.id=$WORK/models/smollm2-135m" \
        model.device=cuda train.device=cuda "data.mirror_dir=$WORK/mirror" "evaluate.scores_dir=$WORK/scores" \
        "evaluate.predictors_dir=$WORK/predictors" "evaluate.cache_dir=$WORK/cache"
      stamp prepared ;;
    stages)
      stamp collect
      cli collect --params "$WORK/params.yaml" --out "$WORK/traces" --metrics "$WORK/collect.json" --no-progress
      stamp aggregate
      cli aggregate --params "$WORK/params.yaml" --traces "$WORK/traces" --out "$WORK/scores" --plots "$WORK/plots/aggregate"
      stamp train
      cli train --params "$WORK/params.yaml" --traces "$WORK/traces" --scores "$WORK/scores" --out "$WORK/predictors" \
        --metrics "$WORK/train.json" --plots "$WORK/plots/train" --report "$WORK/train_report.md"
      stamp stages-done ;;
    sweep)
      for pools in heads heads,neurons; do
        name=${pools/,/_}
        stamp "sweep $name"
        cli evaluate --params "$WORK/params.yaml" --out "$WORK/protocol/$name" --set "evaluate.pools=[$pools]" \
          "${SWEEP[@]}" --records "$WORK/protocol/$name/records.json.gz"
      done
      cli claims "$WORK"/protocol/*/records.json.gz --out "$WORK/protocol/claims.md"
      stamp sweep-done ;;
    pack)
      mkdir -p "${OUT:?}"
      tar -C "$WORK" -czf "$OUT/accuracy.tgz" --exclude='*.parquet' --exclude=models --exclude=gguf --exclude=mirror \
        --exclude=predictors --exclude=traces --exclude=cache protocol timings.log collect.json train.json \
        train_report.md plots params.yaml scores/scores.json 2>/dev/null || true
      ls -la "$OUT" ;;
    *) echo "device_accuracy: unknown step $step" >&2; exit 2 ;;
  esac
done
