"""``checkpoint.keep_last``: older checkpoints are deleted once a newer one is published."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_training.checkpointing import iteration_dir, saved_iterations

PIN = "KEEP"  # a checkpoint folder holding a file of this name is never deleted
DELETING = ".deleting"


def prune(root: Path, keep_last: int, latest: int, protected: set[int]) -> list[int]:
    """Delete the complete checkpoints up to ``latest`` beyond the newest ``keep_last``; returns their iterations.

    Never deleted: ``latest`` itself, the ``protected`` iterations (the one this run resumed from), a
    folder holding a ``KEEP`` file (those do not count towards ``keep_last``), and anything newer
    than ``latest`` (a checkpoint the resume passed over, which the run's own saves replace). Each
    folder is renamed to ``iter_N.deleting`` before it is removed, so a kill half-way leaves nothing
    that could be loaded; leftovers of such a kill are removed here.
    """
    for leftover in root.glob(f"iter_*{DELETING}"):
        shutil.rmtree(leftover, ignore_errors=True)
    counted = [i for i in saved_iterations(root) if i <= latest and not (iteration_dir(root, i) / PIN).exists()]
    deleted = []
    for iteration in reversed(counted[keep_last:]):  # oldest first
        if iteration == latest or iteration in protected:
            continue
        folder = iteration_dir(root, iteration)
        doomed = folder.with_name(folder.name + DELETING)
        os.replace(folder, doomed)
        shutil.rmtree(doomed)
        deleted.append(iteration)
    return deleted
