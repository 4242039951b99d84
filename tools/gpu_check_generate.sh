#!/usr/bin/env bash
# Decoding on one GPU in 8 minutes at most: the transformers EPAS model at sharing 0/25/50% in qk
# and kv mode beside transformers' LlamaForCausalLM on the same random weights, bf16, SDPA, 128 new
# tokens, for the 125M and the TinyLlama 1.1B shapes. Needs torch, transformers and pyyaml only (no
# megatron-core), run from the repository root, no network.
#   1. --cache static, batch 32 x prompt 2048 (the paper's Table 5 case): preallocated caches and
#      each decode step replayed from a CUDA graph, where a step costs its kernels' time
#      (OUT/generate_<preset>_static.json; run again without the LLaMA anchor if it fails).
#   2. generate(cache_implementation="static") compiled by generate() itself (inductor, CUDA graphs)
#      gives the dynamic cache's tokens: the GPU tests of tests/test_hf_static_cache.py, 90 s at most
#      (OUT/static_cache_tests.xml).
#   3. OUT/profile_generate_125m_{static,dynamic}.txt (benchmarks/profile_generate.py: the kernels
#      of a graphed step, the operators of a generate() step, 30 s at most each; PROFILE_DECODE=0
#      skips them).
#   4. generate(), batch 32 and 1 x prompt 2048 and 512, the paper's case first
#      (OUT/generate_<preset>.json, rewritten after every case, so a run cut short keeps what it
#      measured). Last, so that an outer time limit cuts these rows first.
#   Everything printed: OUT/generate.log.
#
#   bash tools/gpu_check_generate.sh OUT
#   EPAS_GENERATE_DRY_RUN=1 bash tools/gpu_check_generate.sh OUT   # the same steps, tiny, on the CPU
#
# Time: each run starts no new case after its budget (--time-budget) and is stopped by `timeout`
# after its cap; the caps add up to 470 s. On an H200 the first generate() case (batch 32, prompt
# 2048) took about 75 s at 125M and 120 s at 1.1B, so the budgets keep to it there.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT" >&2
    exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks, epas_hf, megatron_patches: not installed
python=${PYTHON:-python3}

if [[ ${EPAS_GENERATE_DRY_RUN:-0} == 1 ]]; then
    static=(--device cpu --dtype float32 --batch 2 --prompt 16 --new-tokens 4 --warmup 1 --rounds 2)
    run=(--device cpu --dtype float32 --batch 2 --prompt "16,8" --new-tokens 4 --warmup 1 --rounds 2)
    profile=(--device cpu --dtype float32 --batch 2 --prompt 16 --steps 2 --warmup 1)
    shrink=(model.num_layers=4 model.hidden_size=64 model.num_attention_heads=4 model.ffn_hidden_size=128
            model.vocab_size=512 epas.num_sharing_layers=2)
    export EPAS_GPU_TESTS_DEVICE=cpu  # the static-cache GPU tests, read by tests/ alone
else
    static=(--device cuda --dtype bfloat16 --batch 32 --prompt 2048 --new-tokens 128 --warmup 1 --rounds 10)
    run=(--device cuda --dtype bfloat16 --batch "32,1" --prompt "2048,512" --new-tokens 128 --warmup 1 --rounds 5)
    profile=(--device cuda --dtype bfloat16 --batch 32 --prompt 2048 --steps 8 --warmup 3)
    shrink=()
fi

status=0
decode_rows() {  # CACHE then "PRESET TIME_BUDGET TIMEOUT_CAP" (s) per preset: benchmarks.generate's rows
    local cache=$1 spec preset budget cap anchor options=("${run[@]}") suffix=""
    shift
    if [[ $cache == static ]]; then
        options=("${static[@]}") suffix=_static
    fi
    for spec in "$@"; do
        read -r preset budget cap <<<"$spec"
        for anchor in --anchor --no-anchor; do
            echo "== $preset, $cache cache, $anchor" | tee -a "$out/generate.log"
            if timeout "$cap" "$python" -m benchmarks.generate --random-init "configs/$preset.yaml" --cache "$cache" \
                --sharing "0,0.25,0.5" --mode "qk,kv" "${options[@]}" --time-budget "$budget" "$anchor" \
                --json "$out/generate_$preset$suffix.json" "${shrink[@]}" 2>&1 | tee -a "$out/generate.log"; then
                break
            fi
            status=1
            # a LlamaForCausalLM step that cannot be captured as a CUDA graph must not cost the EPAS rows
            [[ $cache == static ]] || break
        done
    done
}

decode_rows static "llama_125m 20 45" "tinyllama_1.1b 30 75"
echo "== generate() compiling a static cache" | tee -a "$out/generate.log"
timeout --kill-after 10 90 "$python" -m pytest -q -m gpu -rfEs -p no:cacheprovider --junitxml \
    "$out/static_cache_tests.xml" tests/test_hf_static_cache.py 2>&1 | tee -a "$out/generate.log" || status=1
# where a 125M decode step's time goes (the case below the paper's gain): LLaMA, EPAS 0%, qk 50%, with
# the CUDA graphs' kernels and with generate()'s steps
if [[ ${PROFILE_DECODE:-1} == 1 ]]; then
    for cache in static dynamic; do
        timeout 30 "$python" -m benchmarks.profile_generate --random-init configs/llama_125m.yaml --sharing 0.5 \
            --mode qk --cache "$cache" "${profile[@]}" --output "$out/profile_generate_125m_$cache.txt" \
            "${shrink[@]}" > /dev/null 2>> "$out/generate.log" || status=1
    done
fi
decode_rows dynamic "llama_125m 50 80" "tinyllama_1.1b 70 120"
exit "$status"
