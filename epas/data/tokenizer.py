"""Hugging Face tokenizers from local folders (transformers is imported only when one is loaded)."""

from __future__ import annotations

from pathlib import Path

from epas.errors import ConfigError


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
