#!/usr/bin/env bash
# Checkpoint conversion at Llama 3.1 8B's size, on the lent machine's CPUs and memory (the GPU is not used):
# benchmarks/conversion.py builds a random bf16 model of Llama-3.1-8B's shape (15 GiB, 128k vocabulary, llama3
# RoPE scaling, untied), converts it with tools/convert_checkpoint.py to torch_dist and back, and records each
# direction's time and peak memory beside the bound of docs/HUGGINGFACE.md; the export is compared with the
# original bit for bit. Needs megatron-core (no Transformer Engine), torch, transformers, safetensors; writes
# the models (about 46 GB) under $CONVERT_WORK (default /tmp/epas-convert, removed at the end) and
# OUT/convert.json, OUT/convert.log.
#
#   bash tools/gpu_check_convert.sh OUT
#   EPAS_CONVERT_DRY_RUN=1 bash tools/gpu_check_convert.sh OUT   # a 30 MB model of the same kind, any machine
#
# Time: about 3 minutes with 16 cores and a local NVMe disk (most of it writing 46 GB); capped at 400 s.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT" >&2
    exit 2
fi
source "$(dirname "$0")/gpu_steps.sh"
gpu_start "$1" convert.log python3
work=${CONVERT_WORK:-/tmp/epas-convert}

if [[ ${EPAS_CONVERT_DRY_RUN:-0} == 1 ]]; then
    shape=(model.num_layers=2 model.hidden_size=256 model.num_attention_heads=4 model.num_query_groups=2
           model.ffn_hidden_size=512 model.vocab_size=32000)
    shards=20MB
else  # Llama 3.1 8B: the 1B preset's kind (GQA 8 groups, 128k vocabulary, theta 500000) at 8B's size
    shape=(model.num_layers=32 model.hidden_size=4096 model.ffn_hidden_size=14336 model.tie_embeddings=false
           model.rope_scaling_factor=8.0)
    shards=5GB
fi
step convert 400 "$python" -m benchmarks convert --config configs/llama3.2_1b_cpt.yaml "${shape[@]}" \
    --work "$work" --max-shard-size "$shards" --json "$out/convert.json"
rm -rf "$work"
gpu_finish
