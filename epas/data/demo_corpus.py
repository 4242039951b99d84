"""Build the demo's training data offline from English text that ships with Python itself.

    python tools/build_demo_corpus.py [--output-dir data/demo] [--vocab-size 512] [--rebuild]

The corpus is Python's help topics (``pydoc_data.topics``, the text behind ``help('FORMATTING')``)
plus the docstrings of some stdlib modules, all under the PSF licence: about 1,700 documents and
0.97 M characters, no download. The script writes, in the output folder:

    corpus.jsonl       the documents, {"source": ..., "text": ...} per line
    tokenizer/         a byte-level BPE tokenizer trained on them (<s> BOS, </s> EOS), for
                       AutoTokenizer.from_pretrained
    corpus.bin/.idx    the tokenized documents, a megatron-core indexed dataset
    build_info.json    sizes and settings, written last: its presence means the build is complete

Train on it with data.paths=[DIR/corpus] data.tokenizer=DIR/tokenizer. The output is the same on
every run with the same Python version. Only these files are written: if any of them is already
there the build stops and names --rebuild, which replaces them (and only them); a finished build
with the same settings is left alone.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from importlib import import_module
from pathlib import Path

from epas import cli
from epas.data.preprocess import preprocess
from epas.data.tokenizer import load_tokenizer
from epas.errors import InputError

# Pure-Python stdlib modules with plenty of prose in their docstrings.
DOCSTRING_MODULES = (
    "argparse", "ast", "base64", "calendar", "cmd", "codecs", "collections", "configparser",
    "contextlib", "csv", "dataclasses", "difflib", "doctest", "email.message", "ftplib", "functools",
    "getopt", "http.client", "imaplib", "inspect", "ipaddress", "json", "logging", "mimetypes",
    "optparse", "pathlib", "pdb", "platform", "queue", "random", "re", "sched",
    "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "traceback", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "uuid", "xml.etree.ElementTree", "zipfile",
)
BOS, EOS = "<s>", "</s>"
CORPUS, TOKENIZER, BUILD_INFO = "corpus", "tokenizer", "build_info.json"
CORPUS_FILES = (f"{CORPUS}.jsonl", f"{CORPUS}.bin", f"{CORPUS}.idx")  # .idx after .bin: see install()


def help_topic_documents() -> list[dict]:
    """One document per help topic of ``help()``, in name order."""
    from pydoc_data.topics import topics

    return [{"source": f"pydoc_data.topics:{name}", "text": topics[name]} for name in sorted(topics)]


def docstring_documents(module_name: str) -> list[dict]:
    """One document per docstring: the module's, then its public classes', methods' and functions'."""
    module = import_module(module_name)
    documented = [(module_name, module)]
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module_name:
            continue  # private, or imported from elsewhere (documented there)
        if inspect.isfunction(value) or inspect.isclass(value):
            documented.append((f"{module_name}.{name}", value))
        if inspect.isclass(value):
            documented += [(f"{module_name}.{name}.{member}", function) for member, function in vars(value).items()
                           if not member.startswith("_") and inspect.isfunction(function)]
    with warnings.catch_warnings():  # typing.io and typing.re warn when read
        warnings.simplefilter("ignore", DeprecationWarning)
        return [{"source": f"docstrings:{title}", "text": f"{title}\n{inspect.cleandoc(value.__doc__)}"}
                for title, value in documented if isinstance(value.__doc__, str) and value.__doc__.strip()]


def demo_documents() -> list[dict]:
    """The help topics, then the docstrings: over 1,000 documents, so that every split of the
    default data.split=969,30,1 gets some (megatron-core 0.16 loops forever on an empty one)."""
    if sys.flags.optimize >= 2:
        raise InputError("python -OO strips the docstrings this corpus is made of; run without -OO")
    documents = help_topic_documents()
    for module_name in DOCSTRING_MODULES:
        documents += docstring_documents(module_name)
    return documents


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> None:
    """A byte-level BPE (any text encodes, no unknown token) saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS).save_pretrained(folder)


