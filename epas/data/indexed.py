"""Checks of megatron-core indexed datasets (PREFIX.bin + PREFIX.idx) before a run starts, and the
fingerprint that keys megatron-core's cached sample indices to the data they were built from.

megatron-core is imported only inside the functions that need its format's definitions.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from epas.errors import ConfigError, InputError

# megatron-core's .idx header: magic, version, token dtype code, sequence count, document-index count;
# then int32 sequence lengths, int64 sequence pointers (byte offsets into the .bin), int64 document indices.
INDEX_HEADER = struct.Struct("<9sQBQQ")
INDEX_MAGIC = b"MMIDIDX\x00\x00"
FINGERPRINT_BLOCK = 2**20
FINGERPRINT_BLOCKS = 16


def check_indexed_files(paths, weights, split: str) -> None:
    """Every prefix has its .bin and .idx, which belong together; the weights match the paths and every
    split gets documents."""
    if not paths:
        raise ConfigError("data.paths is empty; give dataset prefixes (PREFIX.bin/.idx from tools/preprocess_data.py)")
    if weights is not None and len(weights) != len(paths):
        raise ConfigError(f"data.weights has {len(weights)} entries for {len(paths)} data.paths")
    for prefix in paths:
        missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
        if missing:
            raise ConfigError(
                f"data file {prefix}{missing[0]} not found; make it with tools/preprocess_data.py "
                "(data.paths takes prefixes, without .bin/.idx)"
            )
        check_bin_matches_idx(prefix)
    check_splits(paths, split)


def check_bin_matches_idx(prefix: str) -> None:
    """Refuse a PREFIX.bin whose size is not the one PREFIX.idx describes, and an .idx that is cut short
    or holds no document.

    megatron-core checks neither: a .bin cut short trains until a sample reaches past its end, and an
    .idx from other data trains without a word on wrong document boundaries. Reads 34 bytes and two
    numbers of the .idx, whatever the dataset's size.
    """
    from megatron.core.datasets.indexed_dataset import DType

    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    fix = (f"rerun tools/preprocess_data.py with --output-prefix {prefix} --overwrite to write both "
           "files again, or restore the pair from where they were made together")
    with idx_path.open("rb") as file:
        header = file.read(INDEX_HEADER.size)
        if len(header) < INDEX_HEADER.size or INDEX_HEADER.unpack(header)[:2] != (INDEX_MAGIC, 1):
            raise InputError(f"{idx_path} is not a megatron-core index (its header is missing or wrong); {fix}")
        _, _, dtype_code, sequences, document_indices = INDEX_HEADER.unpack(header)
        try:
            itemsize = DType.size(DType.dtype_from_code(dtype_code))
        except ValueError:
            raise InputError(f"{idx_path} names an unknown token type (code {dtype_code}); {fix}") from None
        lengths_at = INDEX_HEADER.size
        pointers_at = lengths_at + 4 * sequences
        idx_size = pointers_at + 8 * sequences + 8 * document_indices
        if idx_path.stat().st_size < idx_size:
            raise InputError(f"{idx_path} is cut short or damaged: it holds {idx_path.stat().st_size:,} bytes, "
                             f"its header describes {idx_size:,}; {fix}")
        if sequences == 0:
            raise InputError(f"{idx_path} describes no document (the dataset is empty); "
                             "preprocess input that holds text, or remove the prefix from data.paths")
        file.seek(lengths_at + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", file.read(4))
        file.seek(pointers_at + 8 * (sequences - 1))
        (last_pointer,) = struct.unpack("<q", file.read(8))
    described = last_pointer + last_length * itemsize
    actual = bin_path.stat().st_size
    if actual != described:
        raise InputError(
            f"{bin_path} holds {actual:,} bytes but {idx_path} describes {described:,} "
            f"({sequences:,} sequences): the .bin is cut short or the two files come from different data; {fix}"
        )


def index_fingerprint(prefix: str) -> str:
    """A digest of PREFIX.idx and the sizes of both files, for megatron-core's dataset cache key.

    megatron-core keys its cached document, sample and shuffle indices on the path and the settings
    only, so data rewritten at the same prefix would reuse indices of the old documents. Those
    indices are derived from the .idx alone: it is hashed whole up to 16 MiB, else 16 blocks of
    1 MiB spread over it (a few milliseconds, the same on every node that sees the same files).
    """
    idx_path = Path(prefix + ".idx")
    idx_size = idx_path.stat().st_size
    digest = hashlib.blake2b(f"{idx_size} {Path(prefix + '.bin').stat().st_size}".encode(), digest_size=16)
    with idx_path.open("rb") as file:
        if idx_size <= FINGERPRINT_BLOCK * FINGERPRINT_BLOCKS:
            digest.update(file.read())
        else:
            last = idx_size - FINGERPRINT_BLOCK
            for block in range(FINGERPRINT_BLOCKS):
                file.seek(last * block // (FINGERPRINT_BLOCKS - 1))
                digest.update(file.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def check_splits(paths, split: str) -> None:
    """Refuse a ``data.split`` share that holds no document of some dataset.

    megatron-core 0.16 loops forever building a split with no documents, so a small corpus
    with the default ``969,30,1`` would hang instead of failing.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in paths or ():
        documents = len(IndexedDataset(prefix, mmap=True))
        for name, bounds in zip(("train", "valid", "test"), matrix):
            if bounds and round(bounds[0] * documents) == round(bounds[1] * documents):
                raise ConfigError(
                    f"data.split={split!r} leaves the {name} split of {prefix} without a "
                    f"document (it has {documents}); give that split a larger share or 0 "
                    "(e.g. data.split=98,2,0)"
                )
