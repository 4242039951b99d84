"""Convert checkpoints between Hugging Face LLaMA folders and this recipe's torch_dist checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output CKPT_DIR [--overwrite] \\
        [--dtype bfloat16]
    python tools/convert_checkpoint.py megatron-to-hf --input CKPT_DIR --output HF_DIR [--overwrite] \\
        [--iteration N] [--sharing-layers 8,9,10] [--dtype bfloat16] [--tokenizer DIR] [--max-shard-size 5GB]

hf-to-megatron writes ``CKPT_DIR/iter_0000000`` (weights only, loadable at any TP/PP layout)
and the tokenizer into ``CKPT_DIR/tokenizer``; train from it with ``checkpoint.load=CKPT_DIR
checkpoint.load_optimizer=false``. megatron-to-hf writes a folder that loads with
``AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)``; its ``sharing_layers``
are the region the checkpoint had reached (override with --sharing-layers, any subset of it), and
its bos/eos/pad token ids are the tokenizer's. Both run on CPU as a single process.

Both keep the weights in the checkpoint's own dtype unless --dtype says otherwise, and stream the
Hugging Face side: its tensors are read one at a time (safetensors memory-mapped) and written one
shard at a time, so the Megatron model, held once, is the bulk of the memory used. A progress bar
counts the tensors and bytes written, and a summary line ends the conversion.

Either direction writes everything into ``OUTPUT.tmp-<pid>`` beside OUTPUT and renames it to OUTPUT
as its last step, so a killed conversion leaves no OUTPUT that loads as complete; the next one removes
the leftover. A non-empty OUTPUT is refused unless --overwrite is given, and then it is removed only
once the new folder is in place.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from megatron.core import dist_checkpointing

from epas import cli
from epas.config import ModelConfig, ParallelConfig, RunConfig, from_dict, to_dict
from epas.data.tokenizer import load_tokenizer
from epas.errors import ConfigError, InputError
from epas.hf_config import hf_config_from_model, model_config_from_hf
from epas.scheduler import SharingScheduler
from megatron_patches.model import build_model
from megatron_training import checkpointing, distributed
from megatron_training.conversion_progress import Progress
from megatron_training.hf_files import HfWeights, shard_plan, write_shards
from megatron_training.hf_weights import hf_to_megatron, megatron_to_hf, weight_pairs

TOKENIZER_DIR = "tokenizer"
# Beside OUTPUT: OUTPUT.tmp-<pid> is a conversion being written, OUTPUT.old-<pid> the OUTPUT that an
# --overwrite conversion replaces, until the new one has taken its name.
STAGING, SET_ASIDE = "tmp", "old"
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@contextmanager
def _single_process(run: RunConfig) -> Iterator[RunConfig]:
    """The same model as one CPU process with the local spec: any layout's checkpoint maps onto it. The
    process group ends with the block, also on an error, so a caller can convert again in the same process."""
    run.device, run.spec = "cpu", "local"
    run.parallel = ParallelConfig()
    distributed.initialize(run)
    try:
        yield run
    finally:
        distributed.shutdown()


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


def hf_to_megatron_checkpoint(source: Path, output: Path, overwrite: bool = False, dtype: str | None = None) -> Path:
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file} not found: --input must be a Hugging Face model folder")
    model = model_config_from_hf(json.loads(config_file.read_text()))
    tokenizer = _load_tokenizer(source, model.vocab_size) if _has_tokenizer(source) else None
    weights = hf_to_megatron(HfWeights(source), model)  # names checked here; tensors read as the loop asks
    first = next(weights)  # the embedding: its rows are checked and its dtype known before any other work
    weights = itertools.chain([first], weights)
    with _staged_output(output, overwrite, reads=[source]) as staging:
        with _single_process(RunConfig(model=model)) as run:
            megatron_model = _empty_model(run, cli.DTYPES[dtype] if dtype else first[1].dtype)
            state = {name: tensor for name, tensor in megatron_model.state_dict().items() if tensor is not None}
            missing = sorted(set(state) - {pair.megatron for pair in weight_pairs(model)})
            if missing:
                raise ConfigError(f"no Hugging Face weights for {missing[:5]}")
            with torch.no_grad(), Progress("hf-to-megatron", state.values()) as progress:
                for name, tensor in weights:
                    if state[name].shape != tensor.shape:
                        raise ConfigError(
                            f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(state[name].shape)}"
                        )
                    state[name].copy_(tensor)
                    progress.update(state[name])
                progress.phase(f"writing {output.name}/iter_0000000 (torch_dist)")
                saved = checkpointing.save(staging, 0, [megatron_model], None, {"weights_only": True}, run)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
    path = output / saved.relative_to(staging)
    print(f"wrote {path}" + (f" and {output / TOKENIZER_DIR}" if tokenizer is not None else ""))
    print("model section for your preset:\n" + yaml.safe_dump({"model": to_dict(model)}, sort_keys=False))
    return path


def _empty_model(run: RunConfig, dtype: torch.dtype):
    """The model with its weights in ``dtype``, uninitialised: built on the meta device (no memory, no random
    init), then given storage that fills only as weights are copied or loaded into it."""
    with torch.device("meta"):
        model = build_model(run)
    return model.to(dtype).to_empty(device="cpu")


def _checkpoint_path(source: Path, iteration: int | None) -> Path:
    if iteration is None:
        return checkpointing.resolve(source)
    path = checkpointing.iteration_dir(source, iteration)
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist; iterations in {source}: {sorted(p.name for p in source.glob('iter_*'))}")
    return path


def megatron_to_hf_checkpoint(
    source: Path, output: Path, iteration: int | None, sharing_layers: list[int] | None,
    dtype: str | None, tokenizer_dir: Path | None, overwrite: bool = False, max_shard_size: str = "5GB",
) -> Path:
    from epas_hf import EpasLlamaConfig, write_model_files

    path = _checkpoint_path(source, iteration)
    common = checkpointing.common_state(path)  # checked first: complete, and no code in its pickles
    run = from_dict(RunConfig, common["config"])
    tokenizer_dir = tokenizer_dir or _default_tokenizer(run, source)
    tokenizer = _load_tokenizer(tokenizer_dir, run.model.vocab_size) if tokenizer_dir is not None else None
    if tokenizer is None:
        warnings.warn("no tokenizer found (give --tokenizer DIR): the folder holds the model only, and its "
                      "bos/eos/pad token ids are left unset (null) in config.json and generation_config.json")
    with _staged_output(output, overwrite, reads=[source, tokenizer_dir]) as staging:
        trained = ()
        if "epas_scheduler" in common:
            scheduler = SharingScheduler(run.model.num_layers, run.epas)
            scheduler.load_state_dict(common["epas_scheduler"])
            trained = scheduler.current
        with _single_process(run) as run:
            stored = dist_checkpointing.load_tensors_metadata(str(path))["embedding.word_embeddings.weight"].dtype
            megatron_model = _empty_model(run, stored)
            checkpointing.load(path, [megatron_model], None, run, common)

        config = EpasLlamaConfig(
            **hf_config_from_model(run.model, trained if sharing_layers is None else sharing_layers, run.epas.mode,
                                   trained),
            **{name: getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_IDS},  # generation_config.json too
        )
        config.auto_map = write_model_files(staging)
        _write_weights_and_config(staging, megatron_model, run.model, config, cli.DTYPES[dtype] if dtype else stored,
                                  max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    print(f"wrote {output} from {path}: sharing_layers={list(config.sharing_layers)} "
          f"(trained region {list(trained)}), mode {config.sharing_mode}")
    return output


def _write_weights_and_config(folder: Path, megatron_model, model: ModelConfig, config, dtype: torch.dtype,
                              max_shard_size: str) -> None:
    """The export's weights (sharded safetensors under ``LlamaForCausalLM``'s names, checked against the model
    ``config`` builds), config.json and generation_config.json, as ``save_pretrained`` writes them."""
    from epas_hf import EpasLlamaForCausalLM

    state = {name: tensor for name, tensor in megatron_model.state_dict().items() if tensor is not None}
    shapes = dict(megatron_to_hf({name: torch.empty_like(tensor, device="meta", dtype=dtype)
                                  for name, tensor in state.items()}, model))
    with torch.device("meta"):
        hf_model = EpasLlamaForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in hf_model.state_dict().items()
                if not (config.tie_word_embeddings and name == "lm_head.weight")}
    if {name: tuple(t.shape) for name, t in shapes.items()} != expected:
        raise ConfigError(f"weights do not match the LLaMA layout: {sorted(set(shapes) ^ set(expected))[:5]}")
    tensors = ((name, tensor.to(dtype, copy=True)) for name, tensor in megatron_to_hf(state, model))
    with Progress("megatron-to-hf", shapes.values()) as progress:
        write_shards(folder, progress.track(tensors), shard_plan(shapes, max_shard_size))
    config.architectures = [type(hf_model).__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(str(folder))
    hf_model.generation_config.save_pretrained(str(folder))


@contextmanager
def _staged_output(output: Path, overwrite: bool, reads: list[Path | None]) -> Iterator[Path]:
    """A fresh folder beside ``output`` to write the conversion into, renamed to ``output`` once the block
    completes; on an error it is removed, and a kill leaves it under a name nothing loads."""
    output = Path(os.path.abspath(output))  # a real name to put siblings beside ("." has none)
    if not output.name:
        raise ConfigError(f"--output {output} is the file system's root; name a new folder for the conversion")
    _settle_leftovers(output)  # first: it may put back an OUTPUT that the checks below must see
    _refuse_output(output, overwrite, [path for path in reads if path is not None])
    staging = _sibling(output, STAGING, os.getpid())
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, output)


def _sibling(output: Path, kind: str, pid: int) -> Path:
    return output.with_name(f"{output.name}.{kind}-{pid}")


def _refuse_output(output: Path, overwrite: bool, reads: list[Path]) -> None:
    """Refuse an ``output`` whose replacement would lose something the user did not ask to replace."""
    for path in reads:
        if output.resolve() in (path.resolve(), *path.resolve().parents):
            raise ConfigError(f"--output {output} holds {path}, which this conversion reads; choose another --output")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a folder (a new one, or an old one with --overwrite)")
    names = sorted(item.name for item in output.iterdir()) if output.is_dir() else []
    if names and not overwrite:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ConfigError(
            f"--output {output} is not empty (it holds {shown}); choose a new folder, or give --overwrite to "
            "replace it (its contents are removed only once the new conversion is complete)"
        )


def _settle_leftovers(output: Path) -> None:
    """Deal with what killed conversions into ``output`` left beside it: a staging folder is removed; an
    ``output`` set aside by --overwrite is put back if the new one never took its place, else removed."""
    if not output.parent.is_dir():
        return
    leftover = re.compile(re.escape(output.name) + rf"\.({STAGING}|{SET_ASIDE})-(\d+)")
    for path in sorted(output.parent.iterdir()):
        match = leftover.fullmatch(path.name)
        if match is None:
            continue
        kind, pid = match.group(1), int(match.group(2))
        if pid != os.getpid() and _is_running(pid):
            raise ConfigError(
                f"{path} belongs to process {pid}, still running: another conversion into {output}? Wait for "
                f"it to finish, or remove {path} if process {pid} is not a conversion"
            )
        if kind == SET_ASIDE and not output.exists():
            os.replace(path, output)
            print(f"restored {output} from {path}: a conversion with --overwrite was killed before its new "
                  "folder was in place")
        else:
            shutil.rmtree(path)
            print(f"removed {path}, left by a conversion that was killed before it finished")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _publish(staging: Path, output: Path) -> None:
    """The conversion's last step: ``staging`` becomes ``output``. An existing ``output`` is set aside
    first and removed only once the new one is in place, so at any kill the old or the new folder is
    complete, under ``output`` or (the old one, put back by the next run) beside it."""
    set_aside = _sibling(output, SET_ASIDE, os.getpid()) if output.exists() else None
    if set_aside is not None:
        os.replace(output, set_aside)
    os.replace(staging, output)
    if set_aside is not None:
        shutil.rmtree(set_aside)


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


def _shard_size(text: str) -> str:
    try:
        shard_plan({}, text)  # huggingface_hub's own reading of the size
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


OVERWRITE_HELP = "replace a non-empty --output (removed only once the new folder is complete)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("hf-to-megatron", help="Hugging Face LLaMA folder → torch_dist checkpoint")
    to_megatron.add_argument("--input", type=Path, required=True, help="Hugging Face model folder")
    to_megatron.add_argument("--output", type=Path, required=True, help="new checkpoint root")
    to_megatron.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    to_megatron.add_argument("--dtype", choices=sorted(cli.DTYPES), help="weights dtype (default: the checkpoint's)")
    to_hf = commands.add_parser("megatron-to-hf", help="torch_dist checkpoint (any layout) → Hugging Face folder")
    to_hf.add_argument("--input", type=Path, required=True, help="checkpoint root (with 'latest') or iter_N folder")
    to_hf.add_argument("--output", type=Path, required=True, help="new Hugging Face folder")
    to_hf.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    to_hf.add_argument("--iteration", type=int, help="export iter_N of the checkpoint root (default: latest)")
    to_hf.add_argument("--sharing-layers", type=_layer_list, help="0-based layers in sharing mode (default: the trained region)")
    to_hf.add_argument("--dtype", choices=sorted(cli.DTYPES), help="weights dtype (default: the checkpoint's: "
                       "bfloat16 for GPU runs, float32 for CPU)")
    to_hf.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="largest safetensors file, as save_pretrained's "
                       "max_shard_size (default: %(default)s); a conversion holds one such shard in memory")
    to_hf.add_argument("--tokenizer", type=Path, help="tokenizer folder to copy, whose bos/eos/pad ids the export "
                       "takes (default: CKPT_DIR/tokenizer, else the run's data.tokenizer)")
    args = parser.parse_args(argv)
    return cli.run(lambda: _convert(args))


def _convert(args) -> None:
    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron_checkpoint(args.input, args.output, args.overwrite, args.dtype)
        else:
            megatron_to_hf_checkpoint(
                args.input, args.output, args.iteration, args.sharing_layers, args.dtype, args.tokenizer,
                args.overwrite, args.max_shard_size,
            )
    except (ValueError, OSError) as error:  # a sharing set the model refuses, a folder that cannot be written
        if isinstance(error, ConfigError):
            raise
        raise InputError(str(error)) from None


if __name__ == "__main__":
    sys.exit(main())
