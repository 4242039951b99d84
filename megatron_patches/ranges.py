"""Named ranges around the EPAS work: ``torch.profiler`` ranges in traces, NVTX ranges under
``torch.autograd.profiler.emit_nvtx`` (Nsight Systems).

A ``record_function`` costs microseconds (two dispatcher calls) even when nothing records it, so a
range is opened only while a profiler runs (``emit_nvtx`` counts as one); otherwise it costs one flag
check, and a forward and backward of a tiny model is no measurably slower.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
from torch.profiler import record_function

_NO_RANGE = nullcontext()


def epas_range(name: str):
    """``record_function(name)`` while a profiler runs, else a context that does nothing."""
    return record_function(name) if torch.autograd._profiler_enabled() else _NO_RANGE


def in_range(name: str):
    """Decorator: the whole function runs in :func:`epas_range` ``(name)``."""

    def decorate(function):
        @functools.wraps(function)
        def ranged(*args, **kwargs):
            with epas_range(name):
                return function(*args, **kwargs)

        return ranged

    return decorate
