"""What every command-line entry point shares: error reporting and the --device/--dtype options."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from epas.errors import EpasError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(main: Callable[[], object]) -> int:
    """Call an entry point's body and return its exit status: the body's own when it returns an int,
    else 0. An :class:`EpasError` becomes one line on stderr (on rank 0 only, so torchrun shows it
    once; on each rank that sees it if only some do) and its exit status, instead of a traceback.
    Ctrl-C where nothing handles it (start-up, or a second Ctrl-C) is one line and status 130, as a
    shell reports it."""
    try:
        status = main()
        return status if isinstance(status, int) else 0
    except EpasError as error:
        _print_once(f"{error.label}: {error}", error.every_rank)
        return error.exit_code
    except KeyboardInterrupt:
        _print_once("interrupted")
        return 130


def _print_once(message: str, every_rank: bool = False) -> None:
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is one")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")


def refuse_below_one(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Counts given on the command line (``--batch-size`` as ``batch_size``) must be 1 or more; unset ones pass."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """Where and in what precision to run a Hugging Face model: as asked, else cuda with bfloat16 where
    there is a GPU and the CPU with float32 where there is none."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, DTYPES[dtype or ("bfloat16" if device == "cuda" else "float32")]
