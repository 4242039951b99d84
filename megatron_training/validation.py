"""The checks of a pretraining run against its world, before anything is built (each names its fix)."""

from __future__ import annotations

from pathlib import Path

import torch

from epas.config import RunConfig
from epas.errors import ConfigError
from epas.profiling import check_profiling
from epas.scheduler import SharingScheduler
from epas.trackers import check_installed
from megatron_training.data import check_data_files


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
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no GPU is visible; use device=cpu for a CPU run")
    if parallel.sequence_parallel:
        _check_sequence_parallel(model.seq_length, tp)
    if run.optimizer.warmup_steps >= run.training.train_steps:
        raise ConfigError(
            f"optimizer.warmup_steps={run.optimizer.warmup_steps} must be below "
            f"training.train_steps={run.training.train_steps}"
        )
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
    _check_operations(run, world_size)
    check_installed(run.logging)
    check_data_files(run)


def _check_operations(run: RunConfig, world_size: int) -> None:
    """Overlap, profiling and retention settings that need another setting to mean anything."""
    parallel = run.parallel
    if parallel.ddp_bucket_size is not None and not parallel.overlap_grad_reduce:
        raise ConfigError(
            f"parallel.ddp_bucket_size={parallel.ddp_bucket_size} sizes the buckets of overlapped gradient reduction; "
            "without it the gradients are reduced as one bucket. Set parallel.overlap_grad_reduce=true or drop it"
        )
    if parallel.overlap_param_gather and not (run.optimizer.use_distributed_optimizer and parallel.overlap_grad_reduce):
        raise ConfigError(
            "parallel.overlap_param_gather gathers the distributed optimizer's weights bucket by bucket; it needs "
            "optimizer.use_distributed_optimizer=true and parallel.overlap_grad_reduce=true"
        )
    check_profiling(run.profiling, run.logging.tensorboard_dir, world_size, cuda=run.device == "cuda")
    if run.checkpoint.keep_last is not None and not run.checkpoint.dir:
        raise ConfigError("checkpoint.keep_last deletes older checkpoints of checkpoint.dir, which is not set")


def _check_sequence_parallel(seq_length: int, tp: int) -> None:
    """Sequence parallelism splits each sequence over the tensor-parallel ranks (either spec)."""
    if tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel splits the sequence over tensor-parallel ranks and needs "
            "parallel.tensor_parallel > 1; set parallel.sequence_parallel=false for tensor_parallel=1"
        )
    if seq_length % tp:
        raise ConfigError(
            f"with parallel.sequence_parallel, model.seq_length={seq_length} must be divisible by "
            f"parallel.tensor_parallel={tp}"
        )


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
