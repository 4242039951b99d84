"""Training data from megatron-core's GPT datasets: blends of indexed files, or mock tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from epas.config import RunConfig
from epas.data.indexed import check_indexed_files, index_fingerprint
from epas.data.tokenizer import load_tokenizer
from epas.errors import ConfigError


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


@dataclass
class FingerprintedGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig with a fingerprint of each dataset's files, part of the cache key."""

    data_fingerprints: dict[str, str] = field(default_factory=dict)  # prefix -> index_fingerprint(prefix)


class FingerprintedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset whose cached indices are keyed to the data they were built from.

    Stock GPTDataset keys its cache on the paths and settings only: data rewritten at the same prefix
    would reuse the old documents' indices and fail with an IndexError, or read wrong samples.
    """

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [*GPTDataset._key_config_attributes(), "data_fingerprints"]


def check_data_files(run: RunConfig) -> None:
    """Fail before start-up if a dataset prefix lacks its .bin or .idx file, or the two do not match."""
    if run.data.mock:
        return
    if not run.data.paths:
        raise ConfigError("data.paths is empty; give dataset prefixes or set data.mock=true")
    check_indexed_files(run.data.paths, run.data.weights, run.data.split)


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
    config = FingerprintedGPTDatasetConfig(
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
        data_fingerprints={} if blend is None else {prefix: index_fingerprint(prefix) for prefix in blend[0]},
    )
    dataset_class = MockGPTDataset if blend is None else FingerprintedGPTDataset
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
