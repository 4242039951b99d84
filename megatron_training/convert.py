"""Convert checkpoints between Hugging Face LLaMA folders and this recipe's torch_dist checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output CKPT_DIR
    python tools/convert_checkpoint.py megatron-to-hf --input CKPT_DIR --output HF_DIR \\
        [--iteration N] [--sharing-layers 8,9,10] [--dtype bfloat16] [--tokenizer DIR]

hf-to-megatron writes ``CKPT_DIR/iter_0000000`` (weights only, loadable at any TP/PP layout)
and the tokenizer into ``CKPT_DIR/tokenizer``; train from it with ``checkpoint.load=CKPT_DIR
checkpoint.load_optimizer=false``. megatron-to-hf writes a folder that loads with
``AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)``; its ``sharing_layers``
are the region the checkpoint had reached (override with --sharing-layers, any subset of it).
Both run on CPU as a single process.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import yaml

from epas import cli
from epas.config import ParallelConfig, RunConfig, from_dict, to_dict
from epas.data.tokenizer import load_tokenizer
from epas.errors import ConfigError, InputError
from epas.hf_config import hf_config_from_model, model_config_from_hf
from epas.scheduler import SharingScheduler
from megatron_patches.model import build_model
from megatron_training import checkpointing, distributed
from megatron_training.hf_weights import hf_to_megatron, megatron_to_hf, read_hf_state_dict

TOKENIZER_DIR = "tokenizer"


def _single_process(run: RunConfig) -> RunConfig:
    """The same model as one CPU process with the local spec: any layout's checkpoint maps onto it."""
    run.device, run.spec = "cpu", "local"
    run.parallel = ParallelConfig()
    distributed.initialize(run)
    return run


def _load_tokenizer(folder: Path, vocab_size: int):
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{vocab_size} rows: they belong to different models"
        )
    return tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def hf_to_megatron_checkpoint(source: Path, output: Path) -> Path:
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file} not found: --input must be a Hugging Face model folder")
    if (output / checkpointing.LATEST).exists():
        raise ConfigError(f"{output} already holds a checkpoint; choose an empty --output")
    model = model_config_from_hf(json.loads(config_file.read_text()))
    tokenizer = _load_tokenizer(source, model.vocab_size) if _has_tokenizer(source) else None
    weights = hf_to_megatron(read_hf_state_dict(source), model)

    run = _single_process(RunConfig(model=model))
    megatron_model = build_model(run)
    state = megatron_model.state_dict()
    missing = [name for name in state if name not in weights and not name.endswith("_extra_state")]
    if missing:
        raise ConfigError(f"no Hugging Face weights for {missing[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if state[name].shape != tensor.shape:
                raise ConfigError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(state[name].shape)}")
            state[name].copy_(tensor)
    path = checkpointing.save(output, 0, [megatron_model], None, {"weights_only": True}, run)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output / TOKENIZER_DIR))
    distributed.shutdown()
    print(f"wrote {path}" + (f" and {output / TOKENIZER_DIR}" if tokenizer is not None else ""))
    print("model section for your preset:\n" + yaml.safe_dump({"model": to_dict(model)}, sort_keys=False))
    return path


def _checkpoint_path(source: Path, iteration: int | None) -> Path:
    if iteration is None:
        return checkpointing.resolve(source)
    path = checkpointing.iteration_dir(source, iteration)
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist; iterations in {source}: {sorted(p.name for p in source.glob('iter_*'))}")
    return path


