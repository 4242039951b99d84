"""Train an EPAS Hugging Face model with the transformers Trainer (optionally DeepSpeed ZeRO-2/3).

The run starts from a plain LLaMA folder or an EPAS export, grows the sharing region with the same
schedule as pretrain_epas.py, keeps Trainer checkpoints (``OUTPUT_DIR/checkpoint-N``, resumed
automatically) and ends with an EPAS folder (``OUTPUT_DIR/model``) that tools/convert_checkpoint.py
hf-to-megatron and ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` both read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from epas_hf import EpasLlamaForCausalLM, write_model_files
from epas.config import FinetuneConfig, to_dict
from epas.errors import ConfigError
from epas.data.tokenizer import load_tokenizer
from epas.hf_config import read_model_config
from epas.profiling import check_profiling
from epas.scheduler import SharingScheduler
from epas.trackers import check_installed, start_trackers

from .callbacks import (SCHEDULE_FILE, EpasScheduleCallback, ProfilerCallback, SaveAndStopCallback,
                        check_resumed_schedule, tracking_callbacks)
from .data import PadToLongest, build_datasets, check_files

FINAL_FOLDER = "model"
# optimizer.decay_style -> the Trainer's lr_scheduler_type; the Trainer has no linear decay to a minimum
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine_with_min_lr",
                "inverse-square-root": "inverse_sqrt"}


def validate_finetune(config: FinetuneConfig, world_size: int) -> None:
    """Every check that needs no model weights, so a bad config fails in seconds (ConfigError names the fix)."""
    check_installed(config.logging)
    check_profiling(config.profiling, config.logging.tensorboard_dir, world_size, cuda=torch.cuda.is_available())
    if config.model is None:
        raise ConfigError("model is not set; give the Hugging Face folder to start from (model=PATH)")
    model_config = read_model_config(config.model)
    SharingScheduler(model_config["num_hidden_layers"], config.epas)  # checks the epas section
    data, training, optimizer = config.data, config.training, config.optimizer
    check_files(data)
    load_tokenizer(data.tokenizer or config.model)
    per_step = data.micro_batch_size * world_size
    if data.global_batch_size % per_step:
        raise ConfigError(f"data.global_batch_size={data.global_batch_size} is not a multiple of "
                          f"data.micro_batch_size × processes = {data.micro_batch_size} × {world_size}")
    if training.output_dir is None:
        raise ConfigError("training.output_dir is not set; it holds the Trainer checkpoints and the final model")
    if training.deepspeed is not None:
        _deepspeed_config(training.deepspeed)
    if optimizer.decay_style not in LR_SCHEDULES:
        raise ConfigError(f"optimizer.decay_style={optimizer.decay_style!r} is not available with the Trainer; "
                          f"use one of {', '.join(LR_SCHEDULES)}")
    if optimizer.use_distributed_optimizer:
        raise ConfigError("optimizer.use_distributed_optimizer is Megatron's; shard optimizer states with "
                          "training.deepspeed=configs/deepspeed/zero2.json (or zero3.json) instead")
    if optimizer.override_on_resume:
        raise ConfigError("optimizer.override_on_resume is pretrain_epas.py's: a Trainer resume keeps the "
                          "checkpoint's optimizer settings; drop it (a changed setting is refused by name on resume)")


def _deepspeed_config(path) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"training.deepspeed file '{path}' not found; see configs/deepspeed/")
    try:
        ds_config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"training.deepspeed file '{path}' is not valid JSON ({error})") from None
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3 and not ds_config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(f"training.deepspeed file '{path}' uses ZeRO-3 without "
                          "zero_optimization.stage3_gather_16bit_weights_on_model_save=true, so the final model "
                          "could not be written whole; set it to true")
    return ds_config


def training_arguments(config: FinetuneConfig, world_size: int, has_validation: bool):
    """The Trainer's arguments; creating them starts torch.distributed (and DeepSpeed's config) as needed."""
    data, training, optimizer = config.data, config.training, config.optimizer
    evaluate = has_validation and training.eval_interval is not None
    return TrainingArguments(
        output_dir=training.output_dir,
        max_steps=training.train_steps,
        per_device_train_batch_size=data.micro_batch_size,
        per_device_eval_batch_size=data.micro_batch_size,
        gradient_accumulation_steps=data.global_batch_size // (data.micro_batch_size * world_size),
        learning_rate=optimizer.lr,
        lr_scheduler_type=LR_SCHEDULES[optimizer.decay_style],
        # as a ratio: ZeRO-3's optimizer has no `defaults` to read the peak LR from
        lr_scheduler_kwargs={"min_lr_rate": optimizer.min_lr / optimizer.lr} if optimizer.decay_style == "cosine" else {},
        warmup_steps=optimizer.warmup_steps,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.adam_beta1,
        adam_beta2=optimizer.adam_beta2,
        adam_epsilon=optimizer.adam_eps,
        max_grad_norm=optimizer.clip_grad,
        logging_steps=training.log_interval,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=training.eval_interval if evaluate else None,
        save_strategy="steps" if training.save_interval else "no",
        save_steps=training.save_interval or 500,
        save_total_limit=training.save_total_limit,
        deepspeed=training.deepspeed,
        bf16=training.bf16,
        gradient_checkpointing=training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        ddp_timeout=round(config.distributed.timeout_minutes * 60),
        report_to="none",  # TensorBoard and W&B come as callbacks after the EPAS one, so they see the sharing size
    )


def _last_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` written to the end: the schedule file is its last file, so a checkpoint
    cut short by a kill is passed over (and left in place)."""
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    steps = {int(folder.name.removeprefix(prefix)): folder for folder in output_dir.glob(f"{prefix}*")
             if folder.name.removeprefix(prefix).isdigit()}
    for step in sorted(steps, reverse=True):
        if (steps[step] / SCHEDULE_FILE).is_file():
            return str(steps[step])
        print(f"skipping {steps[step]}: incomplete (no {SCHEDULE_FILE})", flush=True)
    return None


