"""Training data from megatron-core's GPT datasets: blends of indexed files, or mock tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_patches.config import ConfigError, RunConfig


@dataclass
class TokenIds:
    """What megatron-core's GPTDataset reads from a tokenizer (it never tokenizes)."""

    eod: int
    vocab_size: int
    source: str  # the tokenizer folder, or "mock"

    @property
    def unique_identifiers(self) -> dict:
        """Part of megatron-core's dataset cache key: a new tokenizer must not reuse old indices."""
        return {"class": "TokenIds", "source": self.source, "eod": self.eod}


def load_tokenizer(tokenizer_dir):
    """A Hugging Face tokenizer from a local folder; never reaches for the hub."""
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder '{tokenizer_dir}' not found; pass a local Hugging Face "
                          "tokenizer folder (tools/build_demo_corpus.py makes a small one)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"tokenizer folder '{tokenizer_dir}' holds no tokenizer.json or tokenizer_config.json; "
                          "pass a folder made by the tokenizer's save_pretrained")
    from transformers import AutoTokenizer

    import epas_hf  # noqa: F401  (registers epas_llama: an export's config.json must not prompt for remote code)

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise ConfigError(f"cannot load the tokenizer in '{tokenizer_dir}' ({first_line}); "
                          "pass a folder made by the tokenizer's save_pretrained") from None


def token_ids(run: RunConfig) -> TokenIds:
    """The end-of-document id: the tokenizer's EOS, or the last vocabulary id for mock data."""
    if run.data.mock:
        return TokenIds(eod=run.model.vocab_size - 1, vocab_size=run.model.vocab_size, source="mock")
    if run.data.tokenizer is None:
        raise ConfigError("data.tokenizer is required for real data (its EOS id separates documents)")
    tokenizer = load_tokenizer(run.data.tokenizer)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer '{run.data.tokenizer}' has no EOS token to mark document ends")
    if len(tokenizer) > run.model.vocab_size:
        raise ConfigError(
            f"tokenizer '{run.data.tokenizer}' has {len(tokenizer)} tokens but model.vocab_size is "
            f"{run.model.vocab_size}; set model.vocab_size={len(tokenizer)}"
        )
    return TokenIds(tokenizer.eos_token_id, run.model.vocab_size, run.data.tokenizer)


def check_data_files(run: RunConfig) -> None:
    """Fail before start-up if a dataset prefix lacks its .bin or .idx file."""
    if run.data.mock:
        return
    if not run.data.paths:
        raise ConfigError("data.paths is empty; give dataset prefixes or set data.mock=true")
    check_indexed_files(run.data.paths, run.data.weights, run.data.split)


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


def build_datasets(run: RunConfig, num_valid_samples: int):
    """Train and valid datasets (``GPTDataset`` or mock) sized for the whole run."""
    data = run.data
    sizes = [run.training.train_steps * data.global_batch_size, num_valid_samples]
    return gpt_datasets(None if data.mock else (data.paths, data.weights), data.split, run.model.seq_length,
                        run.seed, token_ids(run), data.cache_dir, sizes)


def gpt_datasets(blend, split: str, seq_length: int, seed: int, tokens: TokenIds, cache_dir, sizes):
    """megatron-core's train and valid GPT datasets of ``sizes`` samples (mock tokens when ``blend`` is None).

    Each sample holds ``seq_length`` tokens and the ``seq_length`` next tokens as labels.
    """
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        tokenizer=tokens,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache_dir,
        mmap_bin_files=True,
    )
    dataset_class = MockGPTDataset if blend is None else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_class, [*sizes, 0], lambda: True, config
    ).build()
    return train, valid


def micro_batches(dataset, first_sample: int, micro_batch_size: int):
    """This data-parallel rank's micro-batches, starting at global sample ``first_sample``.

    Consecutive ``micro_batch_size × dp`` samples form one round, rank r taking its slice, so
    the data order does not depend on how the run was split across ranks or resumed.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    start = first_sample
    while True:
        first = start + dp_rank * micro_batch_size
        samples = [dataset[i % len(dataset)] for i in range(first, first + micro_batch_size)]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in
               ("tokens", "labels", "loss_mask", "position_ids")}
        start += micro_batch_size * dp_size
