"""Overlapped data-parallel communication (``parallel.overlap_grad_reduce``, ``parallel.overlap_param_gather``),
wired into the schedules and the loop as Megatron-LM's training loop wires it.

With ``overlap_grad_reduce`` megatron-core's DDP starts each gradient bucket's all-reduce (a reduce-scatter with
the distributed optimizer) as soon as the last micro-batch's backward has produced it. With
``overlap_param_gather`` the distributed optimizer's step no longer gathers the updated weights: each bucket is
gathered during the next forward, by a forward pre-hook of the first module that uses it. Whatever reads the
weights outside a training forward (evaluation, a save, the caller after training) finishes those gathers first.
"""

from __future__ import annotations

from contextlib import contextmanager


def _per_chunk(functions: list):
    return functions[0] if len(functions) == 1 else functions


def set_schedule_hooks(config, chunks) -> None:
    """The pipeline schedules' hooks: reductions held back until the last micro-batch (``no_sync_func``); with
    overlap, each stage starts its reductions where the schedule says (``grad_sync_func``), and the interleaved
    schedule starts each chunk's weight gather (``param_sync_func``, with ``align_param_gather``)."""
    ddp_config = chunks[0].ddp_config
    config.no_sync_func = _per_chunk([chunk.no_sync for chunk in chunks])
    if ddp_config.overlap_grad_reduce:
        config.grad_sync_func = _per_chunk([chunk.start_grad_sync for chunk in chunks])
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = _per_chunk([chunk.start_param_sync for chunk in chunks])


def finish_param_gather(chunks) -> None:
    """Complete the updated weights on this rank now (a synchronous all-gather of what is still missing)."""
    for chunk in chunks:
        if chunk.use_forward_hook:
            chunk.start_param_sync(force_sync=True)


@contextmanager
def gather_hooks_paused(chunks):
    """Forward passes on complete weights without the gather pre-hooks (evaluation), which come back afterwards."""
    hooked = [chunk for chunk in chunks if chunk.use_forward_hook]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
