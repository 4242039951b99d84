"""Hugging Face weight files, streamed: read one tensor at a time, written one shard at a time.

A conversion holds the Megatron model once, in its own dtype; these keep the Hugging Face side down to the
tensors in flight (reading) or one output shard (writing), instead of a second copy of the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from epas.errors import ConfigError

WEIGHT_LAYOUTS = (  # (sharded index, single file), in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers checks before it loads a safetensors file


class HfWeights(Mapping[str, torch.Tensor]):
    """The weights of a Hugging Face folder (safetensors or PyTorch ``.bin``, single or sharded), each read from
    its file only when asked for.

    safetensors files are opened with ``safe_open``, whose tensors are memory-mapped: memory holds the tensors
    the caller keeps, never a whole file. A ``.bin`` file is loaded memory-mapped too, one file at a time.
    """

    def __init__(self, folder: Path):
        self.files = _weight_files(folder)  # tensor name -> file
        self._current: tuple[Path, object] | None = None  # the open file and its handle

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if self._current is None or self._current[0] != path:
            self._current = None  # let the previous file go first: a .bin's dict holds all its tensors
            self._current = (path, _open(path))
        handle = self._current[1]
        return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _open(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        return safe_open(str(path), framework="pt")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _weight_files(folder: Path) -> dict[str, Path]:
    for index_name, single_name in WEIGHT_LAYOUTS:
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({name for name in weight_map.values() if not (folder / name).is_file()})
            if missing:
                raise ConfigError(f"{index} lists {', '.join(missing)}, not in {folder}: an incomplete download?")
            return {tensor: folder / name for tensor, name in weight_map.items()}
        single = folder / single_name
        if single.is_file():
            return dict.fromkeys(_open(single).keys(), single)
    raise ConfigError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or their sharded "
        "index (.index.json)"
    )


def shard_plan(shapes: Mapping[str, torch.Tensor], max_shard_size: str):
    """huggingface_hub's split of a state dict into files of at most ``max_shard_size`` (``"5GB"``), named as
    ``save_pretrained`` names them; ``shapes`` may be meta tensors (only names, shapes and dtypes count)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    return split_state_dict_into_shards_factory(
        dict(shapes), get_storage_size=lambda tensor: tensor.numel() * tensor.element_size(),
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
    )


def write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], plan) -> None:
    """Write ``tensors`` (in the plan's order, each its own copy) into the files of ``plan``, each file once its
    tensors are complete, and the index when there are several."""
    from safetensors.torch import save_file

    pending = {name: filename for filename, names in plan.filename_to_tensors.items() for name in names}
    remaining = {filename: len(names) for filename, names in plan.filename_to_tensors.items()}
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        filename = pending.pop(name)
        shards.setdefault(filename, {})[name] = tensor
        remaining[filename] -= 1
        if not remaining[filename]:
            save_file(shards.pop(filename), str(folder / filename), metadata=SAFETENSORS_METADATA)
    if pending:
        raise ConfigError(f"no tensors for {sorted(pending)[:5]}")
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
