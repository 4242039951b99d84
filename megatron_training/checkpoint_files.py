"""Check a torch_dist checkpoint folder before megatron-core reads it: complete, and free of code.

megatron-core reads ``.metadata`` with ``pickle.load`` (torch DCP's ``FileSystemReader``) and each byte
item of the ``.distcp`` shards (the RNG states, the layers' extra states) with
``torch.load(weights_only=False)``; either can run any code a crafted file asks for, and a file cut
short fails deep inside torch naming none. :func:`verify_checkpoint` reads those files first: the
metadata through an allow-list of the classes torch writes there, ``common.pt`` and every byte item
through torch's weights-only unpickler, and it checks that every file the metadata points at exists
and is long enough. It reads no tensor data, so it costs milliseconds even for a 7B checkpoint.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from epas.errors import InputError

METADATA = ".metadata"
COMMON = "common.pt"
BACKENDS = "metadata.json"
EXPECTED_BACKENDS = {"sharded_backend": "torch_dist", "common_backend": "torch"}

# Every global a torch_dist ``.metadata`` of this project refers to (read from real ones with a
# recording unpickler), plus torch's dtypes. Each is a plain record, an Enum, or torch.Size: building
# one runs no code of the file's choosing.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a tensor layout from its name (torch.strided)
    "torch": {"Size", *(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes in METADATA_GLOBALS; anything else is refused before it is looked up."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise _refused(self.path, f"{module}.{name}")


def _refused(path: Path, name: str) -> InputError:
    return InputError(
        f"{path} asks to load {name}, which a checkpoint never holds: reading it would run code from the "
        "file. Refused; load only checkpoints whose origin you trust (a checkpoint you wrote was altered)"
    )


def _incomplete(file: Path, problem: str) -> InputError:
    return InputError(
        f"{file} {problem}: the checkpoint {file.parent} is incomplete; load an earlier complete one "
        "(another iter_N folder)"
    )


def _unreadable(file: Path, error: BaseException) -> InputError:
    return _incomplete(file, f"is truncated or unreadable ({type(error).__name__}: {error})")


def verify_checkpoint(path: Path) -> None:
    """Raise InputError, naming the file, unless the checkpoint folder ``path`` is complete and every
    object megatron-core will unpickle from it is plain data."""
    path = Path(path)
    _check_backends(path / BACKENDS)
    metadata = _read_metadata(path / METADATA)
    _weights_only_load(path / COMMON)
    storage = _storage(path, metadata)
    _check_sizes(path, storage.values())
    _check_byte_items(path, metadata, storage)


def _check_backends(file: Path) -> None:
    """metadata.json names the formats megatron-core will read with; only torch_dist is checked here."""
    if not file.is_file():
        raise _incomplete(file, "is missing")
    try:
        backends = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise _unreadable(file, error) from error
    found = {key: backends.get(key) for key in EXPECTED_BACKENDS} if isinstance(backends, dict) else backends
    if found != EXPECTED_BACKENDS:
        raise InputError(f"{file} declares {found}; this recipe writes and reads {EXPECTED_BACKENDS} checkpoints only")


def _read_metadata(file: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    if not file.is_file():
        raise _incomplete(file, "is missing")
    try:
        with file.open("rb") as stream:
            metadata = _MetadataUnpickler(stream, file).load()
    except InputError:
        raise
    except Exception as error:  # a cut-short pickle fails with any of several errors
        raise _unreadable(file, error) from error
    if not isinstance(metadata, Metadata) or not all(
        isinstance(table, dict) for table in (metadata.state_dict_metadata, metadata.storage_data)
    ):
        raise InputError(f"{file} holds a {type(metadata).__name__} without the tables of torch's checkpoint Metadata")
    return metadata


def _weights_only_load(file: Path, data: bytes | None = None):
    """``file`` (or ``data``, a slice of it) through torch's weights-only unpickler: tensors, containers
    and numbers. This recipe's common.pt and byte items need nothing more (checked on real checkpoints);
    megatron-core, once imported, adds a few plain classes of its own to torch's allow-list."""
    if data is None and not file.is_file():
        raise _incomplete(file, "is missing")
    try:
        return torch.load(file if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused is None:
            raise InputError(f"{file} holds something torch's weights-only loader refuses ({error})") from error
        name = refused.group(1)
        raise _refused(file, name if "." in name else f"builtins.{name}") from error
    except Exception as error:
        raise _unreadable(file, error) from error


def _storage(path: Path, metadata) -> dict:
    """The metadata's storage entries, each checked to name a file inside the checkpoint, untransformed."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    storage = metadata.storage_data
    for index, info in storage.items():
        inside = isinstance(info, _StorageInfo) and isinstance(info.relative_path, str) and (
            info.relative_path not in ("", ".", "..") and Path(info.relative_path).name == info.relative_path
        )
        if not (isinstance(index, MetadataIndex) and inside and all(
            isinstance(n, int) and n >= 0 for n in (info.offset, info.length)
        )):
            raise InputError(
                f"{path / METADATA}: the entry {index} -> {info} is not a file slice inside the checkpoint"
            )
        if info.transform_descriptors:
            raise InputError(
                f"{path / METADATA}: {index.fqn!r} is stored with transforms {info.transform_descriptors}, "
                "which this recipe never writes"
            )
    return storage


def _check_sizes(path: Path, entries) -> None:
    """Every shard file exists and reaches the end of the last item the metadata places in it."""
    needed: dict[str, int] = {}
    for info in entries:
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise _incomplete(file, "is missing")
        size = file.stat().st_size
        if size < end:
            raise _incomplete(file, f"is truncated ({size} bytes; the metadata places data up to byte {end})")


def _check_byte_items(path: Path, metadata, storage: dict) -> None:
    """Each byte item as torch.load(weights_only=True) sees it, and no extra state Transformer Engine would unpickle."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for index, info in storage.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        file = path / info.relative_path
        with file.open("rb") as stream:
            stream.seek(info.offset)
            data = stream.read(info.length)
        value = _weights_only_load(file, data)
        if "_extra_state" in index.fqn and _holds_bytes(value):
            # TE unpickles a non-empty extra state with plain pickle; it holds FP8 scaling state only, and
            # this recipe never trains in FP8, so its layers always save an empty one.
            raise InputError(
                f"{file}: the extra state {index.fqn!r} is not empty; Transformer Engine would unpickle it, and "
                "this recipe never writes one (no FP8 training). Refused; load only checkpoints whose origin you trust"
            )


def _holds_bytes(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() > 0
    if isinstance(value, io.BytesIO):
        return len(value.getbuffer()) > 0
    if isinstance(value, dict):
        return any(_holds_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_bytes(v) for v in value)
    return False
