"""The EPAS training loop over megatron-core's parts.

megatron-core ships no training loop; this one uses its DDP, optimizer, LR schedule, pipeline
schedules and distributed checkpoints (built in :mod:`megatron_training.builders`), and steps the
EPAS scheduler after every iteration. When to log, validate, save and stop is decided by the
components of :mod:`megatron_training.cadence`, so :meth:`Trainer.train` reads as one screen.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from epas.config import RunConfig, to_dict
from epas.flops import attention_counting, training_flops_per_token
from epas.profiling import StepProfiler
from epas.scheduler import SharingScheduler
from megatron_patches.fusions import describe, fusions_of
from megatron_training import checkpointing, overlap, retention
from megatron_training.builders import build_chunks, build_lr_scheduler, build_optimizer, training_transformer_config
from megatron_training.cadence import Intervals, StopConditions, ThroughputWindow
from megatron_training.data import build_datasets, micro_batches
from megatron_training.metrics import MetricsLogger, describe_memory, peak_memory_by_rank
from megatron_training.resume import check_resume
from megatron_training.step_guard import FiniteStepGuard, NonFiniteStepError


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    loss = (output.float().reshape(-1) * mask).sum()
    tokens = mask.sum()
    return loss, tokens.int(), {"lm loss": torch.stack([loss.detach(), tokens])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


class Trainer:
    """One run's model chunks, optimizer, schedules and data; :meth:`train` is the loop."""

    def __init__(self, run: RunConfig):
        self.run = run
        self.device = torch.device("cuda" if run.device == "cuda" else "cpu")
        self.stop = StopConditions(run, self.device)  # first, so a stop during start-up is honoured
        self.due = Intervals.of(run)
        self.log = MetricsLogger(run.logging, to_dict(run), enabled=dist.get_rank() == dist.get_world_size() - 1)
        self.config = training_transformer_config(run)
        self.chunks = build_chunks(run, self.config)
        self.optimizer = build_optimizer(run, self.config, self.chunks)
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        overlap.set_schedule_hooks(self.config, self.chunks)
        self.lr_scheduler = build_lr_scheduler(run, self.optimizer)
        self.sharing = SharingScheduler(run.model.num_layers, run.epas)
        self.guard = FiniteStepGuard(run.training, self.device)
        self.iteration = 0
        self.consumed_samples = 0
        self._last_saved = None
        self._resumed_from = None  # never deleted by checkpoint.keep_last
        self._memory_shown = False
        self.background_saves = checkpointing.BackgroundSaves()  # used with checkpoint.async_save
        self._load_checkpoint()
        self._apply_sharing()
        self.num_microbatches = run.data.global_batch_size // (
            run.data.micro_batch_size * parallel_state.get_data_parallel_world_size()
        )
        # every evaluation reads the same first eval_steps global batches of the valid split
        valid_samples = run.training.eval_steps * run.data.global_batch_size
        self.train_data, self.valid_data = build_datasets(run, valid_samples)
        self.forward_backward = get_forward_backward_func()

    # ---- the loop -------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to ``training.train_steps`` (or a stop); returns the last iteration."""
        self._announce()
        self.stop.start_clock()
        try:
            self._train_until_done()
        except NonFiniteStepError:
            self.background_saves.finish(wait=True)  # a finite checkpoint being written is still published
            raise
        self.background_saves.finish(wait=True)
        self.log.close()
        return self.iteration

    def _train_until_done(self) -> None:
        profiler = StepProfiler(self.run.profiling, self.iteration, self.run.device == "cuda",
                                self.run.logging.tensorboard_dir)
        window = ThroughputWindow()  # the steps since the last log line
        while self.iteration < self.run.training.train_steps:
            sharing = self.sharing.current  # the set this step trains with
            metrics = self._timed_step(window, sharing)
            profiler.step()
            self.background_saves.finish(wait=False)  # publish what every rank has finished writing
            self._grow_sharing_region()
            if self.due.log_due(self.iteration):
                self._log_step(metrics, sharing, window)
                window = ThroughputWindow()
            if self.due.evaluate_due(self.iteration):
                self._log_validation()
            if self.due.save_due(self.iteration):
                self.save()
            reason = self.stop.reason(self.iteration)
            if reason:
                self.log.print(f"{reason}: saving at iteration {self.iteration} and exiting")
                break
        profiler.close()
        overlap.finish_param_gather(self.chunks)  # the last step's weights, complete for the caller
        self.save()

    # ---- one iteration --------------------------------------------------------------------------

    def train_step(self) -> dict:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run_microbatches(self._iterators(self.train_data, self.consumed_samples), False)
        problem = self.guard.problem(loss, self.chunks, self.iteration + 1)
        grad_norm = None
        if problem is None:
            _, grad_norm, _ = self.optimizer.step()
            self.lr_scheduler.step(increment=1)
        else:  # skipped as megatron-LM skips an overflowing step: its batch is consumed, the LR does not move
            self.log.print(f"iteration {self.iteration + 1}: {problem}, step skipped "
                           f"({self.guard.in_a_row} in a row, training.max_skipped_steps={self.guard.limit})")
        self.iteration += 1
        self.consumed_samples += self.run.data.global_batch_size
        return {"loss": loss.item(), "grad_norm": grad_norm}

    def _timed_step(self, window: ThroughputWindow, sharing: tuple[int, ...]) -> dict:
        """One training step, added to ``window`` with the FLOPs it really did (skipped ones not counted)."""
        run = self.run
        start = time.perf_counter()
        metrics = self.train_step()  # ends in loss.item(): the device has finished the step
        tokens = run.data.global_batch_size * run.model.seq_length
        flops = training_flops_per_token(run.model, sharing, run.epas.mode, **attention_counting(run.spec))
        window.add(time.perf_counter() - start, tokens * flops)
        # every step, so plots mark each growth of the region at its exact step
        self.log.scalars(self.iteration, {"epas/num_sharing_layers": len(sharing)})
        return metrics

    def evaluate(self) -> float:
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad(), overlap.gather_hooks_paused(self.chunks):
            iterators = self._iterators(self.valid_data, 0)
            losses = [
                self._run_microbatches(iterators, forward_only=True)
                for _ in range(self.run.training.eval_steps)
            ]
        for chunk in self.chunks:
            chunk.train()
        return torch.stack(losses).mean().item()

    def _iterators(self, dataset, first_sample: int):
        return [
            micro_batches(dataset, first_sample, self.run.data.micro_batch_size)
            for _ in self.chunks
        ]

    def _run_microbatches(self, iterators, forward_only: bool) -> torch.Tensor:
        """Forward (and backward) one global batch; returns its mean token loss on every rank."""
        losses = self.forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=self.num_microbatches,
            seq_length=self.models[0].p2p_seq_length(self.run.model.seq_length),
            micro_batch_size=self.run.data.micro_batch_size,
            forward_only=forward_only,
        )
        totals = torch.zeros(2)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            totals = sum(item["lm loss"].float().cpu() for item in losses)
        totals = totals.to(self.device)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.broadcast(
            totals,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return totals[0] / totals[1]

    # ---- the sharing region ---------------------------------------------------------------------

    @property
    def models(self) -> list:
        """The model chunks without their DDP (and Float16Module) wrappers."""
        return unwrap_model(self.chunks)

    def _apply_sharing(self) -> None:
        seq_length = self.run.model.seq_length
        before = self.models[0].p2p_seq_length(seq_length)
        for model in self.models:
            model.set_sharing_layers(self.sharing.current)
        after = self.models[0].p2p_seq_length(seq_length)
        if after != before:
            self.log.print(
                f"pipeline messages now carry shared activations: p2p length {after} instead "
                f"of {before} per micro-batch (see docs/PIPELINE.md)"
            )

    def _grow_sharing_region(self) -> None:
        if not self.sharing.step():
            return
        self.sharing.check_same_on_all_ranks()
        self._apply_sharing()
        self.log.print(f"iteration {self.iteration}: sharing region grows to {list(self.sharing.current)}")
        self.log.text(self.iteration, "epas/sharing_layers", str(list(self.sharing.current)))

    # ---- checkpoints ----------------------------------------------------------------------------

    def _load_checkpoint(self) -> None:
        ckpt = self.run.checkpoint
        root = Path(ckpt.dir) if ckpt.dir else None
        if root is not None and checkpointing.latest_iteration(root) is not None:
            (path, common), resume = checkpointing.newest_loadable(root, self.log.warn), True  # continue this run
        elif ckpt.load:
            path, resume = checkpointing.resolve(Path(ckpt.load)), ckpt.load_optimizer
            common = checkpointing.common_state(path)
        else:
            return
        warnings = check_resume(common, self.run, path) if resume else checkpointing.function_changes(
            common["config"]["model"], self.run, path
        )
        for warning in warnings:
            self.log.warn(warning)
        state = checkpointing.load(path, self.models, self.optimizer if resume else None, self.run, common)
        if resume:
            self.iteration = self._last_saved = self._resumed_from = state["iteration"]
            self.consumed_samples = state["consumed_samples"]
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.sharing.load_state_dict(state["epas_scheduler"])
            if self.run.optimizer.override_on_resume:
                self._override_adam_settings()
        self.log.print(f"loaded {path} ({'resuming at iteration ' + str(self.iteration) if resume else 'weights only'})")

    def _override_adam_settings(self) -> None:
        """Adam's betas and eps come back from the checkpoint with its state; use the config's instead."""
        settings = self.run.optimizer
        for group in self.optimizer.param_groups:
            group["betas"] = (settings.adam_beta1, settings.adam_beta2)
            group["eps"] = settings.adam_eps

    def save(self) -> None:
        """Save this iteration, unless it is saved already (an interval save, or the resumed one).

        With ``checkpoint.async_save`` the previous background save is finished first, so at most one
        is in flight; this one is published (and announced) when a later step finds it written.
        """
        if not self.run.checkpoint.dir or self.iteration == self._last_saved:
            return
        overlap.finish_param_gather(self.chunks)
        self.guard.check_weights(self.models, self.iteration)
        self.background_saves.finish(wait=True)
        checkpointing.save(
            Path(self.run.checkpoint.dir),
            self.iteration,
            self.models,
            self.optimizer,
            {
                "consumed_samples": self.consumed_samples,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "epas_scheduler": self.sharing.state_dict(),
                "fused_kernels": fusions_of(self.config),
            },
            self.run,
            self.background_saves if self.run.checkpoint.async_save else None,
            on_published=self._published,
        )
        self._last_saved = self.iteration

    def _published(self, path: Path) -> None:
        """A checkpoint is complete and ``latest`` names it: the logging rank applies ``checkpoint.keep_last``."""
        self.log.print(f"saved checkpoint {path}")
        keep_last = self.run.checkpoint.keep_last
        if keep_last and self.log.enabled:
            root = path.parent
            protected = {self._resumed_from} - {None}
            deleted = retention.prune(root, keep_last, checkpointing.latest_iteration(root), protected)
            if deleted:
                self.log.print(f"checkpoint.keep_last={keep_last}: deleted the checkpoints of iterations {deleted}")

    # ---- reporting ------------------------------------------------------------------------------

    def _announce(self) -> None:
        run = self.run
        fused = describe(fusions_of(self.config), run.device)
        self.log.print(fused)
        self.log.text(self.iteration, "run/fused_kernels", fused)
        self.log.print(f"EPAS target {list(self.sharing.target)} (mode {run.epas.mode}); "
                       f"sharing now {list(self.sharing.current)}")
        if self.iteration >= run.training.train_steps:
            self.log.print(
                f"{run.checkpoint.dir} is already at iteration {self.iteration} of "
                f"training.train_steps={run.training.train_steps}: nothing to train (raise "
                "training.train_steps to continue, or give a new checkpoint.dir)"
            )

    def _log_step(self, metrics: dict, sharing: tuple[int, ...], window: ThroughputWindow) -> None:
        """One console line and the TensorBoard scalars for the steps since the last line.

        TFLOP/s counts the FLOPs each step really did with the sharing set it trained with
        (skipped projections are not counted), divided by every device of the job.
        """
        run = self.run
        tokens_per_step = run.data.global_batch_size * run.model.seq_length
        tflops_per_device = window.tflops_per_device()
        values = {
            "train/loss": metrics["loss"],
            "train/lr": self.lr_scheduler.get_lr(self.optimizer.param_groups[0]),
            "train/grad_norm": metrics["grad_norm"] or 0.0,
            "train/tokens_per_s": tokens_per_step / window.step_time,
            "train/tflops_per_gpu": tflops_per_device,
            "train/skipped_steps": self.guard.skipped,
            **peak_memory_by_rank(self.device),
        }
        line = (
            f"iteration {self.iteration:6d}/{run.training.train_steps} | loss {metrics['loss']:.4f} | "
            f"lr {values['train/lr']:.2e} | grad norm {values['train/grad_norm']:.3f} | "
            f"{values['train/tokens_per_s']:.0f} tok/s | {tflops_per_device:.3f} TFLOP/s/device | "
            f"sharing {len(sharing)} | {window.step_time * 1000:.0f} ms/step"
        )
        if run.training.peak_tflops:
            values["train/mfu"] = tflops_per_device / run.training.peak_tflops
            line += f" | MFU {values['train/mfu']:.1%}"
        self.log.scalars(self.iteration, values)
        self.log.print(line)
        if not self._memory_shown:  # under the first line of this start: where the memory goes
            self.log.print(describe_memory(values))
            self._memory_shown = True

    def _log_validation(self) -> None:
        valid_loss = self.evaluate()
        self.log.scalars(self.iteration, {"valid/loss": valid_loss})
        self.log.print(f"iteration {self.iteration}: validation loss {valid_loss:.4f}")


def pretrain(run: RunConfig) -> int:
    """Train ``run`` to ``training.train_steps`` (or a stop signal); returns the last iteration."""
    return Trainer(run).train()
