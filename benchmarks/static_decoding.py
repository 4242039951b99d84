"""Greedy decoding with a preallocated cache, every decode step replayed from one captured CUDA graph.

``generate()`` launches each kernel of a step from Python and reads the new tokens back every step, so at the
sizes of a 125M or 1.1B model the GPU waits on the host and a step costs about the same whatever it reads. Here
one decode step (forward, argmax, the token written back in place) is captured once and replayed: a step then
costs its kernels' time, mostly reading the weights and the cache, which is where a smaller EPAS cache pays.
It serves transformers' ``LlamaForCausalLM`` (with transformers' ``StaticCache``) and the EPAS model (with
``EpasStaticCache``) alike; on the CPU the same step runs eagerly.
"""

from __future__ import annotations

import inspect

import torch
from transformers import StaticCache

from epas_hf import EpasLlamaForCausalLM
from epas_hf.modeling_epas_llama import CACHE_KEYWORD


class GraphedGreedy:
    """Greedy decoding of `batch` sequences of up to `max_length` tokens (prompt and new tokens) with one model.

    The cache, the input token and the output buffer keep their addresses for the decoder's life, so the graph
    captured at the first `reset` serves every later call; `reset` empties the cache in place. The model must
    keep its sharing set while a decoder of it is in use (a graph replays the layers as they were captured).
    """

    def __init__(self, net, batch: int, max_length: int, new_tokens: int):
        device = next(net.parameters()).device
        self.net, self.cuda = net, device.type == "cuda"
        if isinstance(net, EpasLlamaForCausalLM):
            self.cache = net.new_static_cache(batch, max_length)
        else:
            self.cache = StaticCache(config=net.config, max_cache_len=max_length)
        # transformers before 5.x place tokens in a static cache by `cache_position`; later ones count in the cache
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.takes_position = "cache_position" in inspect.signature(net.forward).parameters
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.generated = torch.zeros(batch, new_tokens, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.empty = False  # until reset(): the first reset also captures the step

    def _next_token(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        extra = {}
        if self.takes_position:
            extra["cache_position"] = self.position + torch.arange(length, device=ids.device)
        logits = self.net(ids, use_cache=True, **{CACHE_KEYWORD: self.cache}, **extra).logits
        self.position.add_(length)
        return logits[:, -1:].argmax(-1)

    def _emit(self, token: torch.Tensor) -> None:
        self.token.copy_(token)
        self.generated.index_copy_(1, self.step_index, token)
        self.step_index.add_(1)

    def _step(self) -> None:
        self._emit(self._next_token(self.token))

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache in place, before each `prefill`. On a GPU the decode step is captured first, once: two
        eager steps on a side stream initialise the kernels and the cache's buffers, then one step is recorded
        (recording runs nothing)."""
        if self.cuda and self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
        self.cache.reset()
        self.position.zero_()
        self.step_index.zero_()
        self.empty = True

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt and emit the first new token (apart from `reset`, so that emptying a cache, a memset of
        all its buffers for transformers' StaticCache, is not timed as prefill)."""
        if not self.empty:
            raise RuntimeError("call reset() before each prefill(): the cache still holds the last sequences")
        self.empty = False
        self._emit(self._next_token(prompt))

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """`steps` more tokens after `prefill`: graph replays on a GPU, eager steps on the CPU."""
        for _ in range(steps):
            if self.graph is None:
                self._step()
            else:
                self.graph.replay()

    def tokens(self) -> torch.Tensor:
        """The tokens emitted since the last `prefill`, as [batch, tokens]."""
        return self.generated[:, : int(self.step_index)]
