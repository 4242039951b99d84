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

    In ``qk`` mode with unfused attention the slot also holds the block's attention
    probabilities: sharing layers get the same Q and K, so softmax(QK^T) is the same too.
    """

    def __init__(self) -> None:
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._probabilities: Tensor | None = None
        self._open = False

    @contextmanager
    def forward_scope(self):
        self._open, self._tensors, self._probabilities = True, None, None
        try:
            yield self
        finally:
            self._open, self._tensors, self._probabilities = False, None, None

    def put(self, tensors: tuple[Tensor, Tensor]) -> None:
        """A new source: its tensors replace the slot's, and no probabilities are known for them yet."""
        if self._open:
            self._tensors, self._probabilities = tensors, None

    def put_probabilities(self, probabilities: Tensor) -> None:
        if self._open:
            self._probabilities = probabilities

    @property
    def probabilities(self) -> Tensor | None:
        """softmax(QK^T) of the current source's Q and K, where a layer of its block computed it."""
        return self._probabilities

    def get(self, reader_layer: int) -> tuple[Tensor, Tensor]:
        if self._tensors is None:
            raise RuntimeError(
                f"layer {reader_layer - 1} (0-based) is in sharing mode but no preceding compute "
                "layer published its activations in this forward pass; set the sharing layers "
                "through EPASGPTModel.set_sharing_layers so sources and readers agree"
            )
        return self._tensors