def megatron_to_hf_checkpoint(
    source: Path, output: Path, iteration: int | None, sharing_layers: list[int] | None,
    dtype: str | None, tokenizer_dir: Path | None,
) -> Path:
    from megatron.core import dist_checkpointing

    from epas_hf import EpasLlamaConfig, EpasLlamaForCausalLM, write_model_files

    path = _checkpoint_path(source, iteration)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output} is not empty; choose a new --output folder")
    common = dist_checkpointing.load_common_state_dict(str(path))
    run = from_dict(RunConfig, common["config"])
    trained = ()
    if "epas_scheduler" in common:
        scheduler = SharingScheduler(run.model.num_layers, run.epas)
        scheduler.load_state_dict(common["epas_scheduler"])
        trained = scheduler.current
    trained_dtype = torch.bfloat16 if run.device == "cuda" else torch.float32
    run = _single_process(run)
    megatron_model = build_model(run)
    checkpointing.load(path, [megatron_model], None, run)
    weights = megatron_to_hf(megatron_model.state_dict(), run.model)
    del megatron_model
    distributed.shutdown()

    config = EpasLlamaConfig(
        **hf_config_from_model(run.model, trained if sharing_layers is None else sharing_layers, run.epas.mode, trained)
    )
    config.auto_map = write_model_files(output)
    with torch.device("meta"):
        hf_model = EpasLlamaForCausalLM(config)
    result = hf_model.load_state_dict(weights, assign=True, strict=False)
    expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
    if result.unexpected_keys or sorted(result.missing_keys) != expected_missing:
        raise ConfigError(f"weights do not match the LLaMA layout: {result}")
    hf_model.tie_weights()
    hf_model.to(cli.DTYPES[dtype] if dtype else trained_dtype)
    hf_model.save_pretrained(str(output), max_shard_size="5GB")

    tokenizer_dir = tokenizer_dir or _default_tokenizer(run, source)
    if tokenizer_dir is not None:
        _load_tokenizer(tokenizer_dir, run.model.vocab_size).save_pretrained(str(output))
    else:
        warnings.warn("no tokenizer found (give --tokenizer DIR); the folder holds the model only")
    print(f"wrote {output} from {path}: sharing_layers={list(config.sharing_layers)} "
          f"(trained region {list(trained)}), mode {config.sharing_mode}")
    return output


def _default_tokenizer(run: RunConfig, source: Path) -> Path | None:
    for candidate in (source / TOKENIZER_DIR, Path(run.data.tokenizer) if run.data.tokenizer else None):
        if candidate is not None and _has_tokenizer(candidate):
            return candidate
    return None


def _layer_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("hf-to-megatron", help="Hugging Face LLaMA folder → torch_dist checkpoint")
    to_megatron.add_argument("--input", type=Path, required=True, help="Hugging Face model folder")
    to_megatron.add_argument("--output", type=Path, required=True, help="new checkpoint root")
    to_hf = commands.add_parser("megatron-to-hf", help="torch_dist checkpoint (any layout) → Hugging Face folder")
    to_hf.add_argument("--input", type=Path, required=True, help="checkpoint root (with 'latest') or iter_N folder")
    to_hf.add_argument("--output", type=Path, required=True, help="new Hugging Face folder")
    to_hf.add_argument("--iteration", type=int, help="export iter_N of the checkpoint root (default: latest)")
    to_hf.add_argument("--sharing-layers", type=_layer_list, help="0-based layers in sharing mode (default: the trained region)")
    to_hf.add_argument("--dtype", choices=sorted(cli.DTYPES), help="weights dtype (default: bfloat16 for GPU runs, float32 for CPU)")
    to_hf.add_argument("--tokenizer", type=Path, help="tokenizer folder to copy (default: the run's data.tokenizer)")
    args = parser.parse_args(argv)
    return cli.run(lambda: _convert(args))


def _convert(args) -> None:
    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron_checkpoint(args.input, args.output)
        else:
            megatron_to_hf_checkpoint(
                args.input, args.output, args.iteration, args.sharing_layers, args.dtype, args.tokenizer
            )
    except (ValueError, OSError) as error:  # a sharing set the model refuses, a folder that cannot be written
        if isinstance(error, ConfigError):
            raise
        raise InputError(str(error)) from None


if __name__ == "__main__":
    sys.exit(main())
