"""Checks of megatron-core indexed datasets (PREFIX.bin + PREFIX.idx) before a run starts.

megatron-core is imported only inside :func:`check_splits`, which reads the document counts.
"""

from __future__ import annotations

from pathlib import Path

from epas.errors import ConfigError


def check_indexed_files(paths, weights, split: str) -> None:
    """Every prefix has its .bin and .idx, the weights match the paths and every split gets documents."""
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
    check_splits(paths, split)


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