def build_demo_corpus(output_dir: str | Path = "data/demo", vocab_size: int = 512,
                      rebuild: bool = False) -> tuple[dict, bool]:
    """Build (or find already built) the demo data; returns its build info and whether it was built.

    Only the build's own files are written (``corpus.*``, ``tokenizer/``, ``build_info.json``), and
    any of them already there only with ``rebuild``; nothing else in ``output_dir`` is touched. The
    build is made in a temporary folder beside them and moved into place when complete.
    """
    output_dir = Path(output_dir)
    settings = {"vocab_size": vocab_size, "python": platform.python_version()}
    if vocab_size < 258:
        raise InputError(f"--vocab-size {vocab_size} is too small: the 256 bytes and 2 special "
                         "tokens need 258")
    existing = [output_dir / name for name in (*CORPUS_FILES, TOKENIZER, BUILD_INFO) if (output_dir / name).exists()]
    if existing and not rebuild:
        info = finished_build(output_dir)
        if info is not None and {key: info.get(key) for key in settings} == settings:
            return info, False
        state = ("not a finished demo build" if info is None else
                 f"a demo build for --vocab-size {info.get('vocab_size')} on Python {info.get('python')}")
        raise InputError(f"{existing[0]} already exists ({state}); pass --rebuild to replace the demo corpus's "
                         f"files in {output_dir} (nothing else there is touched), or choose another --output-dir")

    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build_demo_corpus-", dir=output_dir))
    try:
        info = build_into(staging, settings, output_dir)
        install(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info, True


def read_build_info(output_dir: Path) -> dict | None:
    """``output_dir``'s build_info.json, or None where there is none that reads."""
    try:
        return json.loads((output_dir / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None


def finished_build(output_dir: Path) -> dict | None:
    """The build info of a complete build in ``output_dir``, else None."""
    info = read_build_info(output_dir)
    if info is None:
        return None
    files = info.get("files", [*CORPUS_FILES, f"{TOKENIZER}/tokenizer.json"])
    return info if all((output_dir / name).is_file() for name in files) else None


def build_into(staging: Path, settings: dict, output_dir: Path) -> dict:
    """Every file of the build, in ``staging``; returns the build info (paths as they will be in ``output_dir``)."""
    documents = demo_documents()
    jsonl_path = staging / f"{CORPUS}.jsonl"
    with jsonl_path.open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(document, ensure_ascii=False) + "\n" for document in documents)
    tokenizer_dir = staging / TOKENIZER
    train_tokenizer([document["text"] for document in documents], settings["vocab_size"], tokenizer_dir)
    summary = preprocess([jsonl_path], staging / CORPUS, tokenizer_dir, progress=False)
    info = {
        **settings,
        "documents": summary.documents,
        "characters": sum(len(document["text"]) for document in documents),
        "tokens": summary.tokens,
        "eos_id": load_tokenizer(tokenizer_dir).eos_token_id,
        "data_path": str(output_dir / CORPUS),
        "tokenizer": str(output_dir / TOKENIZER),
        "files": [*CORPUS_FILES, *sorted(f"{TOKENIZER}/{path.name}" for path in tokenizer_dir.iterdir())],
    }
    (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def install(staging: Path, output_dir: Path) -> None:
    """Move the build's files from ``staging`` into ``output_dir``, replacing only files of the same name.

    A tokenizer folder holding a file that neither this build nor the one before wrote is refused: it
    would be mixed into the tokenizer (a special_tokens_map.json, say, changes its special tokens).
    build_info.json goes first and comes back last, so an interrupted install reads as unfinished.
    """
    tokenizer_dir = output_dir / TOKENIZER
    if tokenizer_dir.exists():
        previous = (read_build_info(output_dir) or {}).get("files", [])
        ours = {*previous, *(f"{TOKENIZER}/{path.name}" for path in (staging / TOKENIZER).iterdir())}
        if not tokenizer_dir.is_dir():
            raise InputError(f"{tokenizer_dir} is a file, where the demo tokenizer folder goes; "
                             "move it or choose another --output-dir")
        for path in sorted(tokenizer_dir.iterdir()):
            if f"{TOKENIZER}/{path.name}" not in ours:
                raise InputError(f"{path} was not written by tools/build_demo_corpus.py and would be mixed into "
                                 "the demo tokenizer; move it out of that folder or choose another --output-dir")
    (output_dir / BUILD_INFO).unlink(missing_ok=True)
    tokenizer_dir.mkdir(exist_ok=True)
    for path in (staging / TOKENIZER).iterdir():
        os.replace(path, tokenizer_dir / path.name)
    (output_dir / f"{CORPUS}.idx").unlink(missing_ok=True)  # a new .bin never pairs with the old .idx
    for name in (*CORPUS_FILES, BUILD_INFO):
        os.replace(staging / name, output_dir / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="data/demo", help="where to write (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="tokenizer size, at most model.vocab_size (default: %(default)s, as in "
                             "configs/tiny_cpu.yaml)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build again, replacing the files of a build already in --output-dir")
    args = parser.parse_args(argv)
    return cli.run(lambda: _build_and_report(args))


def _build_and_report(args) -> None:
    info, built = build_demo_corpus(args.output_dir, args.vocab_size, args.rebuild)
    state = "built" if built else "is already built, nothing to do (--rebuild builds it again)"
    print(f"demo corpus in {args.output_dir} {state}: {info['documents']:,} documents, "
          f"{info['characters']:,} characters, {info['tokens']:,} tokens (vocabulary {info['vocab_size']})")
    print(f"train on it with: data.paths=[{info['data_path']}] data.tokenizer={info['tokenizer']}")


if __name__ == "__main__":
    sys.exit(main())
