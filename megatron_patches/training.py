"""The EPAS training loop, assembled from megatron-core's parts.

megatron-core ships no training loop; this one uses its DDP, optimizer, LR schedule, pipeline
schedules and distributed checkpoints, and steps the EPAS scheduler after every iteration.
"""

from __future__ import annotations

import signal
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megatron_patches import checkpointing
from megatron_patches.config import ConfigError, RunConfig
from megatron_patches.data import build_datasets, check_data_files, micro_batches
from megatron_patches.flops import attention_counting, training_flops_per_token
from megatron_patches.fusions import describe, fusions_of
from megatron_patches.layer_specs import BACKENDS
from megatron_patches.metrics import MetricsLogger, peak_memory_gb
from megatron_patches.model import build_model, in_training_precision, transformer_config
from megatron_patches.scheduler import SharingScheduler

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last saved checkpoint is left untouched."""


def validate_run(run: RunConfig, world_size: int) -> None:
    """Check the configuration against the world before anything is built."""
    model, parallel, data = run.model, run.parallel, run.data
    tp, pp, vp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.virtual_pipeline
    if world_size % (tp * pp):
        raise ConfigError(
            f"{world_size} processes cannot be split into tensor_parallel={tp} × "
            f"pipeline_parallel={pp}; launch a multiple of {tp * pp} processes"
        )
    dp = world_size // (tp * pp)
    if model.num_attention_heads % tp or model.query_groups % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} must divide model.num_attention_heads="
            f"{model.num_attention_heads} and model.num_query_groups={model.query_groups}"
        )
    if model.padded_vocab_size() % tp:
        raise ConfigError(
            f"the padded vocabulary ({model.padded_vocab_size()} rows) is not divisible by "
            f"parallel.tensor_parallel={tp}; set model.make_vocab_size_divisible_by to a multiple of {tp}"
        )
    if vp is not None and pp == 1:
        raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline_parallel > 1")
    _check_stage_layers(model.num_layers, parallel)
    if data.global_batch_size % (data.micro_batch_size * dp):
        raise ConfigError(
            f"data.global_batch_size={data.global_batch_size} is not divisible by "
            f"data.micro_batch_size × data-parallel size = {data.micro_batch_size} × {dp}"
        )
    if run.spec not in BACKENDS:
        raise ConfigError(f"spec must be one of {BACKENDS}, got {run.spec!r}")
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no GPU is visible; use device=cpu for a CPU run")
    if parallel.sequence_parallel and run.spec != "te":
        raise ConfigError("parallel.sequence_parallel needs spec=te (Transformer Engine norms)")
    if run.training.recompute not in (None, "selective", "full"):
        raise ConfigError(
            f"training.recompute must be null, 'selective' or 'full', got {run.training.recompute!r}"
        )
    if run.optimizer.warmup_steps >= run.training.train_steps:
        raise ConfigError(
            f"optimizer.warmup_steps={run.optimizer.warmup_steps} must be below "
            f"training.train_steps={run.training.train_steps}"
        )
    if run.optimizer.decay_style not in DECAY_STYLES:
        raise ConfigError(f"optimizer.decay_style must be one of {DECAY_STYLES}")
    target = SharingScheduler(model.num_layers, run.epas).target
    if target and run.training.recompute == "full":
        raise ConfigError(
            "training.recompute='full' would drop the gradients of activations shared across "
            "layers; use training.recompute='selective' with EPAS"
        )
    if run.checkpoint.load and not Path(run.checkpoint.load).exists():
        raise ConfigError(
            f"checkpoint.load={run.checkpoint.load} does not exist; give a checkpoint folder "
            "(with 'latest' or an iter_N folder), e.g. one made by tools/convert_checkpoint.py"
        )
    check_data_files(run)


def _check_stage_layers(num_layers: int, parallel) -> None:
    """Every pipeline stage (and virtual chunk) must get a whole number of layers."""
    pp, vp = parallel.pipeline_parallel, parallel.virtual_pipeline or 1
    first, last = parallel.first_stage_layers, parallel.last_stage_layers
    if first is None and last is None:
        if num_layers % (pp * vp):
            raise ConfigError(
                f"model.num_layers={num_layers} is not divisible by pipeline_parallel × "
                f"virtual_pipeline = {pp * vp}"
            )
        return
    if pp == 1:
        raise ConfigError("parallel.first_stage_layers/last_stage_layers need parallel.pipeline_parallel > 1")
    fixed = [n for n in (first, last) if n is not None]
    middle_stages, middle_layers = pp - len(fixed), num_layers - sum(fixed)
    per_stage = middle_layers // middle_stages if middle_stages else 0
    if middle_layers < 0 or (middle_stages and middle_layers % middle_stages) or (not middle_stages and middle_layers):
        raise ConfigError(
            f"with first_stage_layers={first} and last_stage_layers={last}, the other "
            f"{middle_layers} of model.num_layers={num_layers} cannot be split evenly over "
            f"{middle_stages} middle stage(s)"
        )
    if any(n % vp for n in (*fixed, per_stage)):
        raise ConfigError(
            f"every stage's layers ({fixed + [per_stage] if middle_stages else fixed}) must be "
            f"divisible by parallel.virtual_pipeline={vp}"
        )


def _training_transformer_config(run: RunConfig):
    config = transformer_config(run)
    if run.training.recompute == "selective":
        config.recompute_granularity, config.recompute_modules = "selective", ["core_attn"]
    elif run.training.recompute == "full":
        config.recompute_granularity, config.recompute_method = "full", "uniform"
        config.recompute_num_layers = run.training.recompute_num_layers
    return config


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
    """Holds one run's model chunks, optimizer, schedules and data, and trains it."""

    def __init__(self, run: RunConfig):
        self.run = run
        self._stop_signal = None
        self._install_signal_handlers()  # a stop requested during start-up is honoured too
        self.rank = dist.get_rank()
        self.log = MetricsLogger(run.logging.tensorboard_dir, enabled=self.rank == dist.get_world_size() - 1)
        self.config = _training_transformer_config(run)
        self.chunks = self._build_chunks()
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=run.optimizer.lr,
                min_lr=run.optimizer.min_lr,
                weight_decay=run.optimizer.weight_decay,
                adam_beta1=run.optimizer.adam_beta1,
                adam_beta2=run.optimizer.adam_beta2,
                adam_eps=run.optimizer.adam_eps,
                clip_grad=run.optimizer.clip_grad,
                bf16=self.config.bf16,
                params_dtype=self.config.params_dtype,
                use_distributed_optimizer=run.optimizer.use_distributed_optimizer,
            ),
            self.chunks,
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [chunk.no_sync for chunk in self.chunks]
        self.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.lr_scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=run.optimizer.lr,
            min_lr=run.optimizer.min_lr,
            lr_warmup_steps=run.optimizer.warmup_steps,
            lr_decay_steps=run.training.train_steps,
            lr_decay_style=run.optimizer.decay_style,
            start_wd=run.optimizer.weight_decay,
            end_wd=run.optimizer.weight_decay,
            wd_incr_steps=run.training.train_steps,
            wd_incr_style="constant",
        )
        self.epas = SharingScheduler(run.model.num_layers, run.epas)
        self.iteration = 0
        self.consumed_samples = 0
        self._last_saved = None
        self._load_checkpoint()
        self._apply_sharing()
        self.num_microbatches = run.data.global_batch_size // (
            run.data.micro_batch_size * parallel_state.get_data_parallel_world_size()
        )
        # every evaluation reads the same first eval_steps global batches of the valid split
        valid_samples = run.training.eval_steps * run.data.global_batch_size
        self.train_data, self.valid_data = build_datasets(run, valid_samples)
        self.forward_backward = get_forward_backward_func()

    # ---- set-up ---------------------------------------------------------------------------------

    def _build_chunks(self) -> list[DistributedDataParallel]:
        vp = self.run.parallel.virtual_pipeline
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=self.run.optimizer.use_distributed_optimizer,
        )
        chunks = []
        for index in range(vp or 1):
            stage = index if vp else None
            model = build_model(
                self.run,
                self.config,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
            )
            if self.run.device == "cuda":
                model.cuda()
            model = in_training_precision(model, self.config)
            chunks.append(
                DistributedDataParallel(self.config, ddp_config, model, disable_bucketing=index > 0)
            )
        return chunks

    def _load_checkpoint(self) -> None:
        ckpt = self.run.checkpoint
        root = Path(ckpt.dir) if ckpt.dir else None
        if root is not None and checkpointing.latest_iteration(root) is not None:
            path, resume = checkpointing.resolve(root), True  # continue this run
        elif ckpt.load:
            path, resume = checkpointing.resolve(Path(ckpt.load)), ckpt.load_optimizer
        else:
            return
        state = checkpointing.load(path, self.models, self.optimizer if resume else None, self.run)
        if resume:
            self.iteration = self._last_saved = state["iteration"]
            self.consumed_samples = state["consumed_samples"]
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.epas.load_state_dict(state["epas_scheduler"])
        self.log.print(f"loaded {path} ({'resuming at iteration ' + str(self.iteration) if resume else 'weights only'})")

    @property
    def models(self) -> list:
        """The model chunks without their DDP (and Float16Module) wrappers."""
        return unwrap_model(self.chunks)

    def _apply_sharing(self) -> None:
        seq_length = self.run.model.seq_length
        before = self.models[0].p2p_seq_length(seq_length)
        for model in self.models:
            model.set_sharing_layers(self.epas.current)
        after = self.models[0].p2p_seq_length(seq_length)
        if after != before:
            self.log.print(
                f"pipeline messages now carry shared activations: p2p length {after} instead "
                f"of {before} per micro-batch (see docs/PIPELINE.md)"
            )

    # ---- one iteration --------------------------------------------------------------------------

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
        totals = totals.to(self._device())
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.broadcast(
            totals,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return totals[0] / totals[1]

    def _device(self):
        return torch.device("cuda") if self.run.device == "cuda" else torch.device("cpu")

    def train_step(self) -> dict:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run_microbatches(self._iterators(self.train_data, self.consumed_samples), False)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at iteration {self.iteration + 1}; stopping without saving "
                "(the last checkpoint is intact): lower optimizer.lr or raise warmup_steps"
            )
        _, grad_norm, _ = self.optimizer.step()
        self.lr_scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += self.run.data.global_batch_size
        return {"loss": loss.item(), "grad_norm": grad_norm}

    def evaluate(self) -> float:
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            iterators = self._iterators(self.valid_data, 0)
            losses = [
                self._run_microbatches(iterators, forward_only=True)
                for _ in range(self.run.training.eval_steps)
            ]
        for chunk in self.chunks:
            chunk.train()
        return torch.stack(losses).mean().item()

    # ---- the loop -------------------------------------------------------------------------------

    def save(self) -> None:
        """Save this iteration, unless it is saved already (an interval save, or the resumed one)."""
        if not self.run.checkpoint.dir or self.iteration == self._last_saved:
            return
        path = checkpointing.save(
            Path(self.run.checkpoint.dir),
            self.iteration,
            self.models,
            self.optimizer,
            {
                "consumed_samples": self.consumed_samples,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "epas_scheduler": self.epas.state_dict(),
                "fused_kernels": fusions_of(self.config),
            },
            self.run,
        )
        self._last_saved = self.iteration
        self.log.print(f"saved checkpoint {path}")

    def _should_stop(self, started: float) -> str | None:
        """A reason to save and stop now, agreed by all ranks (signal or time limit)."""
        limit = self.run.training.exit_duration_minutes
        out_of_time = limit is not None and (time.time() - started) / 60 > limit
        flag = torch.tensor([self._stop_signal is not None, out_of_time], dtype=torch.int32)
        flag = flag.to(self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag[0]:
            return "received a stop signal"
        if flag[1]:
            return f"exit_duration_minutes={limit} reached"
        interval = self.run.training.exit_interval
        if interval and self.iteration % interval == 0:
            return f"exit_interval={interval} reached"
        return None

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def train(self) -> int:
        run, training = self.run, self.run.training
        fused = describe(fusions_of(self.config), run.device)
        self.log.print(fused)
        self.log.text(self.iteration, "run/fused_kernels", fused)
        self.log.print(f"EPAS target {list(self.epas.target)} (mode {run.epas.mode}); "
                       f"sharing now {list(self.epas.current)}")
        if self.iteration >= training.train_steps:
            self.log.print(
                f"{run.checkpoint.dir} is already at iteration {self.iteration} of "
                f"training.train_steps={training.train_steps}: nothing to train (raise "
                "training.train_steps to continue, or give a new checkpoint.dir)"
            )
        tokens_per_step = run.data.global_batch_size * run.model.seq_length
        started = time.time()
        window = {"steps": 0, "seconds": 0.0, "flops": 0.0}  # training steps since the last log line
        while self.iteration < training.train_steps:
            sharing = self.epas.current  # the set this step trains with
            step_start = time.perf_counter()
            metrics = self.train_step()  # ends in loss.item(): the device has finished the step
            window["seconds"] += time.perf_counter() - step_start
            window["steps"] += 1
            window["flops"] += tokens_per_step * training_flops_per_token(
                run.model, sharing, run.epas.mode, **attention_counting(run.spec)
            )
            # every step, so plots mark each growth of the region at its exact step
            self.log.scalars(self.iteration, {"epas/num_sharing_layers": len(sharing)})
            if self.epas.step():
                self.epas.check_same_on_all_ranks()
                self._apply_sharing()
                self.log.print(f"iteration {self.iteration}: sharing region grows to "
                               f"{list(self.epas.current)}")
                self.log.text(self.iteration, "epas/sharing_layers", str(list(self.epas.current)))
            if self.iteration % training.log_interval == 0 or self.iteration == training.train_steps:
                self._log_step(metrics, sharing, window, tokens_per_step)
                window = {"steps": 0, "seconds": 0.0, "flops": 0.0}
            if training.eval_interval and self.iteration % training.eval_interval == 0:
                valid_loss = self.evaluate()
                self.log.scalars(self.iteration, {"valid/loss": valid_loss})
                self.log.print(f"iteration {self.iteration}: validation loss {valid_loss:.4f}")
            save_interval = run.checkpoint.save_interval
            if save_interval and self.iteration % save_interval == 0:
                self.save()
            reason = self._should_stop(started)
            if reason:
                self.log.print(f"{reason}: saving at iteration {self.iteration} and exiting")
                self.save()
                break
        else:
            self.save()
        self.log.close()
        return self.iteration

    def _log_step(self, metrics: dict, sharing: tuple[int, ...], window: dict, tokens_per_step: int) -> None:
        """One console line and the TensorBoard scalars for the steps since the last line.

        TFLOP/s counts the FLOPs each step really did with the sharing set it trained with
        (skipped projections are not counted), divided by every device of the job.
        """
        run = self.run
        step_time = window["seconds"] / window["steps"]
        tflops_per_device = window["flops"] / window["seconds"] / dist.get_world_size() / 1e12
        values = {
            "train/loss": metrics["loss"],
            "train/lr": self.lr_scheduler.get_lr(self.optimizer.param_groups[0]),
            "train/grad_norm": metrics["grad_norm"] or 0.0,
            "train/tokens_per_s": tokens_per_step / step_time,
            "train/tflops_per_gpu": tflops_per_device,
            "memory/peak_gb": peak_memory_gb(),
        }
        line = (
            f"iteration {self.iteration:6d}/{run.training.train_steps} | loss {metrics['loss']:.4f} | "
            f"lr {values['train/lr']:.2e} | grad norm {values['train/grad_norm']:.3f} | "
            f"{values['train/tokens_per_s']:.0f} tok/s | {tflops_per_device:.3f} TFLOP/s/device | "
            f"sharing {len(sharing)} | {step_time * 1000:.0f} ms/step"
        )
        if run.training.peak_tflops:
            values["train/mfu"] = tflops_per_device / run.training.peak_tflops
            line += f" | MFU {values['train/mfu']:.1%}"
        self.log.scalars(self.iteration, values)
        self.log.print(line)


def pretrain(run: RunConfig) -> int:
    """Train ``run`` to ``training.train_steps`` (or a stop signal); returns the last iteration."""
    return Trainer(run).train()
