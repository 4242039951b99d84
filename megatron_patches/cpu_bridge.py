"""Run megatron-core on CPU with the gloo backend.

megatron-core asks for CUDA in ~90 places (``device="cuda"`` literals, ``.cuda()``,
``torch.cuda.current_device()``, the CUDA RNG tracker). Nothing in its configuration avoids
them, so for CPU smoke runs, laptops and the test-suite this module redirects them:

* a ``TorchFunctionMode`` rewrites every CUDA ``device=`` argument of torch calls to CPU, turns
  ``Tensor.cuda()`` into a no-op and lets ``Tensor.type()`` answer CUDA type names, which
  megatron-core's optimizers use to sort parameters by dtype;
* ``torch.cuda.current_device`` answers ``"cpu"`` and ``torch.cuda.synchronize`` does nothing;
* the model-parallel RNG tracker keeps its states in the CPU generator;
* the default causal mask is built on the CPU. The autograd engine does not carry torch-function
  modes into backward, and activation recompute rebuilds that mask there.

Sequence parallelism needs nothing more: its collectives (``all_gather_into_tensor``,
``reduce_scatter_tensor``) are in gloo since torch 2.2, below this project's minimum 2.6
(reduce-scatter as an all-reduce of which each rank keeps its slice), and its buffers
(megatron-core's global memory buffer, the reduce-scatter outputs) ask
``torch.cuda.current_device()`` for their device, which the bridge answers with the CPU. What
was missing was a norm: a model change, not a bridge one (``megatron_patches/norms.py``).

It is switched on explicitly with :func:`enable` (``device: cpu`` in a run config) and is the
only place where this project patches megatron-core. It is never needed on a GPU.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_mode: "_CudaToCpuMode | None" = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Sends every CUDA device request of a torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return result.replace("torch.", "torch.cuda.", 1)
        return result


def _cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.ones(sq, sq, dtype=torch.bool).triu(1)


def enable() -> None:
    """Redirect megatron-core's CUDA calls to the CPU for the rest of the process."""
    global _mode
    if _mode is not None:
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = _cpu_rng_state
    torch.cuda.manual_seed = torch.cuda.random.manual_seed = torch.manual_seed
    mp_random._get_cuda_rng_state = _cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    _mode = _CudaToCpuMode()
    _mode.__enter__()

