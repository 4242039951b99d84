#!/usr/bin/env bash
# The single-GPU training checks, with torch and megatron-core alone (no Transformer Engine, apex,
# flash-attn or network), sized to finish in about 5.5 minutes on one H200:
#   - the GPU tests (pytest -m gpu: tests/test_gpu_local.py; test_gpu_te.py skips without TE);
#   - tools/benchmark.py train, bf16, local spec, seq 2048: the 125M (micro-batch 8) and TinyLlama
#     1.1B (micro-batch 4) presets at sharing 0/25/50% in qk and kv mode beside stock megatron-core
#     GPTModel on the same weights, all seven rows interleaved in the same rounds;
#   - tools/profile_train.py: the operators with the most GPU time in a few 1.1B steps, qk 0% and 50%.
# OUTPUT_DIR receives gpu_tests.xml (junit), train_125m.json, train_1.1b.json, profile_1.1b.txt and
# gpu_check_train.log (everything printed). A failing step is logged and the rest still runs; the
# exit status is 1 if any step failed. Each step has a time limit: 230 + 45 + 70 + 30 = 375 s.
# megatron-core must be importable by $PYTHON (default python3); the repository need not be installed.
#
#   tools/gpu_check_train.sh OUTPUT_DIR
#   EPAS_DRY_RUN=1 tools/gpu_check_train.sh OUTPUT_DIR   # the same steps on the CPU: tiny preset, fp32
#   PEAK_TFLOPS=989 (MFU's peak, H100/H200 dense bf16)
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTPUT_DIR" >&2
    exit 2
fi
source "$(dirname "$0")/gpu_steps.sh"
gpu_start "$1" gpu_check_train.log python3

if [[ ${EPAS_DRY_RUN:-0} == 1 ]]; then  # every step's logic at CPU size
    export EPAS_GPU_TESTS_DEVICE=cpu
    device=cpu small=configs/tiny_cpu.yaml large=configs/tiny_cpu.yaml micro=(2 2) warmup=1 rounds=(2 2) scale=4
    peak=()
else
    device=cuda small=configs/llama_125m.yaml large=configs/tinyllama_1.1b.yaml micro=(8 4) warmup=2 rounds=(15 10) scale=1
    peak=(--peak-tflops "${PEAK_TFLOPS:-989}")
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi

step gpu_tests $((230 * scale)) "$python" -m pytest -q -m gpu -rA -p no:cacheprovider \
    --junitxml "$out/gpu_tests.xml" tests/test_gpu_local.py tests/test_gpu_te.py
train_benchmark 125m $((45 * scale)) "$small" "${micro[0]}" --spec local --device $device "${peak[@]}" \
    --warmup $warmup --rounds "${rounds[0]}"
train_benchmark 1.1b $((70 * scale)) "$large" "${micro[1]}" --spec local --device $device "${peak[@]}" \
    --warmup $warmup --rounds "${rounds[1]}"
step profile_1.1b $((30 * scale)) "$python" tools/profile_train.py --config "$large" --device $device --spec local \
    --micro-batch "${micro[1]}" --sharing 0.5 --mode qk --warmup $warmup --steps 3 --output "$out/profile_1.1b.txt"
gpu_finish
