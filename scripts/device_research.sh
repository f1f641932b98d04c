#!/usr/bin/env bash
# Issue 11's research run on the GPU machine as one background job that outlives the 600 s of a device call:
# `start` launches it in its own process session (it runs on while the machine stays warm), and each later
# call runs `watch`, which waits up to WATCH_S seconds, prints where the job stands and packs what is done
# into $OUT/accuracy.tgz (so every call brings back the finished parts, and a cut-off session keeps them).
#
#   (after the model's parts are stashed: scripts/device_accuracy.sh ship / stash)
#   MODEL=qwen2.5-coder-0.5b OVERLAY=configs/research.yaml SETS="..." bash scripts/device_research.sh start watch
#   MODEL=qwen2.5-coder-0.5b bash scripts/device_research.sh watch        # again, until "research: done"
#
# The job: prepare, collect + aggregate, then two lanes on the one GPU —
#   train:  TARGETS (device_accuracy.sh train: criterion or criterion:kinds entries), one after another;
#   sweep:  for each POOLS setting in turn: the methods without a predictor (BASE_METHODS), then — once the
#           predictors it needs exist (AWAIT: train-<label>.json, label as in train) — the predictor methods
#           (PRED_METHODS); after the first setting the static criteria table (CRITERIA=1) and the plainact
#           bf16 collect benchmarks (BENCH=1, the default: bench-collect at the run's few-shot setting — or
#           BENCH_BATCH — and 0-shot unless BENCH_0SHOT=0) and the dense row on the full WikiText-2 test
#           (DENSE_FULL=1, the default);
# then the claims and the research report (device_accuracy.sh claims). LIMIT / WINDOWS as device_accuracy.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export WORK=${WORK:-/tmp/shadowllm} MODEL=${MODEL:-smollm2-135m}
A="bash scripts/device_accuracy.sh"
BASE_METHODS=${BASE_METHODS:-'[dense, "static:plainact", "static:fisher", "static:l2_norm", "oracle:plainact"]'}
PRED_METHODS=${PRED_METHODS:-'["shadowllm:plainact", "dejavu:l2_norm", "dejavu_lookahead:l2_norm"]'}
# the predictors the comparison needs first, then the rest of the predictability table
export TARGETS=${TARGETS:-"plainact:shadowllm l2_norm:dejavu,dejavu_lookahead fisher plainact:dejavu,dejavu_lookahead l2_norm:shadowllm"}
AWAIT=${AWAIT:-"plainact-shadowllm l2_norm-dejavu_dejavu_lookahead"}   # train-<label>.json of PRED_METHODS' predictors
export POOLS=${POOLS:-"heads heads,neurons"}   # evaluate.pools settings, one after another
CRITERIA=${CRITERIA:-1}                        # 0: no static-criteria table (run 2 has the nine)

lane() {  # lane NAME COMMAND...: log to $WORK/lane-NAME.log, exit status to $WORK/lane-NAME.rc
  local name=$1; shift
  set +e; "$@" >"$WORK/lane-$name.log" 2>&1; echo $? >"$WORK/lane-$name.rc"; set -e
}

await_predictors() {  # wait for the train-<label>.json of every AWAIT entry (or the train lane's end)
  for t in $AWAIT; do
    while [ ! -f "$WORK/train-$t.json" ]; do
      [ -f "$WORK/lane-train.rc" ] && { echo "research: train ended without train-$t.json" >&2; return 1; }
      sleep 5
    done
  done
}

sweep_lane() {  # pool setting by pool setting (the first one complete before the next starts)
  local first=1
  for p in $POOLS; do
    POOLS=$p METHODS=$BASE_METHODS TAG=base $A sweep || return
    if [ $first = 1 ] && [ "$CRITERIA" = 1 ]; then $A criteria || return; fi
    await_predictors || return
    POOLS=$p METHODS=$PRED_METHODS TAG=pred $A sweep || return
    if [ $first = 1 ]; then
      [ "${BENCH:-1}" = 1 ] && { $A bench || echo "research: bench-collect failed" >&2; }
      [ "${DENSE_FULL:-1}" = 1 ] && { $A dense-full || echo "research: dense-full failed" >&2; }
      first=0
    fi
  done
}

for step in "$@"; do
  case "$step" in
    start)
      mkdir -p "$WORK"
      rm -f "$WORK"/lane-*.rc "$WORK/research.rc"
      # from a copy beside $WORK (not inside: the report reads $WORK/**/records.json.gz): the next call's working tree replaces this one while the job runs
      rm -rf "$WORK-repo" && mkdir -p "$WORK-repo" && tar --exclude=./.ship/"$MODEL" -cf - . | tar -C "$WORK-repo" -xf -
      (cd "$WORK-repo" && setsid nohup bash scripts/device_research.sh run >"$WORK/research.log" 2>&1 </dev/null &)
      echo "research: started" ;;
    run)
      set +e
      $A prepare collect
      rc=$?
      if [ $rc -eq 0 ]; then
        lane train $A train &
        lane sweep sweep_lane &
        wait
        $A claims
        rc=$(cat "$WORK"/lane-*.rc | sort -n | tail -1)
      fi
      echo "$rc" >"$WORK/research.rc" ;;
    watch)
      end=$((SECONDS + ${WATCH_S:-540}))
      while [ ! -f "$WORK/research.rc" ] && [ $SECONDS -lt $end ]; do sleep 5; done
      tail -n 25 "$WORK/timings.log" 2>/dev/null || true
      for f in "$WORK/research.log" "$WORK"/lane-*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 6 "$f"; }; done
      if [ -f "$WORK/research.rc" ]; then echo "research: done, exit $(cat "$WORK/research.rc")"; else echo "research: running"; fi
      $A pack ;;
    *) echo "device_research: unknown step $step" >&2; exit 2 ;;
  esac
done
