"""What a pretraining run is built from: megatron-core's config, model chunks, optimizer and LR schedule."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from epas.config import RunConfig
from megatron_patches.model import build_model, in_training_precision, transformer_config


def training_transformer_config(run: RunConfig) -> TransformerConfig:
    """The model's TransformerConfig plus the run's activation recompute."""
    config = transformer_config(run)
    if run.training.recompute == "selective":
        config.recompute_granularity, config.recompute_modules = "selective", ["core_attn"]
    elif run.training.recompute == "full":
        config.recompute_granularity, config.recompute_method = "full", "uniform"
        config.recompute_num_layers = run.training.recompute_num_layers
    return config


def build_chunks(run: RunConfig, config: TransformerConfig) -> list[DistributedDataParallel]:
    """This rank's model chunks (one per virtual pipeline stage), in training precision, inside DDP."""
    parallel = run.parallel
    vp = parallel.virtual_pipeline
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=run.optimizer.use_distributed_optimizer,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        bucket_size=parallel.ddp_bucket_size,
        overlap_param_gather=parallel.overlap_param_gather,
        # the interleaved schedule starts each chunk's gather itself (param_sync_func in overlap.py), as Megatron-LM
        align_param_gather=parallel.overlap_param_gather and vp is not None,
    )
    chunks = []
    for index in range(vp or 1):
        stage = index if vp else None
        model = build_model(
            run,
            config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        if run.device == "cuda":
            model.cuda()
        model = in_training_precision(model, config)
        chunks.append(DistributedDataParallel(config, ddp_config, model, disable_bucketing=index > 0))
    return chunks


def build_optimizer(run: RunConfig, config: TransformerConfig, chunks):
    """megatron-core's Adam (mixed precision in bf16, optionally distributed over data parallelism)."""
    settings = run.optimizer
    return get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=settings.lr,
            min_lr=settings.min_lr,
            weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1,
            adam_beta2=settings.adam_beta2,
            adam_eps=settings.adam_eps,
            clip_grad=settings.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=settings.use_distributed_optimizer,
        ),
        chunks,
    )


def build_lr_scheduler(run: RunConfig, optimizer) -> OptimizerParamScheduler:
    """Warm-up from 0, then ``decay_style`` down to ``min_lr`` at the last step; constant weight decay.

    A resumed run keeps its checkpoint's schedule, or this one with ``optimizer.override_on_resume``
    (:mod:`megatron_training.resume` refuses a changed value without it).
    """
    settings, steps = run.optimizer, run.training.train_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=settings.decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not settings.override_on_resume,
        override_opt_param_scheduler=settings.override_on_resume,
    )
