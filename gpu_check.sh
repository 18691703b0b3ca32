#!/usr/bin/env bash
# gpu_check.sh -- every GPU check of issue 24 in one run, ~7 minutes on one H200: the paper's c2i step eager and
# compiled (bench.py --only step_paper), the GPU tests, GPT-B compiled sampling of 64 images, the memory section
# (measured peaks beside memory.py's plan) and the whole bench.py --device cuda. Without a GPU it runs the same
# commands at the --quick shapes on the CPU (the GPU tests skip), which is how it is tested before meeting a GPU.
#
#     bash gpu_check.sh            # everything; JSON lines in $OUT/bench.jsonl, logs in $OUT/*.log
#     bash gpu_check.sh paper      # only the paper step (~4 min), or: tests | sampling | memory | bench
#
# $OUT defaults to out/gpu_check. Each part runs under its own time limit so one hang cannot eat the rest; the exit
# code is 1 if any part failed or timed out, and the last lines of each log are printed as it finishes (on a CPU
# the limits are 4x).
set -u
cd "$(dirname "$0")"
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
if python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    DEV=cuda; SMALL=''; nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
else
    DEV=cpu; SMALL='--quick'
fi
WHAT=${1:-all}
FAILED=0
part() {  # part NAME SECONDS COMMAND...: run one check, keep its log, say how it ended
    local name=$1 limit=$2; shift 2
    [ "$DEV" = cpu ] && limit=$((limit * 4))  # the CPU path: small shapes, but two shared cores
    [ "$WHAT" = all ] || [ "$WHAT" = "$name" ] || return 0
    echo "== $name ($DEV, at most ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || FAILED=1
}
JSON="--out $OUT/bench.jsonl"
part paper 300 python bench.py --device $DEV $SMALL --only step_paper --reps 1 $JSON
part tests 150 python -m pytest -q -rs -k gpu test_model.py test_train.py
part sampling 90 python bench.py --device $DEV $SMALL --only compile --batch 64 --reps 2 $JSON
part memory 60 python bench.py --device $DEV $SMALL --only memory $JSON
part bench 200 python bench.py --device $DEV $SMALL --reps 1 $JSON
exit $FAILED
