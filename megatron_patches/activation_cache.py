"""The per-microbatch store through which a compute layer hands its Q/K (or K/V) to sharing layers."""

from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor


class ActivationCache:
    """Holds the most recent source layer's shared tensors during one forward pass.

    Layers run in order, so a single slot suffices: a compute layer followed by a sharing layer
    writes it, and every sharing layer of that block reads it. The slot is open only inside
    :meth:`forward_scope` and emptied when the scope ends, so after the forward the tensors are
    kept alive by the autograd graph alone and are freed by the backward. Writes outside the
    scope (e.g. selective recompute re-running core attention during the backward) are ignored.
    """

    def __init__(self) -> None:
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._open = False

    @contextmanager
    def forward_scope(self):
        self._open, self._tensors = True, None
        try:
            yield self
        finally:
            self._open, self._tensors = False, None

    def put(self, tensors: tuple[Tensor, Tensor]) -> None:
        if self._open:
            self._tensors = tensors

    def get(self, reader_layer: int) -> tuple[Tensor, Tensor]:
        if self._tensors is None:
            raise RuntimeError(
                f"layer {reader_layer - 1} (0-based) is in sharing mode but no preceding compute "
                "layer published its activations in this forward pass; set the sharing layers "
                "through EPASGPTModel.set_sharing_layers so sources and readers agree"
            )
        return self._tensors
