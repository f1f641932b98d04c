#!/usr/bin/env bash
# The accuracy stages (collect -> aggregate -> train -> evaluate) of a named model on the GPU machine:
# the protocol comparison (results/evaluate/protocol/, MODEL=smollm2-135m, the default) and the research
# runs (results/research/<model>/, MODEL=qwen2.5-coder-0.5b OVERLAY=configs/research.yaml). Runs *there*,
# from the repo root, over back-to-back `device` calls: files outside the repo ($WORK, $SHIP) survive
# while the machine stays warm. That machine has no dvc/mlflow/gguf: tracking is off, gguf travels as a
# wheel in .whl/ (with datasets, dill, multiprocess: the mirror is read through datasets), the GGUF model (in parts of PART_MIB MiB) and the data mirror (.ship/data.tar.xz)
# travel in .ship/ (prepared here by `MODEL=... bash scripts/device_accuracy.sh ship`).
#
#   ship              (here) split the model's GGUF into .ship/$MODEL, pack the mirror, the wheels to .whl
#   stash             (there) keep this call's model part(s) in $SHIP
#   prepare           assemble + verify the GGUF, convert it to safetensors, write $WORK/params.yaml:
#                     params.yaml, then $OVERLAY (if set), the device paths, then $SETS (key=value ...)
#   collect           collect + aggregate with $WORK/params.yaml on cuda
#   train             train the predictors on those traces (TARGETS="a b": one criterion after another)
#   stages            collect, train
#   recipes           train the candidate recipes (RECIPES) on the same traces; the one with the best mean
#                     held-out Spearman rho (joint, 3 kinds x 3 targets x heads/neurons) replaces $WORK/predictors
#   sweep             the comparison: heads-only and heads+neurons at 30/50/70 % (METHODS; TAG names the run)
#   criteria          every collected criterion's static ranking at 50 % heads-only (WikiText-2 only)
#   dense-full        dense WikiText-2 on the whole test (every window), apart from the comparison's records
#   bench             plainact-only collect throughput in bf16 (bench-collect): few-shot as set, and 0-shot at batch 64
#   claims            the claims and the research report from every records file
#   pack              $WORK's reports -> $OUT/accuracy.tgz
# e.g. one call: bash scripts/device_accuracy.sh stash prepare stages sweep pack
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/shadowllm}
SHIP=${SHIP:-/tmp/ship}
MODEL=${MODEL:-smollm2-135m}
PART_MIB=${PART_MIB:-45}
GGUF=$(python3 -c "from pipeline.models.named import get; print(get('$MODEL').gguf)")
export SHADOWLLM_TRACKING=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# + peak host/GPU memory; peak.py runs from scripts/, so the repo root goes on the path (no install there)
cli_as() { local label=$1; shift; PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" python3 scripts/peak.py "$label" "$WORK/peaks.log" -- "$@"; }
cli() { cli_as "$1" "$@"; }   # the stage's name as its label
stamp() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$WORK/timings.log"; }

# The comparison (issue 9): every method, both pool settings, enough examples for a mean-accuracy stderr
# of about one point (300 per task where the evaluation split has them; COPA has 50, RTE 138) and 128
# WikiText-2 windows per point.
METHODS=${METHODS:-'[dense, "static:plainact", "static:fisher", "static:l2_norm", "static_raw:plainact", "oracle:plainact",
          "shadowllm:plainact", "dejavu:l2_norm", "dejavu_lookahead:l2_norm"]'}
POOLS=${POOLS:-"heads heads,neurons"}
SWEEP=(--set "evaluate.methods=$METHODS" --set 'evaluate.sparsities=[0.3,0.5,0.7]' --set "evaluate.limit=${LIMIT:-300}"
       --set "evaluate.perplexity.max_windows=${WINDOWS:-128}" --set evaluate.batch_size=64)

# Predictor recipes compared on the GPU (issue 9 item 4/5): name -> train.* overrides.
RECIPES=("e25-none train.epochs=25 train.target_transform=none"
         "e100-none train.epochs=100 train.target_transform=none"
         "e100-rank train.epochs=100 train.target_transform=rank"
         "e100-log train.epochs=100 train.target_transform=log"
         "e200-rank train.epochs=200 train.target_transform=rank")

for step in "$@"; do
  case "$step" in
    ship)
      file=$(python3 -c "from pipeline.models.named import fetch_gguf; print(fetch_gguf('$MODEL', 'models/.cache'))")
      python3 scripts/ship.py split "$file" --out ".ship/$MODEL" --part-mib "$PART_MIB"
      # only the mirror files the registered tasks read (the whole mirror would not fit beside the last part)
      python3 -c "import pipeline.data.tasks as t; print('\n'.join(sorted({'data/' + f \
for n in t.list_tasks() for f in t.get_task(n).mirror_files.values()})))" > .ship/data.list
      tar -C ../shared -cJf .ship/data.tar.xz -T .ship/data.list
      # the GPU machine's python 3.12 lacks these (it has pyarrow, pandas, fsspec, xxhash, huggingface-hub)
      mkdir -p .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
        "gguf==0.19.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" ;;
    stash)
      mkdir -p "$WORK"
      python3 scripts/ship.py stash ".ship/$MODEL" --into "$SHIP/$MODEL" ;;
    prepare)
      mkdir -p "$WORK"
      stamp prepare
      python3 scripts/ship.py assemble "$SHIP/$MODEL" --to "$WORK/gguf/$GGUF"
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
      rm -rf "$WORK/data" "$WORK/mirror" && tar -C "$WORK" -xJf .ship/data.tar.xz && mv "$WORK/data" "$WORK/mirror"
      PYTHONPATH=/tmp/site python3 -c "from pipeline.models.default import convert_gguf; \
convert_gguf('$WORK/gguf/$GGUF', '$WORK/models/$MODEL')"
      # shellcheck disable=SC2086
      python3 scripts/derive_params.py params.yaml "$WORK/params.yaml" ${OVERLAY:-} "model.id=$WORK/models/$MODEL" \
        model.device=cuda train.device=cuda "data.mirror_dir=$WORK/mirror" "evaluate.scores_dir=$WORK/scores" \
        "evaluate.predictors_dir=$WORK/predictors" "evaluate.cache_dir=$WORK/cache" ${SETS:-}
      stamp prepared ;;
    stages) bash "$0" collect train ;;
    collect)
      stamp collect
      cli collect --params "$WORK/params.yaml" --out "$WORK/traces" --metrics "$WORK/collect.json" --no-progress
      stamp aggregate
      cli aggregate --params "$WORK/params.yaml" --traces "$WORK/traces" --out "$WORK/scores" --plots "$WORK/plots/aggregate"
      stamp collected ;;
    train)
      # TARGETS="plainact fisher": one criterion at a time (a call each where one call's 600 s cannot hold all);
      # an entry criterion:kind,kind trains only those kinds (label criterion-kind_kind). The
      # train_tables-<label>.json are merged by `research-report`
      for entry in ${TARGETS:-}; do
        t=${entry%%:*} kinds=() label=$t
        if [[ $entry == *:* ]]; then kinds=(--set "train.kinds=[${entry#*:}]"); label=$t-${entry#*:}; label=${label//,/_}; fi
        stamp "train $label"
        cli_as "train-$label" train --params "$WORK/params.yaml" --traces "$WORK/traces" --scores "$WORK/scores" \
          --out "$WORK/predictors" --metrics "$WORK/train-$label.json" --tables "$WORK/train_tables-$label.json" \
          --plots "$WORK/plots/train" --report "$WORK/train_report-$label.md" --set "aggregate.targets=[$t]" "${kinds[@]}"
      done
      if [ -z "${TARGETS:-}" ]; then
        stamp train
        cli train --params "$WORK/params.yaml" --traces "$WORK/traces" --scores "$WORK/scores" --out "$WORK/predictors" \
          --metrics "$WORK/train.json" --plots "$WORK/plots/train" --report "$WORK/train_report.md"
      fi
      stamp trained ;;
    recipes)
      for r in "${RECIPES[@]}"; do
        read -r name sets <<<"$r"
        stamp "recipe $name"
        # shellcheck disable=SC2086
        python3 scripts/derive_params.py "$WORK/params.yaml" "$WORK/cand/$name.yaml" $sets
        cli train --params "$WORK/cand/$name.yaml" --traces "$WORK/traces" --scores "$WORK/scores" \
          --out "$WORK/cand/$name/predictors" --metrics "$WORK/cand/$name/train.json" --plots "$WORK/cand/$name/plots" \
          --report "$WORK/cand/$name/train_report.md" >/dev/null
      done
      best=$(python3 - "$WORK/cand" <<'PY'
import json, sys
from pathlib import Path
rows = []
for f in sorted(Path(sys.argv[1]).glob("*/train.json")):
    m = json.loads(f.read_text())["predictors"]
    vals = [v[u]["spearman_joint"] for kinds in m.values() for v in kinds.values() for u in ("heads", "neurons")]
    rows.append((sum(vals) / len(vals), f.parent.name))
    print(f"recipe {f.parent.name}: mean held-out joint rho {rows[-1][0]:.4f}", file=sys.stderr)
print(max(rows)[1])
PY
)
      stamp "best recipe $best"
      rm -rf "$WORK/predictors" && cp -r "$WORK/cand/$best/predictors" "$WORK/predictors"
      cp "$WORK/cand/$best/train.json" "$WORK/cand/$best/train_tables.json" "$WORK/"
      cp "$WORK/cand/$best/train_report.md" "$WORK/train_report.md"
      echo "$best" > "$WORK/recipe.txt" ;;
    sweep)
      for pools in $POOLS; do
        name=${pools/,/_}${TAG:+-$TAG}   # TAG: several sweeps of one pool setting (other METHODS) side by side
        stamp "sweep $name"
        cli evaluate --params "$WORK/params.yaml" --out "$WORK/protocol/$name" --set "evaluate.pools=[$pools]" \
          "${SWEEP[@]}" --records "$WORK/protocol/$name/records.json.gz"
      done
      stamp sweep-done ;;
    criteria)
      stamp criteria
      crits=$(python3 -c "import yaml; print(','.join('\"static:%s\"' % c for c in \
yaml.safe_load(open('$WORK/params.yaml'))['collect']['criteria']))")
      cli evaluate --params "$WORK/params.yaml" --out "$WORK/protocol/criteria" --set 'evaluate.tasks=[]' \
        --set "evaluate.methods=[dense,$crits]" --set 'evaluate.sparsities=[0.5]' --set 'evaluate.pools=[heads]' \
        --set "evaluate.perplexity.max_windows=${WINDOWS:-128}" --records "$WORK/protocol/criteria/records.json.gz"
      stamp criteria-done ;;
    dense-full)
      # issue 11 item 3: the dense row on the full WikiText-2 test; its records file is not named records.json.gz,
      # so the report's comparison (128 windows per point, dense included) does not mix it in
      stamp dense-full
      cli evaluate --params "$WORK/params.yaml" --out "$WORK/dense_full" --set 'evaluate.tasks=[]' \
        --set 'evaluate.methods=[dense]' --set 'evaluate.sparsities=[0.5]' --set 'evaluate.pools=[heads]' \
        --set 'evaluate.perplexity.max_windows=null' --records "$WORK/dense_full/dense_full.json.gz"
      stamp dense-full-done ;;
    bench)
      # collect throughput of plainact alone in bf16 (issue 11's 20k tokens/s target): at the run's own few-shot
      # setting and batch (batch 64 of 5-shot sequences ran out of the H200's memory in run 3) or at BENCH_BATCH
      # (bench_collect_bf16_b<BENCH_BATCH>.json), and 0-shot at 64 unless BENCH_0SHOT=0
      cli_as bench-collect bench-collect --params "$WORK/params.yaml" --sets plainact --n-per-task 64 \
        --set model.dtype=bfloat16 ${BENCH_BATCH:+--set collect.batch_size=$BENCH_BATCH} \
        --out "$WORK/bench_collect_bf16${BENCH_BATCH:+_b$BENCH_BATCH}.json"
      if [ "${BENCH_0SHOT:-1}" = 1 ]; then
        cli_as bench-collect-0shot bench-collect --params "$WORK/params.yaml" --sets plainact --n-per-task 64 \
          --set model.dtype=bfloat16 --set collect.batch_size=64 --set collect.num_fewshot=0 \
          --out "$WORK/bench_collect_bf16_0shot.json"
      fi ;;
    claims)
      cli claims "$WORK"/protocol/*/records.json.gz --out "$WORK/protocol/claims.md"
      cli research-report "$WORK" --title "$MODEL" ;;   # report.md, summary.csv, results.csv, plots/
    pack)
      mkdir -p "${OUT:?}"
      # tar does not expand wildcards in the names it archives: the shell does (from $WORK), and only what exists
      files=$(cd "$WORK" && shopt -s nullglob && echo protocol timings.log peaks.log collect.json train.json \
        train_tables.json train-*.json train_tables-*.json train_report*.md recipe.txt cand plots params.yaml \
        scores/scores.json cache dense_full report.md summary.csv results.csv bench_collect_bf16*.json research.log lane-*.log)
      # shellcheck disable=SC2086
      tar -C "$WORK" -czf "$OUT/accuracy.tgz" --exclude='*.parquet' --exclude=models --exclude=gguf --exclude=mirror \
        --exclude=predictors --exclude=traces $files 2>/dev/null || true
      ls -la "$OUT" ;;
    *) echo "device_accuracy: unknown step $step" >&2; exit 2 ;;
  esac
done
