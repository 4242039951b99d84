#!/usr/bin/env bash
# Every GPU check of the project, sized for one lent GPU without Transformer Engine, apex or network:
# the environment, then tools/gpu_check_train.sh (GPU tests, training benchmark, profile; about 6
# minutes on an H200), tools/gpu_check_generate.sh (decoding benchmark and tests, 8 minutes at most) and
# tools/gpu_check_analyze.sh (the sharing analyzer's GPU tests, about 2 minutes), each under its own
# time limit. One device call runs 10 minutes at most: pick the parts with PARTS.
# Results land in OUTPUT_DIR/{train,generate,analyze} with one log each, and OUTPUT_DIR/results.tgz holds them all.
# Where $PYTHON cannot import megatron-core, the wheels in .whl/ (megatron-core's) go into a private folder first.
#
#   tools/gpu_check.sh OUTPUT_DIR                 # train, generate, analyze: 17 minutes at most, not one device call
#   PARTS=generate tools/gpu_check.sh OUTPUT_DIR  # the decoding checks, 8 minutes at most: one device call
#   PARTS=analyze tools/gpu_check.sh OUTPUT_DIR   # the analyzer's, 3 minutes at most: the next call
#   PARTS="analyze generate" GENERATE_LIMIT=400 tools/gpu_check.sh OUTPUT_DIR
#                                                 # both in one call of under 10 minutes: the limit cuts
#                                                 # generate()'s rows, which that script runs last
#   PYTHON=.venv/bin/python TRAIN_LIMIT=600 PARTS=train tools/gpu_check.sh out/h100
#   PARTS=convert tools/gpu_check.sh OUTPUT_DIR   # checkpoint conversion at 8B size (tools/gpu_check_convert.sh)
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTPUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
export PYTHON=$python PYTHONUNBUFFERED=1

if ! "$python" -c "import megatron.core" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/epas-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/epas-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # megatron_patches, epas_hf, benchmarks: installed or not

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse HEAD 2> /dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$python" - << 'EOF'
import importlib.metadata as metadata, platform
print("python", platform.python_version())
for name in ("torch", "megatron-core", "transformers", "transformer-engine", "apex", "flash-attn"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "absent")
EOF
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

status=0
part() {  # NAME LIMIT_SECONDS: run tools/gpu_check_NAME.sh under its limit, its output in OUTPUT_DIR/NAME.log
    local name=$1 limit=$2
    echo "=== $name (limit ${limit} s)"
    timeout --kill-after 10 "$limit" bash "tools/gpu_check_$name.sh" "$out/$name" > "$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name exit $rc"
    tail -n 25 "$out/$name.log"
    ((rc == 0)) || status=1
}
for name in ${PARTS:-train generate analyze}; do
    case $name in
        train) part train "${TRAIN_LIMIT:-380}" ;;
        generate) part generate "${GENERATE_LIMIT:-480}" ;;
        analyze) part analyze "${ANALYZE_LIMIT:-180}" ;;
        convert) part convert "${CONVERT_LIMIT:-420}" ;;  # not by default: 8B-sized conversion, CPUs and disk
        *) echo "unknown part $name (train, generate, analyze, convert)" >&2 && status=1 ;;
    esac
done

tar -czf "$out.tgz" -C "$out" . && mv "$out.tgz" "$out/results.tgz"
exit $status
