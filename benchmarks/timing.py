"""What every benchmark shares: interleaved timing rounds, the machine and versions, a plain table.

Imports only torch, the standard library and the framework-free core, so that a benchmark built on
it runs where megatron-core is not installed.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from epas.sharing import MODES


def fractions(text: str) -> list[float]:
    """``--sharing``: comma-separated fractions in [0, 1); 0 is always added (every gain's baseline)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sharing takes fractions like 0,0.25,0.5, got {text!r}")
    if not values or any(not 0 <= f < 1 for f in values):
        raise argparse.ArgumentTypeError(f"sharing fractions must lie in [0, 1), got {text!r}")
    return sorted(set([0.0, *values]))


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,32, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def modes(text: str) -> list[str]:
    chosen = list(dict.fromkeys(text.split(",")))
    if any(mode not in MODES for mode in chosen):
        raise argparse.ArgumentTypeError(f"--mode takes qk, kv or qk,kv, got {text!r}")
    return chosen


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {torch.get_num_threads()} threads"


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def metadata(device: str, program: str, argv: list[str], model: str) -> dict:
    """What a figure needs to be reproduced: the machine, the versions, the command, the date.
    A package that is not installed (megatron-core on a decoding-only machine) is recorded as None."""
    return {
        "device": device_name(device),
        "model": model,
        "torch": torch.__version__,
        "megatron_core": _installed("megatron-core"),
        "transformers": _installed("transformers"),
        "python": platform.python_version(),
        "command": shlex.join(["python", *shlex.split(program.removeprefix("python ")), *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def interleaved(variants: list, measure, warmup: int, rounds: int) -> list[list]:
    """``measure(variant)`` results per variant over ``rounds`` rounds, each round shifted by one
    (A B C, B C A, ...) so that no variant always runs first or after the same neighbour.
    ``warmup`` rounds of the very same calls come first, their results dropped."""
    for _ in range(warmup):
        for variant in variants:
            measure(variant)
    results = [[] for _ in variants]
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for index in [*range(shift, len(variants)), *range(shift)]:
            results[index].append(measure(variants[index]))
        print(f"round {round_index + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def write_report(report: str, output: Path | None) -> None:
    """Print a text report, and also write it to ``output`` when one is given."""
    print(report)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report + "\n")


def gain(value: float, baseline: float) -> float:
    return value / baseline - 1


def print_table(columns: list[tuple[str, str]], rows: list[dict]) -> None:
    """One line per row; ``columns`` are (key, format), ``None`` values print as '-'."""
    cells = [[key for key, _ in columns]]
    cells += [["-" if row.get(key) is None else format(row[key], fmt) for key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
