"""Tokenize jsonl or parquet text into a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \\
        --tokenizer path/to/hf_tokenizer --workers 8

Inputs are JSON lines (.jsonl or .json, one object per line, text under --json-key) or parquet
files (.parquet, text in the column named by --json-key). Each document is tokenized without BOS
and followed by the tokenizer's EOS, which is how megatron-core's GPTDataset finds document ends;
train on the result with data.paths=[PREFIX] data.tokenizer=DIR. The input is streamed and the
output order is the input order whatever --workers is, so a run is reproducible byte for byte.
Output is written to PREFIX.bin.tmp / PREFIX.idx.tmp and renamed only when complete.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from epas import cli
from epas.data.tokenizer import load_tokenizer
from epas.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIX = ".parquet"

@dataclass
class Chunk:
    """A batch of consecutive documents from one file: the unit of work a worker encodes."""

    source: str  # file name, for error messages
    first_line: int  # jsonl: line number of records[0], so errors can point at the line
    records: list  # jsonl: raw lines (bytes, parsed by the worker); parquet: texts (str or None)
    is_jsonl: bool


@dataclass
class EncodedChunk:
    """A chunk's documents as one flat token array: cheap to send back from a worker process."""

    tokens: np.ndarray  # every kept document's tokens (and EOS), concatenated
    lengths: np.ndarray  # tokens per kept document
    empty: int  # documents skipped: no text, only whitespace, or no tokens


@dataclass
class Summary:
    """What a run wrote: the CLI's last line, and build_demo_corpus's record of the corpus."""

    documents: int
    empty_documents: int
    tokens: int
    files: list[Path]
    seconds: float

    def __str__(self) -> str:
        files = ", ".join(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)" for path in self.files)
        return (f"{self.documents:,} documents ({self.empty_documents:,} empty ones skipped), "
                f"{self.tokens:,} tokens in {self.seconds:.1f} s; wrote {files}")


def expand_inputs(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """Input files in the order given, each glob sorted, so the output order is reproducible."""
    paths = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"no input file matches '{pattern}'; check the pattern")
        elif not Path(pattern).exists():
            raise InputError(f"input '{pattern}' not found; check the path")
        else:
            matches = [pattern]
        for match in map(Path, matches):
            if match.is_dir():
                raise InputError(f"input '{match}' is a directory; pass files or a glob like '{match}/*.jsonl'")
            if match.suffix not in (*JSONL_SUFFIXES, PARQUET_SUFFIX):
                raise InputError(f"input '{match}' has unknown extension '{match.suffix}'; "
                                 "use .jsonl (or .json) for JSON lines, .parquet for parquet")
            paths.append(match)
    return paths


def read_chunks(path: Path, text_key: str, chunk_size: int) -> Iterator[Chunk]:
    """The file's documents in order, ``chunk_size`` at a time, without reading it whole."""
    if path.suffix == PARQUET_SUFFIX:
        yield from _parquet_chunks(path, text_key, chunk_size)
        return
    with path.open("rb") as file:
        first_line = 1
        while lines := list(itertools.islice(file, chunk_size)):
            yield Chunk(str(path), first_line, lines, is_jsonl=True)
            first_line += len(lines)


def _parquet_chunks(path: Path, text_key: str, chunk_size: int) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as error:
        raise InputError(f"input '{path}' is not a readable parquet file ({error})") from None
    schema = parquet.schema_arrow
    if text_key not in schema.names:
        raise InputError(f"input '{path}' has no column '{text_key}' (columns: {', '.join(schema.names)}); "
                         "name the text column with --json-key")
    column_type = schema.field(text_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"input '{path}': column '{text_key}' holds {column_type}, not text; "
                         "name the text column with --json-key")
    for batch in parquet.iter_batches(batch_size=chunk_size, columns=[text_key]):
        yield Chunk(str(path), 0, batch.column(0).to_pylist(), is_jsonl=False)


