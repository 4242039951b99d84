"""Datasets for finetune_epas.py: packed token windows (continual pretraining) and masked examples (SFT).

Every sample is ``{"input_ids", "labels"}`` with labels = -100 where no loss is taken; the model shifts the
labels itself, as every Hugging Face causal LM does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from epas.config import FinetuneDataConfig
from epas.data.indexed import check_indexed_files
from epas.data.preprocess import ChunkEncoder, json_object, read_chunks
from epas.errors import ConfigError, InputError

IGNORE_INDEX = -100


class GPTWindows(Dataset):
    """megatron-core GPTDataset samples as ``seq_length`` tokens whose labels are the tokens themselves."""

    def __init__(self, gpt_dataset):
        self.gpt_dataset = gpt_dataset

    def __len__(self) -> int:
        return len(self.gpt_dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.gpt_dataset[index]
        ids = torch.cat([torch.as_tensor(sample["tokens"]), torch.as_tensor(sample["labels"][-1:])]).long()
        return {"input_ids": ids, "labels": ids.clone()}


class PackedTokens(Dataset):
    """A token stream cut into consecutive ``seq_length`` windows (the tail shorter than one is dropped)."""

    def __init__(self, tokens: np.ndarray, seq_length: int):
        self.tokens, self.seq_length = tokens, seq_length

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_length

    def __getitem__(self, index: int) -> dict:
        window = self.tokens[index * self.seq_length : (index + 1) * self.seq_length]
        ids = torch.from_numpy(window.astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


class Examples(Dataset):
    """Tokenized supervised examples of different lengths."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class PadToLongest:
    """Collates samples, right-padding to the longest one; the attention mask appears only when padding does."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        lengths = [len(sample["input_ids"]) for sample in samples]
        longest = max(lengths)
        batch = {
            "input_ids": torch.full((len(samples), longest), self.pad_id, dtype=torch.long),
            "labels": torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (sample, length) in enumerate(zip(samples, lengths)):
            batch["input_ids"][row, :length] = sample["input_ids"]
            batch["labels"][row, :length] = sample["labels"]
        if min(lengths) != longest:
            batch["attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
        return batch


def check_files(data: FinetuneDataConfig) -> None:
    """Fail before start-up on a missing data file."""
    if data.format == "indexed":
        check_indexed_files(data.paths, data.weights, data.split)
        return
    if not data.paths:
        raise ConfigError(f"data.paths is empty; data.format={data.format} takes jsonl files")
    if data.weights is not None:
        raise ConfigError("data.weights applies to data.format=indexed only; remove it")
    for path in [*data.paths, *(data.valid_paths or ())]:
        if not Path(path).is_file():
            raise ConfigError(f"data file '{path}' not found (data.format={data.format} takes jsonl files)")


def build_datasets(data: FinetuneDataConfig, tokenizer, tokenizer_source: str, *, seed: int, num_train_samples: int,
                   num_valid_samples: int):
    """Train and validation datasets (validation None when the config has none) for ``data.format``."""
    if data.format == "indexed":
        # megatron-core's GPTDataset reads the indexed format: imported only for it
        from megatron_training.data import TokenIds, gpt_datasets

        eos = _eos_id(tokenizer, tokenizer_source)
        train, valid = gpt_datasets(
            (data.paths, data.weights), data.split, data.seq_length - 1, seed,
            TokenIds(eos, len(tokenizer), tokenizer_source), data.cache_dir, [num_train_samples, num_valid_samples],
        )
        return GPTWindows(train), (GPTWindows(valid) if valid is not None and num_valid_samples else None)
    read = {"text": _packed_jsonl, "chat": _chat_examples, "instruction": _instruction_examples}[data.format]
    train = read(data.paths, tokenizer, tokenizer_source, data)
    valid = read(data.valid_paths, tokenizer, tokenizer_source, data) if data.valid_paths else None
    return train, valid


def _eos_id(tokenizer, source: str) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer '{source}' has no EOS token to mark document ends")
    return tokenizer.eos_token_id


def _packed_jsonl(paths, tokenizer, source: str, data: FinetuneDataConfig) -> PackedTokens:
    """jsonl documents tokenized as tools/preprocess_data.py does (no BOS, EOS after each), then packed."""
    encoder = ChunkEncoder(tokenizer, data.text_key, _eos_id(tokenizer, source), np.int64)
    tokens = np.concatenate([encoder(chunk).tokens for path in paths
                             for chunk in read_chunks(Path(path), data.text_key, 1024)] or [np.zeros(0, np.int64)])
    if len(tokens) < data.seq_length:
        raise ConfigError(f"{', '.join(paths)} hold {len(tokens)} tokens, fewer than one sample of "
                          f"data.seq_length={data.seq_length}; add data or lower data.seq_length")
    return PackedTokens(tokens, data.seq_length)


def _records(paths):
    """(where, record) for every non-blank line of the jsonl files."""
    for path in paths:
        with open(path, "rb") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    yield f"{path}:{number}", json_object(line, f"{path}:{number}")


def _text_field(record: dict, key: str, where: str, option: str) -> str:
    if not isinstance(record.get(key), str):
        found = "missing" if key not in record else f"a JSON {type(record[key]).__name__}"
        raise InputError(f"{where}: '{key}' is {found}, not text (keys: {', '.join(record)}); "
                         f"name the field with data.{option}")
    return record[key]


def _example(pieces: list[tuple[list[int], bool]], seq_length: int) -> dict | None:
    """Token pieces (ids, is_response) as one example truncated to ``seq_length``; None without a response token."""
    ids = [token for piece, _ in pieces for token in piece]
    labels = [token if is_response else IGNORE_INDEX for piece, is_response in pieces for token in piece]
    ids, labels = ids[:seq_length], labels[:seq_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def _examples(name: str, paths, pieces_of, seq_length: int) -> Examples:
    examples, total, truncated = [], 0, 0
    for where, record in _records(paths):
        total += 1
        pieces = pieces_of(record, where)
        truncated += sum(len(piece) for piece, _ in pieces) > seq_length
        example = _example(pieces, seq_length)
        if example is not None:
            examples.append(example)
    if not examples:
        raise ConfigError(f"{', '.join(paths)}: no {name} example keeps a response token within "
                          f"data.seq_length={seq_length}")
    dropped = total - len(examples)
    print(f"{name} data {', '.join(paths)}: {len(examples)} examples ({truncated} truncated to "
          f"data.seq_length={seq_length}, {dropped} dropped with no response token left)", flush=True)
    return Examples(examples)


def _instruction_examples(paths, tokenizer, source: str, data: FinetuneDataConfig) -> Examples:
    """BOS (if the tokenizer has one) + prompt, then response + EOS as the target."""
    eos = _eos_id(tokenizer, source)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]

    def pieces_of(record, where):
        prompt = _text_field(record, data.prompt_key, where, "prompt_key")
        response = _text_field(record, data.response_key, where, "response_key")
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return [(bos + encode(prompt), False), (encode(response) + [eos], True)]

    return _examples("instruction", paths, pieces_of, data.seq_length)


def _chat_examples(paths, tokenizer, source: str, data: FinetuneDataConfig) -> Examples:
    """Conversations rendered with the tokenizer's chat template; every assistant turn is a target."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer '{source}' has no chat template, which data.format=chat needs; use a chat "
                          "model's tokenizer (data.tokenizer), or data.format=instruction for prompt/response pairs")

    def pieces_of(record, where):
        messages = record.get(data.messages_key)
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise InputError(f"{where}: '{data.messages_key}' must be a list of {{\"role\", \"content\"}} objects; "
                             "name the field with data.messages_key")
        if messages[0]["role"] == "assistant" or all(m["role"] != "assistant" for m in messages):
            raise InputError(f"{where}: a conversation must open with a non-assistant turn and hold an "
                             "assistant turn to learn from")
        return [(tokenizer(text, add_special_tokens=False)["input_ids"], is_response)
                for text, is_response in _chat_segments(tokenizer, messages, where) if text]

    return _examples("chat", paths, pieces_of, data.seq_length)


def _chat_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_response) pieces.

    An assistant turn's text is what the template adds between the conversation so far with a generation
    prompt and the conversation including that turn: exactly what the model writes at inference.
    """
    def render(turns, generation_prompt):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    full, done, pieces = render(messages, False), "", []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through = render(messages[:turn], True), render(messages[: turn + 1], False)
        if not (prompt.startswith(done) and through.startswith(prompt) and full.startswith(through)):
            raise InputError(f"{where}: the tokenizer's chat template does not render the conversation as "
                             "growing prefixes, so its assistant turns cannot be located; use data.format="
                             "instruction or a template without look-ahead")
        pieces += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    return pieces + [(full[len(done):], False)]