def _checkpoint_step(checkpoint: str) -> int:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


def finetune(config: FinetuneConfig) -> Path | None:
    """Run (or resume) the training; return the final EPAS folder, or None when stopped early."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    output_dir = Path(config.training.output_dir)
    final_folder = output_dir / FINAL_FOLDER
    last = _last_checkpoint(output_dir)
    if last and _checkpoint_step(last) >= config.training.train_steps and (final_folder / "config.json").is_file():
        print(f"{output_dir} already finished {config.training.train_steps} steps; the model is in {final_folder} "
              "(raise training.train_steps to train on)", flush=True)
        return final_folder

    save_and_stop = SaveAndStopCallback(config.training.exit_interval)  # from here on a stop signal saves
    scheduler = SharingScheduler(read_model_config(config.model)["num_hidden_layers"], config.epas)
    if last:
        check_resumed_schedule(last, scheduler, config.optimizer)
    tokenizer_source = config.data.tokenizer or config.model
    tokenizer = load_tokenizer(tokenizer_source)
    num_train = config.training.train_steps * config.data.global_batch_size
    has_validation = config.data.format == "indexed" or bool(config.data.valid_paths)
    args = training_arguments(config, world_size, has_validation)
    is_main = args.process_index == 0  # also starts torch.distributed
    if config.training.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # ZeRO-3 shards the weights while loading them: it needs DeepSpeed's comm
    train_data, valid_data = build_datasets(config.data, tokenizer, tokenizer_source, seed=config.seed,
                                            num_train_samples=num_train, num_valid_samples=config.training.eval_samples)
    model = EpasLlamaForCausalLM.from_pretrained(config.model, dtype=torch.float32, sharing_layers=[],
                                                 sharing_mode=config.epas.mode)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"tokenizer '{tokenizer_source}' has {len(tokenizer)} tokens but the model's vocabulary "
                          f"has {model.config.vocab_size}; use the model's own tokenizer")
    if last:
        print(f"resuming from {last} (step {_checkpoint_step(last)})", flush=True)
    trackers = start_trackers(config.logging, to_dict(config)) if is_main else []
    callbacks = [EpasScheduleCallback(model, scheduler, config.optimizer), save_and_stop,
                 ProfilerCallback(config.profiling, config.logging.tensorboard_dir),
                 *tracking_callbacks(config.logging, trackers)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=args, train_dataset=train_data, eval_dataset=valid_data,
                      data_collator=PadToLongest(pad_id), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=last)
    for tracker in trackers:
        tracker.close()
    if trainer.state.global_step < config.training.train_steps:
        print(f"stopped at step {trainer.state.global_step}; run the same command again to resume", flush=True)
        return None

    # the final EPAS folder: the region reached, recorded as the trained one; written aside, then renamed
    layers = list(scheduler.sharing_layers_at(trainer.state.global_step))
    model.set_sharing_layers(layers)
    model.config.trained_sharing_layers = layers
    staging = output_dir / f"{FINAL_FOLDER}.tmp"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        model.config.auto_map = write_model_files(staging)
        tokenizer.save_pretrained(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank: ZeRO-3 gathers the shards
    trainer.accelerator.wait_for_everyone()
    if is_main:
        shutil.rmtree(final_folder, ignore_errors=True)
        staging.rename(final_folder)
        print(f"saved the EPAS model (sharing layers {layers}, mode {config.epas.mode}) to {final_folder}",
              flush=True)
    trainer.accelerator.wait_for_everyone()
    return final_folder
