"""tools/preprocess_data.py and tools/build_demo_corpus.py: what megatron-core reads back is what went in."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from megatron_training.data import TokenIds
from epas.data.demo_corpus import build_demo_corpus
from epas.data.preprocess import main, preprocess
from epas.errors import InputError

# Empty, blank and null texts are skipped; the rest covers non-ASCII text and a long document.
TEXTS = ["The quick brown fox.", "", "Ünïcödé — text ✓ 你好", "   \n", None, "line one\nline two\n",
         "A longer document. " * 200, "x"]
KEPT_TEXTS = [text for text in TEXTS if text and not text.isspace()]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE with <s>/</s>, trained here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(KEPT_TEXTS, trainer=trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def expected_documents(tokenizer_dir: Path, texts: list, append_eod: bool = True) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    end = [tokenizer.eos_token_id] if append_eod else []
    return [tokenizer(text, add_special_tokens=False)["input_ids"] + end
            for text in texts if text and not text.isspace()]


def read_documents(prefix: Path) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))]


def write_jsonl(path: Path, texts: list, key: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, key: text}) + "\n" for i, text in enumerate(texts)))
    return path


def write_parquet(path: Path, texts: list) -> Path:
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path, row_group_size=3)
    return path


@pytest.mark.parametrize("suffix, write_input", [(".jsonl", write_jsonl), (".parquet", write_parquet)],
                         ids=["jsonl", "parquet"])
def test_round_trip_with_one_and_two_workers(tmp_path, tokenizer_dir, suffix, write_input):
    source = write_input(tmp_path / f"docs{suffix}", TEXTS)
    summaries = {
        workers: preprocess([source], tmp_path / f"out{workers}", tokenizer_dir, workers=workers,
                            chunk_size=2, progress=False)
        for workers in (1, 2)
    }
    expected = expected_documents(tokenizer_dir, TEXTS)
    assert read_documents(tmp_path / "out1") == expected
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"out1{suffix}").read_bytes() == (tmp_path / f"out2{suffix}").read_bytes()
    assert np.dtype(IndexedDataset(str(tmp_path / "out1")).index.dtype) == np.uint16  # 300 tokens fit
    summary = summaries[2]
    assert (summary.documents, summary.empty_documents) == (len(KEPT_TEXTS), len(TEXTS) - len(KEPT_TEXTS))
    assert summary.tokens == sum(map(len, expected))
    assert sorted(tmp_path.glob("*.tmp")) == []


def test_inputs_keep_their_order_globs_are_sorted_and_eod_is_optional(tmp_path, tokenizer_dir):
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "b.jsonl", ["second shard"])
    write_jsonl(tmp_path / "shards" / "a.jsonl", ["first shard"])
    write_parquet(tmp_path / "last.parquet", ["last file"])
    preprocess([tmp_path / "last.parquet", tmp_path / "shards" / "*.jsonl"], tmp_path / "out", tokenizer_dir,
               append_eod=False, progress=False)
    expected = expected_documents(tokenizer_dir, ["last file", "first shard", "second shard"], append_eod=False)
    assert read_documents(tmp_path / "out") == expected


def test_cli_writes_with_another_json_key(tmp_path, tokenizer_dir, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", TEXTS, key="content")
    args = ["--input", str(source), "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir),
            "--json-key", "content", "--workers", "2"]
    assert main(args) == 0
    assert f"{len(KEPT_TEXTS)} documents (3 empty ones skipped)" in capsys.readouterr().out
    assert read_documents(tmp_path / "out") == expected_documents(tokenizer_dir, TEXTS)


@pytest.mark.parametrize("case, message", [
    ("missing input", "input '{tmp}/absent.jsonl' not found"),
    ("empty glob", "no input file matches '{tmp}/*.parquet'"),
    ("unknown extension", "has unknown extension '.txt'; use .jsonl"),
    ("missing key", "{tmp}/docs.jsonl:4: no key 'text' (keys: id, body); name the text field with --json-key"),
    ("invalid json", "{tmp}/docs.jsonl:2: not valid JSON"),
    ("missing column", "has no column 'text' (columns: body)"),
    ("missing tokenizer", "tokenizer folder '{tmp}/no_tokenizer' not found"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, tokenizer_dir, capsys, case, message):
    inputs, tokenizer = [str(tmp_path / "docs.jsonl")], str(tokenizer_dir)
    write_jsonl(tmp_path / "docs.jsonl", ["fine"] * 3)
    if case == "missing input":
        inputs = [str(tmp_path / "absent.jsonl")]
    elif case == "empty glob":
        inputs.append(str(tmp_path / "*.parquet"))
    elif case == "unknown extension":
        inputs = [str(tmp_path / "docs.txt")]
        (tmp_path / "docs.txt").write_text("text\n")
    elif case == "missing key":  # on line 4: after the first chunk, in a worker
        with (tmp_path / "docs.jsonl").open("a") as file:
            file.write(json.dumps({"id": 3, "body": "no text key"}) + "\n")
    elif case == "invalid json":
        (tmp_path / "docs.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n')
    elif case == "missing column":
        inputs = [str(tmp_path / "docs.parquet")]
        pq.write_table(pa.table({"body": ["x"]}), inputs[0])
    elif case == "missing tokenizer":
        tokenizer = str(tmp_path / "no_tokenizer")
    args = ["--input", *inputs, "--output-prefix", str(tmp_path / "out" / "data"), "--tokenizer", tokenizer,
            "--workers", "2", "--chunk-size", "2"]
    assert main(args) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # after the progress bar, if it started
    assert error.split(": ")[0] in ("error", "config error") and "Traceback" not in stderr
    assert message.format(tmp=tmp_path) in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing left


def test_refuses_to_overwrite_unless_asked(tmp_path, tokenizer_dir, capsys):
    args = ["--input", str(write_jsonl(tmp_path / "docs.jsonl", ["old"])), "--output-prefix",
            str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)]
    assert main(args) == 0
    old_bytes = (tmp_path / "out.bin").read_bytes()
    write_jsonl(tmp_path / "docs.jsonl", ["new text"])
    assert main(args) == 2
    assert "out.bin' already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out.bin").read_bytes() == old_bytes
    assert main([*args, "--overwrite"]) == 0
    assert read_documents(tmp_path / "out") == expected_documents(tokenizer_dir, ["new text"])


@pytest.mark.parametrize("texts", [[], ["", "   ", None]], ids=["empty file", "no text"])
def test_input_without_a_document_is_refused_and_old_output_is_kept(tmp_path, tokenizer_dir, capsys, texts):
    args = ["--input", str(write_jsonl(tmp_path / "docs.jsonl", ["old"])), "--output-prefix",
            str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), "--overwrite"]
    assert main(args) == 0
    old_bytes = [(tmp_path / f"out{suffix}").read_bytes() for suffix in (".bin", ".idx")]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert f"error: no document with text in {tmp_path}/docs.jsonl ({len(texts)} empty ones skipped)" in stderr
    assert [(tmp_path / f"out{suffix}").read_bytes() for suffix in (".bin", ".idx")] == old_bytes
    assert sorted(path.name for path in tmp_path.iterdir()) == ["docs.jsonl", "out.bin", "out.idx"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    info, built = build_demo_corpus(tmp_path_factory.mktemp("demo") / "data", vocab_size=512)
    assert built
    return info


def test_demo_corpus_uses_its_tokenizers_eos_and_is_idempotent(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo["tokenizer"])
    assert len(tokenizer) == 512 and tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"
    assert demo["eos_id"] == tokenizer.eos_token_id
    documents = read_documents(Path(demo["data_path"]))
    assert len(documents) == demo["documents"] >= 1000  # so each split of 969,30,1 gets documents
    assert all(document[-1] == tokenizer.eos_token_id for document in documents)
    assert sum(map(len, documents)) == demo["tokens"]
    assert 500_000 <= demo["characters"] <= 1_000_000
    assert build_demo_corpus(Path(demo["data_path"]).parent, vocab_size=512) == (demo, False)


def test_gpt_dataset_reads_the_demo_corpus(demo, tmp_path):
    seq_length = 64
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq_length, blend=([demo["data_path"]], None),
        split="969,30,1",  # the project's default: megatron-core hangs if the corpus leaves a split empty
        tokenizer=TokenIds(eod=demo["eos_id"], vocab_size=512, source=demo["tokenizer"]),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=str(tmp_path), mmap_bin_files=True,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [16, 4, 0], lambda: True, config).build()
    samples = [train[i] for i in range(16)] + [valid[i] for i in range(4)]
    for sample in samples:
        assert sample["tokens"].shape == sample["labels"].shape == (seq_length,)
        assert 0 <= int(sample["tokens"].min()) and int(sample["tokens"].max()) < 512
    assert any((sample["tokens"] == demo["eos_id"]).any() for sample in samples)  # documents are packed


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def small_demo(monkeypatch):
    """The demo build on 40 help topics instead of 1,700 documents: seconds instead of a minute."""
    from epas.data import demo_corpus

    monkeypatch.setattr(demo_corpus, "demo_documents", lambda: demo_corpus.help_topic_documents()[:40])
    return demo_corpus


def test_demo_build_touches_no_file_it_did_not_write(tmp_path, small_demo):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "mine.txt").write_text("a user's file")
    (tmp_path / "notes.txt").write_text("a user's file")
    before = files_under(tmp_path)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}/tokenizer already exists") + ".*pass --rebuild"):
        small_demo.build_demo_corpus(tmp_path, vocab_size=300)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}/tokenizer/mine.txt was not written by")):
        small_demo.build_demo_corpus(tmp_path, vocab_size=300, rebuild=True)
    assert files_under(tmp_path) == before and sorted(path.name for path in tmp_path.iterdir()) == [
        "notes.txt", "tokenizer"]


def test_demo_build_replaces_its_own_files_only_with_rebuild(tmp_path, small_demo, capsys):
    (tmp_path / "notes.txt").write_text("a user's file")
    info, built = small_demo.build_demo_corpus(tmp_path, vocab_size=300)
    written = [*(tmp_path / f"corpus{suffix}" for suffix in (".jsonl", ".bin", ".idx")),
               *(tmp_path / "tokenizer").iterdir()]
    assert built and sorted(info["files"]) == sorted(str(path.relative_to(tmp_path)) for path in written)
    first = files_under(tmp_path)
    assert small_demo.main(["--output-dir", str(tmp_path), "--vocab-size", "260"]) == 2
    assert ("corpus.jsonl already exists (a demo build for --vocab-size 300 on Python"
            in capsys.readouterr().err)
    assert files_under(tmp_path) == first

    info, built = small_demo.build_demo_corpus(tmp_path, vocab_size=260, rebuild=True)
    assert built and info["vocab_size"] == 260 and len(AutoTokenizer.from_pretrained(info["tokenizer"])) == 260
    rebuilt = files_under(tmp_path)
    assert rebuilt["notes.txt"] == first["notes.txt"] and rebuilt.keys() == first.keys()  # nothing left behind
    assert rebuilt["corpus.bin"] != first["corpus.bin"]
    assert read_documents(tmp_path / "corpus") == expected_documents(
        tmp_path / "tokenizer", [document["text"] for document in small_demo.demo_documents()])
