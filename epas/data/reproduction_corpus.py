"""The reproduction's corpus: every prose docstring of Python's standard library, split three ways by document.

The documents are Python's help topics (as in the demo corpus) and the docstrings of every module, class and
function of the pure-Python standard library, read from the source files with ``ast`` (nothing is imported), all
under the PSF licence and the same on every machine with the same Python version. Exact duplicates (a docstring
copied into several classes) are kept once, so that no held-out text is also a training text. Each document goes
to one split by a hash of its text:

    pretrain   what the pretraining runs read
    cpt        fresh text for the continual-pretraining runs (the paper continues TinyLlama on new data)
    heldout    what every model is evaluated on; no run trains on it

The tokenizer (byte-level BPE) is trained on the pretrain split alone. Written into the output folder: ``SPLIT.jsonl``,
``SPLIT.bin/.idx`` for each split, ``tokenizer/`` and ``build_info.json`` (last: its presence means complete).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from pathlib import Path

from epas.data.demo_corpus import help_topic_documents, train_tokenizer
from epas.data.preprocess import preprocess
from epas.errors import InputError

SPLITS = ("pretrain", "cpt", "heldout")
# Percent of the documents in each split, chosen by a hash of the text.
SPLIT_PERCENT = {"pretrain": 65, "cpt": 30, "heldout": 5}
TOKENIZER, BUILD_INFO = "tokenizer", "build_info.json"
# Parts of the standard library that are tests, demos, GUI or vendored code rather than documented modules.
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
                    "__phello__", "pydoc_data"}
MIN_DOCSTRING_CHARS = 60  # shorter ones are mostly "Return self." and the like


def docstring_documents(stdlib: Path) -> list[dict]:
    """One document per docstring of at least MIN_DOCSTRING_CHARS, titled with its dotted name, in file order."""
    documents = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if SKIPPED_PACKAGES.intersection(parts):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few files are templates or target other versions
            continue
        module = ".".join(part for part in parts if part != "__init__")
        for title, node in _documented(module, tree):
            text = ast.get_docstring(node)
            if text and len(text) >= MIN_DOCSTRING_CHARS:
                documents.append({"source": f"docstrings:{title}", "text": f"{title}\n{text}"})
    return documents


def _documented(prefix: str, node: ast.AST):
    """(dotted name, node) for a module or class and every class and function defined in it, at any depth."""
    yield prefix, node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _documented(f"{prefix}.{child.name}", child)


def split_of(text: str) -> str:
    """The split a document belongs to: fixed by its text, so adding documents never moves another one."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100
    for split in SPLITS:
        bucket -= SPLIT_PERCENT[split]
        if bucket < 0:
            return split
    raise AssertionError("SPLIT_PERCENT must add up to 100")


def corpus_documents() -> dict[str, list[dict]]:
    """The deduplicated documents of each split."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen, splits = set(), {split: [] for split in SPLITS}
    for document in help_topic_documents() + docstring_documents(stdlib):
        if document["text"] not in seen:
            seen.add(document["text"])
            splits[split_of(document["text"])].append(document)
    return splits


def finished_build(folder: Path) -> dict | None:
    """The build info of a complete corpus in ``folder``, else None."""
    try:
        return json.loads((folder / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None


def build_reproduction_corpus(folder: Path, vocab_size: int) -> dict:
    """Build the corpus into ``folder`` (made in a temporary folder beside it, renamed when complete), or return the
    build info of the one already there. A folder of that name without one is not a build of ours (a build is
    renamed into place complete) and is refused, not replaced."""
    info = finished_build(folder)
    if info is not None:
        return info
    if folder.exists():
        raise InputError(f"{folder} exists but holds no finished corpus ({BUILD_INFO}); move it away or choose "
                         "another --output")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        splits = corpus_documents()
        train_tokenizer([document["text"] for document in splits["pretrain"]], vocab_size, staging / TOKENIZER)
        info = {"vocab_size": vocab_size, "python": platform.python_version(), "licence": "PSF-2.0", "splits": {}}
        for split, documents in splits.items():
            jsonl = staging / f"{split}.jsonl"
            with jsonl.open("w", encoding="utf-8") as file:
                file.writelines(json.dumps(document, ensure_ascii=False) + "\n" for document in documents)
            summary = preprocess([jsonl], staging / split, staging / TOKENIZER, progress=False)
            info["splits"][split] = {"documents": summary.documents, "tokens": summary.tokens,
                                     "characters": sum(len(document["text"]) for document in documents)}
        (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info
