"""Indexed datasets before a run: a .bin that does not match its .idx is refused with both files named, and
megatron-core's cached sample indices follow the data when it is rewritten at the same prefix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from epas.config import DataConfig, FinetuneDataConfig, ModelConfig, RunConfig, TrainingConfig
from epas.data.demo_corpus import train_tokenizer
from epas.data.indexed import check_indexed_files, index_fingerprint
from epas.data.preprocess import preprocess
from epas.errors import InputError
from hf_training.data import check_files
from megatron_training.data import build_datasets, check_data_files

LETTERS = [f"{'abcde'[i % 5] * (3 + i % 4)} {'edcba'[i % 5] * (2 + i % 3)} " * (4 + i % 9) for i in range(120)]
DIGITS = [f"{i % 7}{i % 3}{i % 5} {i % 9}{i % 2} " * (3 + i % 6) for i in range(30)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(LETTERS + DIGITS, 300, folder)
    return folder


def write_dataset(prefix: Path, texts: list[str], tokenizer_dir: Path) -> str:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    source = prefix.with_suffix(".jsonl")
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    preprocess([source], prefix, tokenizer_dir, overwrite=True, progress=False)
    return str(prefix)


@pytest.fixture
def letters(tmp_path, tokenizer_dir) -> str:
    return write_dataset(tmp_path / "letters" / "data", LETTERS, tokenizer_dir)


@pytest.fixture
def digits(tmp_path, tokenizer_dir) -> str:
    return write_dataset(tmp_path / "digits" / "data", DIGITS, tokenizer_dir)


def entry_point_checks(prefix: str) -> list:
    """What pretraining's validate_run and finetuning's check_files run on the data, as callables."""
    pretrain = RunConfig(data=DataConfig(paths=[prefix], split="90,10,0"))
    finetune = FinetuneDataConfig(format="indexed", paths=[prefix], split="90,10,0")
    return [lambda: check_data_files(pretrain), lambda: check_files(finetune)]


def test_matching_files_pass(letters):
    for check in entry_point_checks(letters):
        check()


def test_a_bin_cut_short_is_refused_with_both_files_named(letters):
    with open(letters + ".bin", "r+b") as file:
        file.truncate(Path(letters + ".bin").stat().st_size - 2)
    for check in entry_point_checks(letters):
        with pytest.raises(InputError) as error:
            check()
        message = str(error.value)
        assert f"{letters}.bin holds" in message and f"but {letters}.idx describes" in message
        assert f"tools/preprocess_data.py with --output-prefix {letters} --overwrite" in message


def test_an_idx_from_other_data_is_refused(letters, digits):
    shutil.copy(digits + ".idx", letters + ".idx")
    with pytest.raises(InputError, match="the two files come from different data"):
        check_indexed_files([letters], None, "90,10,0")


@pytest.mark.parametrize("damage, message", [
    (lambda idx: idx.write_bytes(idx.read_bytes()[:-8]), "is cut short or damaged"),
    (lambda idx: idx.write_bytes(idx.read_bytes()[:20]), "is not a megatron-core index"),
    (lambda idx: idx.write_bytes(b""), "is not a megatron-core index"),
    (lambda idx: idx.write_bytes(b"{\"text\": 1}\n" * 10), "is not a megatron-core index"),
], ids=["idx cut short", "header cut short", "empty idx", "not an index"])
def test_a_damaged_idx_is_refused(letters, damage, message):
    damage(Path(letters + ".idx"))
    with pytest.raises(InputError, match=message):
        check_indexed_files([letters], None, "90,10,0")


def test_an_empty_dataset_is_refused_before_megatron_fails_to_map_it(tmp_path):
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16).finalize(prefix + ".idx")
    with pytest.raises(InputError, match="describes no document"):
        check_indexed_files([prefix], None, "90,10,0")


@pytest.mark.parametrize("block", [2**20, 64], ids=["index hashed whole", "index read in blocks"])
def test_the_fingerprint_follows_the_documents(letters, digits, tokenizer_dir, monkeypatch, block):
    monkeypatch.setattr("epas.data.indexed.FINGERPRINT_BLOCK", block)
    assert Path(letters + ".idx").stat().st_size > 16 * 64  # so 64-byte blocks leave gaps
    before = index_fingerprint(letters)
    assert index_fingerprint(letters) == before != index_fingerprint(digits)
    swapped = list(LETTERS)  # two documents of other lengths trade places: both files keep their size
    swapped[50], swapped[70] = swapped[70], swapped[50]
    sizes = [Path(letters + suffix).stat().st_size for suffix in (".bin", ".idx")]
    write_dataset(Path(letters), swapped, tokenizer_dir)
    assert [Path(letters + suffix).stat().st_size for suffix in (".bin", ".idx")] == sizes
    assert index_fingerprint(letters) != before


def sample_tokens(dataset) -> set[int]:
    return {int(token) for i in range(len(dataset)) for token in dataset[i]["tokens"]}


@pytest.mark.parametrize("cache_dir", [None, "cache"], ids=["cache beside the data", "data.cache_dir"])
def test_data_rewritten_at_the_same_prefix_gets_new_indices(tmp_path, tokenizer_dir, cache_dir):
    """The audit's crash: preprocess_data.py --overwrite to the same prefix, then IndexError at step 1."""
    prefix = str(tmp_path / "data" / "corpus")
    run = RunConfig(
        model=ModelConfig(vocab_size=320, seq_length=16),
        data=DataConfig(paths=[prefix], tokenizer=str(tokenizer_dir), split="90,10,0", global_batch_size=4,
                        cache_dir=cache_dir and str(tmp_path / cache_dir)),
        training=TrainingConfig(train_steps=40),
        device="cpu",
    )
    write_dataset(Path(prefix), LETTERS, tokenizer_dir)
    train, _ = build_datasets(run, num_valid_samples=4)
    cache = Path(run.data.cache_dir or prefix + "/cache")
    cached = sorted(cache.rglob("*.npy"))
    assert cached and sample_tokens(train)  # indices for LETTERS are on disk

    write_dataset(Path(prefix), DIGITS, tokenizer_dir)  # fewer documents: old indices point past the end
    train, valid = build_datasets(run, num_valid_samples=4)
    digit_tokens = {token for document in IndexedDataset(prefix) for token in document.tolist()}
    assert sample_tokens(train) <= digit_tokens and sample_tokens(valid) <= digit_tokens
    assert len(sorted(cache.rglob("*.npy"))) == 2 * len(cached)  # new indices beside the old ones
