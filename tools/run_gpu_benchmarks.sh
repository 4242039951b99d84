#!/usr/bin/env bash
# Every GPU figure of docs/BENCHMARKS.md in one go, on one lent GPU (about 15 minutes on an H100):
#   - the GPU tests (pytest -m gpu: the local-spec tests, and the Transformer Engine spec against the local spec);
#   - training step, bf16 + TE spec: 125M, TinyLlama 1.1B and an 8-layer slice of LLaMA-2 7B, each
#     at sharing 0/25/50% in qk and kv mode beside stock megatron-core GPTModel on the same weights;
#   - decoding: sharing 0/25/50% × batch 1/32 × prompt 512/2048, 128 new tokens, qk and kv, beside
#     transformers' LlamaForCausalLM, on randomly initialised 125M and TinyLlama 1.1B, or on
#     MODEL_DIR (an export from convert_checkpoint.py megatron-to-hf whose trained region covers half of its layers, as after the paper's pretraining),
#     with generate() and again with static caches and CUDA graphs (--cache static);
#   - where the step time goes: tools/profile_train.py on the 1.1B at qk 0% and 50%.
# JSON records, the test results (gpu_tests.xml), the profile, one log (run_gpu_benchmarks.log,
# everything printed), nvidia-smi.txt and the three PNGs go to OUTPUT_DIR. A failing step is logged
# and the rest still runs; the exit status is 1 if any step failed. tools/gpu_check_train.sh is the
# same training part sized for a lent GPU without Transformer Engine (local spec, time limits).
#
#   tools/run_gpu_benchmarks.sh OUTPUT_DIR [MODEL_DIR]
#   PYTHON=.venv/bin/python PEAK_TFLOPS=312 tools/run_gpu_benchmarks.sh out/a100   # e.g. an A100
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUTPUT_DIR [MODEL_DIR]" >&2
    exit 2
fi
model_dir=
if [[ $# -eq 2 ]]; then
    model_dir=$(cd "$2" && pwd) || exit 2
fi
source "$(dirname "$0")/gpu_steps.sh"
gpu_start "$1" run_gpu_benchmarks.log python
peak=(--peak-tflops "${PEAK_TFLOPS:-989}")  # H100 SXM dense bf16

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
step gpu_tests 0 "$python" -m pytest -q -m gpu -rA --junitxml "$out/gpu_tests.xml"

te=(--device cuda --spec te "${peak[@]}" --warmup 3 --rounds 30)
train_benchmark 125m 0 configs/llama_125m.yaml 8 "${te[@]}"
train_benchmark 1.1b 0 configs/tinyllama_1.1b.yaml 4 "${te[@]}"
train_benchmark 7b_slice 0 configs/llama2_7b.yaml 2 "${te[@]}" model.num_layers=8
step profile_1.1b 0 "$python" tools/profile_train.py --config configs/tinyllama_1.1b.yaml --device cuda \
    --spec te --micro-batch 4 --sharing 0.5 --mode qk --output "$out/profile_1.1b.txt"

decode=(--sharing "0,0.25,0.5" --batch "1,32" --prompt "512,2048" --new-tokens 128 --warmup 1
        --rounds 5 --device cuda --dtype bfloat16)
for cache in dynamic static; do
    suffix=$([[ $cache == static ]] && echo _static)
    if [[ -n $model_dir ]]; then
        step "generate$suffix" 0 "$python" -m benchmarks.generate --model "$model_dir" "${decode[@]}" \
            --cache "$cache" --json "$out/generate$suffix.json"
    else
        for preset in llama_125m tinyllama_1.1b; do
            step "generate_$preset$suffix" 0 "$python" -m benchmarks.generate --random-init "configs/$preset.yaml" \
                "${decode[@]}" --cache "$cache" --json "$out/generate_$preset$suffix.json"
        done
    fi
done

step plot_train 0 "$python" tools/plot_benchmark.py "$out"/train_*.json --output "$out/train.png"
dynamic=()
for file in "$out"/generate*.json; do
    [[ $file == *_static.json ]] || dynamic+=("$file")
done
step plot_generate 0 "$python" tools/plot_benchmark.py "${dynamic[@]}" --output "$out/generate.png"
step plot_generate_static 0 "$python" tools/plot_benchmark.py "$out"/generate*_static.json \
    --output "$out/generate_static.png"

gpu_finish
