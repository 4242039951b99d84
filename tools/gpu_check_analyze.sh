#!/usr/bin/env bash
# The sharing analyzer's GPU tests (tools/analyze_sharing.py), about 2 minutes on one H200, with
# torch and transformers alone: the planted redundant block found in bf16 (qk and kv), and a random
# TinyLlama-shaped model analysed over 32k tokens with its peak memory that of 8k tokens.
# OUTPUT_DIR receives analyze_tests.xml (junit) and gpu_check_analyze.log (everything printed, the
# timings and peaks included); the exit status is 1 if the tests failed (limit 170 s).
#
#   tools/gpu_check_analyze.sh OUTPUT_DIR
#   EPAS_DRY_RUN=1 tools/gpu_check_analyze.sh OUTPUT_DIR   # the same tests at tiny shapes on the CPU
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTPUT_DIR" >&2
    exit 2
fi
source "$(dirname "$0")/gpu_steps.sh"
gpu_start "$1" gpu_check_analyze.log python3

scale=1
if [[ ${EPAS_DRY_RUN:-0} == 1 ]]; then
    export EPAS_GPU_TESTS_DEVICE=cpu
    scale=4
fi
step analyze_tests $((170 * scale)) "$python" -m pytest -q -s -m gpu -rA -p no:cacheprovider \
    --junitxml "$out/analyze_tests.xml" tests/test_analyze_sharing.py
gpu_finish
