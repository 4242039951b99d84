"""Checkpoint conversion at scale: time and peak memory of both directions against the stated bound.

    python -m benchmarks convert --config configs/llama3.2_1b_cpt.yaml --work /tmp/convert --json convert.json
    python -m benchmarks convert --config configs/llama3.2_1b_cpt.yaml model.num_layers=32 model.hidden_size=4096 \\
        model.ffn_hidden_size=14336 model.tie_embeddings=false model.rope_scaling_factor=8 --work /tmp/convert

Builds a random bf16 Hugging Face model of the preset's shape (``save_pretrained`` in 5GB shards), then runs
``tools/convert_checkpoint.py`` hf-to-megatron and megatron-to-hf on it, each as its own process, first on a
tiny model of the same kind (the peak of a process that has imported everything: the baseline). For each
direction it records the wall time and the peak resident memory the converter's summary line reports, beside
the bound docs/HUGGINGFACE.md states: baseline + the weights + twice the largest tensor (hf-to-megatron),
baseline + the weights + the largest output shard + the largest tensor (megatron-to-hf). The export's tensors
are compared with the original's, bit for bit, one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from epas.config import load_config
from epas.hf_config import hf_config_from_model
from megatron_training.hf_files import HfWeights

SUMMARY = re.compile(r"^(?P<what>[\w-]+): (?P<tensors>\d+) tensors, .* peak memory (?P<peak>[\d.]+) GiB$", re.M)
GiB = 2**30
EPAS_KEYS = ("sharing_layers", "sharing_mode", "trained_sharing_layers")  # the rest is LlamaConfig's


def random_llama(model, folder: Path, shard_size: str) -> dict:
    """A bf16 ``LlamaForCausalLM`` of ``model``'s shape with N(0, 0.02) weights, saved in ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = hf_config_from_model(model, (), "qk", ())
    config = LlamaConfig(**{key: value for key, value in fields.items() if key not in EPAS_KEYS})
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf = hf.to(torch.bfloat16).to_empty(device="cpu")
    hf.tie_weights()  # to_empty gave the tied head its own storage
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.normal_(0, 0.02)
    hf.save_pretrained(str(folder), max_shard_size=shard_size)
    tensors = list(hf.state_dict().values())
    return {"bytes": sum(t.numel() * t.element_size() for t in tensors),
            "largest_tensor": max(t.numel() * t.element_size() for t in tensors)}


def convert(*argv: str) -> dict:
    """One conversion as its own process: wall time and the summary line's tensor count and peak memory."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *argv], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"convert_checkpoint.py {' '.join(argv)} failed:\n{result.stdout[-3000:]}"
                         f"{result.stderr[-3000:]}")
    match = SUMMARY.search(result.stdout)
    return {"seconds": round(time.perf_counter() - started, 1), "tensors": int(match["tensors"]),
            "peak_gib": float(match["peak"])}


def run(model, work: Path, shard_size: str) -> dict:
    """Both conversions of a random model of ``model``'s shape, in ``work``."""
    sizes = random_llama(model, work / "hf", "5GB")
    results = {"weights_gib": sizes["bytes"] / GiB, "largest_tensor_gib": sizes["largest_tensor"] / GiB}
    results["hf-to-megatron"] = convert("hf-to-megatron", "--input", str(work / "hf"), "--output",
                                        str(work / "ckpt"), "--overwrite")
    results["megatron-to-hf"] = convert("megatron-to-hf", "--input", str(work / "ckpt"), "--output",
                                        str(work / "export"), "--overwrite", "--max-shard-size", shard_size)
    shard = max(path.stat().st_size for path in (work / "export").glob("*.safetensors"))
    results["largest_shard_gib"] = shard / GiB
    original, exported = HfWeights(work / "hf"), HfWeights(work / "export")
    results["export_equal"] = exported.keys() == original.keys() and all(
        torch.equal(exported[name], original[name]) for name in original)
    return results


def main(argv=None, prog: str = "python -m benchmarks convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a preset whose model section gives the shape")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.num_layers=32")
    parser.add_argument("--work", type=Path, required=True, help="a folder for the models (about 3 × the weights)")
    parser.add_argument("--max-shard-size", default="5GB", help="megatron-to-hf's (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    model = load_config(args.config, args.overrides).model
    tiny = load_config(args.config, [*args.overrides, "model.num_layers=2", "model.hidden_size=64",
                                     "model.num_attention_heads=4", "model.num_query_groups=2",
                                     "model.ffn_hidden_size=128", "model.vocab_size=512"]).model
    results = {"baseline": run(tiny, args.work / "tiny", args.max_shard_size),
               "model": run(model, args.work / "model", args.max_shard_size)}
    base = max(results["baseline"][direction]["peak_gib"] for direction in ("hf-to-megatron", "megatron-to-hf"))
    measured = results["model"]
    measured["hf-to-megatron"]["bound_gib"] = base + measured["weights_gib"] + 2 * measured["largest_tensor_gib"]
    measured["megatron-to-hf"]["bound_gib"] = (base + measured["weights_gib"] + measured["largest_shard_gib"]
                                               + measured["largest_tensor_gib"])
    for direction in ("hf-to-megatron", "megatron-to-hf"):
        row = measured[direction]
        print(f"{direction}: {measured['weights_gib']:.2f} GiB in {row['seconds']} s, peak {row['peak_gib']:.2f} GiB, "
              f"bound {row['bound_gib']:.2f} GiB ({'within' if row['peak_gib'] <= row['bound_gib'] else 'ABOVE'})")
    print(f"export equal to the original: {measured['export_equal']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    within = all(measured[d]["peak_gib"] <= measured[d]["bound_gib"] for d in ("hf-to-megatron", "megatron-to-hf"))
    return 0 if within and measured["export_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
