"""Never apply or save a step whose numbers are not finite (``training.on_nonfinite``).

megatron-core's fp32 and bf16 optimizers step whatever gradients they get (only fp16 loss scaling
skips overflows), so one NaN gradient turns the weights into NaN and the next save publishes them.
The guard looks at the loss and every gradient before the optimizer step, and at the weights before
a save; each decision is one all-reduce, so every rank takes the same branch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from epas.config import TrainingConfig
from epas.errors import EpasError


class NonFiniteStepError(EpasError):
    """A step's loss or gradients (or the weights before a save) are NaN/Inf; nothing was applied or saved."""


ADVICE = (
    "lower optimizer.lr or raise optimizer.warmup_steps (on resume add optimizer.override_on_resume=true), "
    "or set training.on_nonfinite=skip to drop such steps"
)


def _on_any_rank(flag: bool, device: torch.device) -> bool:
    flag = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gradients_finite(chunks) -> bool:
    """This rank's gradient buffers (after their reduction) hold only finite numbers."""
    return all(
        bool(torch.isfinite(buffer.grad_data).all())
        for chunk in chunks
        for buffer in chunk.buffers + chunk.expert_parallel_buffers
    )


def weights_finite(models) -> bool:
    return all(bool(torch.isfinite(parameter).all()) for model in models for parameter in model.parameters())


class FiniteStepGuard:
    """Decides whether a step may be applied; stops the run, or skips the step, when it may not."""

    def __init__(self, training: TrainingConfig, device: torch.device):
        self.policy = training.on_nonfinite
        self.limit = training.max_skipped_steps
        self.device = device
        self.in_a_row = 0
        self.skipped = 0

    def problem(self, loss: torch.Tensor, chunks, iteration: int) -> str | None:
        """None when step ``iteration`` may be applied; else what is not finite, for a skipped step.

        Raises :class:`NonFiniteStepError` under the "stop" policy or past ``max_skipped_steps``.
        """
        loss_finite = bool(torch.isfinite(loss))  # the same on every rank: the loss is all-reduced
        if not _on_any_rank(not (loss_finite and gradients_finite(chunks)), self.device):
            self.in_a_row = 0
            return None
        what = "gradients are" if loss_finite else f"loss is {loss.item()}, so the gradients are"
        if self.policy == "stop":
            raise NonFiniteStepError(
                f"the {what} not finite at iteration {iteration}; the step was not applied and nothing was "
                f"saved (the last checkpoint stays the one to resume from): {ADVICE}"
            )
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row > self.limit:
            raise NonFiniteStepError(
                f"{self.in_a_row} steps in a row up to iteration {iteration} were not finite (the {what} "
                f"not finite; training.max_skipped_steps={self.limit}); nothing of them was applied or saved: "
                "lower optimizer.lr or raise optimizer.warmup_steps (on resume add "
                "optimizer.override_on_resume=true)"
            )
        return f"the {what} not finite"

    def check_weights(self, models, iteration: int) -> None:
        """Refuse to save weights that are not finite (whatever made them so)."""
        if _on_any_rank(not weights_finite(models), self.device):
            raise NonFiniteStepError(
                f"the weights are not finite at iteration {iteration}; not saving them (the last checkpoint "
                f"stays the one to resume from): {ADVICE}"
            )