def json_object(line: bytes | str, where: str) -> dict:
    """One jsonl line as a JSON object; ``where`` (file:line) leads the error message."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text; re-encode the file as UTF-8") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error.msg}); each line must hold one JSON object") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: a JSON {type(record).__name__}, not an object; "
                         "each line must hold one JSON object")
    return record


class ChunkEncoder:
    """Turns a chunk into tokens: parses JSON (in the worker, where it runs in parallel), tokenizes,
    appends EOS and drops empty documents."""

    def __init__(self, tokenizer, text_key: str, eos_id: int | None, dtype: type[np.number]):
        self.tokenizer = tokenizer
        self.text_key = text_key
        self.eos_id = eos_id
        self.document_end = [] if eos_id is None else [eos_id]
        self.dtype = dtype

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        texts = self._jsonl_texts(chunk) if chunk.is_jsonl else chunk.records
        with_text = [text for text in texts if text and not text.isspace()]
        ids = self.tokenizer(with_text, add_special_tokens=False, return_attention_mask=False,
                             verbose=False)["input_ids"] if with_text else []
        documents = [document + self.document_end for document in ids if document]
        lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
        tokens = np.fromiter(itertools.chain.from_iterable(documents), dtype=self.dtype,
                             count=int(lengths.sum()))
        return EncodedChunk(tokens, lengths, empty=len(texts) - len(documents))

    def _jsonl_texts(self, chunk: Chunk) -> list[str | None]:
        texts = []
        for line_number, line in enumerate(chunk.records, start=chunk.first_line):
            if not line.strip():
                continue  # a blank line is no document
            where = f"{chunk.source}:{line_number}"
            record = json_object(line, where)
            if self.text_key not in record:
                raise InputError(f"{where}: no key '{self.text_key}' (keys: {', '.join(record)}); "
                                 "name the text field with --json-key")
            text = record[self.text_key]
            if text is not None and not isinstance(text, str):
                raise InputError(f"{where}: '{self.text_key}' holds a JSON {type(text).__name__}, "
                                 "not text; name the text field with --json-key")
            texts.append(text)
        return texts


_worker_encoder: ChunkEncoder | None = None  # each worker process loads its own tokenizer


def _start_worker(tokenizer_dir: str, text_key: str, eos_id: int | None, dtype: type[np.number]) -> None:
    global _worker_encoder
    _worker_encoder = ChunkEncoder(load_tokenizer(tokenizer_dir), text_key, eos_id, dtype)


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    return _worker_encoder(chunk)


def encode_in_order(chunks: Iterable[Chunk], encoder: ChunkEncoder, tokenizer_dir: str,
                    workers: int) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order. With several workers at most 2 chunks per worker are in flight:
    ``Pool.imap`` would read the whole input ahead into memory when reading outpaces tokenizing."""
    if workers == 1:
        yield from map(encoder, chunks)
        return
    # The workers already use every core; this also silences tokenizers' warning about forking.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    init_args = (tokenizer_dir, encoder.text_key, encoder.eos_id, encoder.dtype)
    with Pool(workers, initializer=_start_worker, initargs=init_args) as pool:
        in_flight = deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def preprocess(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike,
               tokenizer_dir: str | os.PathLike, *, json_key: str = "text", append_eod: bool = True,
               workers: int = 1, chunk_size: int = 256, overwrite: bool = False,
               progress: bool = True) -> Summary:
    """Tokenize ``inputs`` into ``output_prefix``.bin/.idx; raises InputError for bad inputs."""
    with warnings.catch_warnings():  # megatron-core warns that GPU libraries are missing: no matter here
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if workers < 1 or chunk_size < 1:
        raise InputError("--workers and --chunk-size must be at least 1")
    paths = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    if append_eod and tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer '{tokenizer_dir}' has no EOS token to end documents with; "
                         "use a tokenizer with one or pass --no-append-eod")
    bin_path, idx_path = Path(f"{output_prefix}.bin"), Path(f"{output_prefix}.idx")
    for existing in (bin_path, idx_path):
        if existing.exists() and not overwrite:
            raise InputError(f"output '{existing}' already exists; pass --overwrite to replace it "
                             "or choose another --output-prefix")
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    bin_tmp, idx_tmp = Path(f"{bin_path}.tmp"), Path(f"{idx_path}.tmp")

    dtype = DType.optimal_dtype(len(tokenizer))
    encoder = ChunkEncoder(tokenizer, json_key, tokenizer.eos_token_id if append_eod else None, dtype)
    chunks = itertools.chain.from_iterable(read_chunks(path, json_key, chunk_size) for path in paths)
    started = time.perf_counter()
    documents = empty = tokens = 0
    builder = IndexedDatasetBuilder(str(bin_tmp), dtype=dtype)
    try:
        with tqdm(desc=Path(output_prefix).name, unit=" docs", disable=not progress) as bar:
            for encoded in encode_in_order(chunks, encoder, str(tokenizer_dir), workers):
                start = 0
                for length in encoded.lengths.tolist():
                    builder.add_document(encoded.tokens[start:start + length], [length])
                    start += length
                documents += len(encoded.lengths)
                empty += encoded.empty
                tokens += len(encoded.tokens)
                bar.update(len(encoded.lengths) + encoded.empty)
                tokens_per_s = tokens / (time.perf_counter() - started)
                bar.set_postfix_str(f"{tokens:,} tokens, {tokens_per_s:,.0f} tokens/s", refresh=False)
        if documents == 0:  # megatron-core cannot open an empty dataset ("cannot mmap an empty file")
            raise InputError(f"no document with text in {', '.join(map(str, paths))} ({empty:,} empty ones "
                             f"skipped); nothing written to {output_prefix}.bin/.idx; give input that holds text")
        builder.finalize(str(idx_tmp))
    except BaseException:
        builder.data_file.close()
        bin_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
        raise
    # The .idx goes last: until it is in place, the prefix reads as incomplete, never as stale.
    idx_path.unlink(missing_ok=True)
    os.replace(bin_tmp, bin_path)
    os.replace(idx_tmp, idx_path)
    return Summary(documents, empty, tokens, [bin_path, idx_path], time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", action="extend", required=True, metavar="FILE_OR_GLOB",
                        help="jsonl/json/parquet files or quoted globs ('data/*.parquet', '**' recurses); "
                             "read in the order given, each glob sorted")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin and PREFIX.idx (the value to put in data.paths)")
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="local Hugging Face tokenizer folder (the one given as data.tokenizer)")
    parser.add_argument("--json-key", default="text", metavar="KEY",
                        help="JSON key (jsonl) or column (parquet) holding the text (default: %(default)s)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end each document with the tokenizer's EOS, the separator GPTDataset "
                             "expects (default: on)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizer processes; the output is the same for any number (default: 1)")
    parser.add_argument("--chunk-size", type=int, default=256, metavar="N",
                        help="documents per unit of work sent to a worker (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    args = parser.parse_args(argv)
    try:
        return cli.run(lambda: print(preprocess(
            args.input, args.output_prefix, args.tokenizer, json_key=args.json_key, append_eod=args.append_eod,
            workers=args.workers, chunk_size=args.chunk_size, overwrite=args.overwrite,
        )))
    except KeyboardInterrupt:
        print(f"interrupted; nothing written to {args.output_prefix}.bin/.idx", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
