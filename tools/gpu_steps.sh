# What the GPU scripts share (sourced, not run): an output folder, one log, steps that note a failure
# and go on, and the training benchmark's standard rows.
#
#   gpu_start OUTPUT_DIR LOG_NAME DEFAULT_PYTHON   make OUTPUT_DIR, copy everything printed from here on
#                                                  into OUTPUT_DIR/LOG_NAME, cd to the repository root,
#                                                  put it on PYTHONPATH; $python is $PYTHON or DEFAULT_PYTHON
#   step NAME LIMIT COMMAND...                     run COMMAND, killed after LIMIT seconds (0: no limit)
#   train_benchmark NAME LIMIT PRESET MICRO_BATCH ARGS...
#                                                  tools/benchmark.py train: qk and kv at 0/25/50% beside
#                                                  stock megatron-core, JSON into OUTPUT_DIR/train_NAME.json
#   gpu_finish                                     exit 1 naming the failed steps, else 0

gpu_start() {
    mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
    exec > >(tee -a "$out/$2") 2>&1
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
    python=${PYTHON:-$3}
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # the repository is not installed
    failed=()
}

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), $( ((limit > 0)) && echo "limit $limit s" || echo "no limit")): $*"
    local started=$SECONDS
    if ((limit > 0)); then
        timeout --kill-after 10 "$limit" "$@"  # the whole process group: spawned workers too
    else
        "$@"
    fi
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started)) s"
    ((rc == 0)) || failed+=("$name")
}

train_benchmark() {
    local name=$1 limit=$2 preset=$3 micro_batch=$4
    shift 4
    step "train_$name" "$limit" "$python" tools/benchmark.py train --config "$preset" --mode qk,kv \
        --sharing 0,0.25,0.5 --micro-batch "$micro_batch" --json "$out/train_$name.json" "$@"
}

gpu_finish() {
    if ((${#failed[@]})); then
        echo "failed: ${failed[*]} (see the log above)"
        exit 1
    fi
    echo "all done: $out"
}
