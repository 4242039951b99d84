"""What a conversion shows while it runs: a progress bar over the tensors it writes, then one summary line."""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def peak_memory() -> int:
    """This process's peak resident memory in bytes: the kernel's high-water mark of its address space
    (``VmHWM``; ``ru_maxrss`` where there is no /proc, which after fork and exec may also count the parent's)."""
    status = Path("/proc/self/status")
    if status.is_file():
        match = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Progress:
    """A tqdm bar over the tensors to write (bytes with ETA, and the tensor count), closed with a summary line:
    ``what: N tensors, X GiB (dtype) in T s, peak memory P GiB``."""

    def __init__(self, what: str, tensors: Iterable[torch.Tensor]):
        """``tensors``: those the conversion will write (meta tensors will do): their count and size are the total."""
        tensors = list(tensors)
        self.what, self.count, self.total = what, len(tensors), sum(map(_nbytes, tensors))
        self.done, self.dtypes = 0, sorted({str(t.dtype).removeprefix("torch.") for t in tensors})

    def __enter__(self) -> Progress:
        from tqdm import tqdm

        self.start = time.monotonic()
        self.bar = tqdm(total=self.total, desc=self.what, unit="B", unit_scale=True, unit_divisor=1024,
                        mininterval=1.0, dynamic_ncols=True)
        return self

    def update(self, tensor: torch.Tensor) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"{self.done}/{self.count} tensors", refresh=False)
        self.bar.update(_nbytes(tensor))

    def track(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """``items`` passed through, each counted once the consumer has taken it."""
        for name, tensor in items:
            yield name, tensor
            self.update(tensor)

    def phase(self, text: str) -> None:
        """Name what runs after the last tensor (a checkpoint being written)."""
        self.bar.set_description_str(text)
        self.bar.refresh()

    def __exit__(self, error_type, *_) -> None:
        self.bar.close()
        if error_type is None:
            print(f"{self.what}: {self.done} tensors, {self.total / 2**30:.2f} GiB ({', '.join(self.dtypes)}) in "
                  f"{time.monotonic() - self.start:.1f} s, peak memory {peak_memory() / 2**30:.2f} GiB", flush=True)
