#!/usr/bin/env bash
# Every GPU figure of docs/BENCHMARKS.md in one go, on one lent GPU (about 15 minutes on an H100):
#   - the GPU tests (pytest -m gpu: Transformer Engine spec against the local spec);
#   - training step, bf16 + TE spec: 125M, TinyLlama 1.1B and an 8-layer slice of LLaMA-2 7B, each
#     at sharing 0/25/50% in qk and kv mode beside stock megatron-core GPTModel on the same weights;
#   - decoding: sharing 0/25/50% × batch 1/32 × prompt 512/2048, 128 new tokens, qk and kv, beside
#     transformers' LlamaForCausalLM, on randomly initialised 125M and TinyLlama 1.1B, or on
#     MODEL_DIR (an export from convert_checkpoint.py megatron-to-hf whose trained region covers half of its layers, as after the paper's pretraining).
# JSON records, logs and the two PNGs go to OUTPUT_DIR. A failing step is logged and the rest
# still runs; the exit status is 1 if any step failed.
#
#   tools/run_gpu_benchmarks.sh OUTPUT_DIR [MODEL_DIR]
#   PYTHON=.venv/bin/python PEAK_TFLOPS=312 tools/run_gpu_benchmarks.sh out/a100   # e.g. an A100
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUTPUT_DIR [MODEL_DIR]" >&2
    exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
model_dir=
if [[ $# -eq 2 ]]; then
    model_dir=$(cd "$2" && pwd) || exit 2
fi
python=${PYTHON:-python}
peak=${PEAK_TFLOPS:-989}  # H100 SXM dense bf16
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # megatron_patches, epas_hf, tools: installed or not
failed=()

step() {  # NAME COMMAND...: run it, keep its output in OUTPUT_DIR/NAME.log, note a failure, go on
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || failed+=("$name")
}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
step gpu_tests "$python" -m pytest -q -m gpu

train() {  # NAME PRESET MICRO_BATCH [OVERRIDES...]
    local name=$1 preset=$2 micro_batch=$3
    shift 3
    step "train_$name" "$python" tools/benchmark.py train --config "configs/$preset.yaml" \
        --mode qk,kv --sharing 0,0.25,0.5 --micro-batch "$micro_batch" --warmup 3 --rounds 30 \
        --peak-tflops "$peak" --device cuda --spec te --json "$out/train_$name.json" "$@"
}
train 125m llama_125m 8
train 1.1b tinyllama_1.1b 4
train 7b_slice llama2_7b 2 model.num_layers=8

decode=(--sharing "0,0.25,0.5" --batch "1,32" --prompt "512,2048" --new-tokens 128 --warmup 1
        --rounds 5 --device cuda --dtype bfloat16)
if [[ -n $model_dir ]]; then
    step generate "$python" -m benchmarks.generate --model "$model_dir" "${decode[@]}" \
        --json "$out/generate.json"
else
    for preset in llama_125m tinyllama_1.1b; do
        step "generate_$preset" "$python" -m benchmarks.generate --random-init "configs/$preset.yaml" \
            "${decode[@]}" --json "$out/generate_$preset.json"
    done
fi

step plot_train "$python" tools/plot_benchmark.py "$out"/train_*.json --output "$out/train.png"
step plot_generate "$python" tools/plot_benchmark.py "$out"/generate*.json --output "$out/generate.png"

if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (see $out/*.log)" >&2
    exit 1
fi
echo "all done: $out"
