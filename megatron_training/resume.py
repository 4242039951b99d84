"""What a resumed run may change from the configuration its checkpoint was trained with.

A resume continues the same run, so settings fall into four groups, checked key by key:

- fixed (refused): ``model.*`` (weights, RoPE, norms) and ``epas.*`` (the sharing schedule the
  checkpoint's scheduler state belongs to);
- the optimizer's schedule and Adam hyper-parameters: megatron-core restores them from the
  checkpoint, so a changed value is refused unless ``optimizer.override_on_resume=true`` says to use it;
- with the distributed optimizer, ``parallel.overlap_grad_reduce`` and ``parallel.ddp_bucket_size``
  (refused): they decide the gradient buckets, and the optimizer's states are saved bucket by bucket;
- the data (blend, tokenizer, batch size, seed): allowed, with a warning, since the run continues
  at the same sample count over different samples;
- everything else (steps, intervals, logging, layout, micro-batch size, recompute, clipping):
  takes effect.
"""

from __future__ import annotations

from pathlib import Path

from epas.config import RunConfig, to_dict
from epas.errors import ConfigError

FIXED_SECTIONS = ("model", "epas")
OPTIMIZER_SCHEDULE = (
    "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps", "optimizer.decay_style",
    "optimizer.weight_decay", "optimizer.adam_beta1", "optimizer.adam_beta2", "optimizer.adam_eps",
)
WARNED = (
    "data.mock", "data.paths", "data.weights", "data.split", "data.tokenizer", "data.global_batch_size", "seed",
)


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changes(saved: dict, current: dict, keys) -> list[str]:
    return [
        f"{key}={current[key]!r} (checkpoint: {saved[key]!r})"
        for key in keys
        if key in saved and key in current and saved[key] != current[key]
    ]


def check_resume(common: dict, run: RunConfig, path: Path) -> list[str]:
    """Refuse what a resume from the checkpoint with plain state ``common`` may not change; return the
    warnings for what it may change with care."""
    if common.get("weights_only"):
        raise ConfigError(
            f"{path} holds weights only (a converted model): start from it with "
            "checkpoint.load=<its folder> checkpoint.load_optimizer=false and a new checkpoint.dir"
        )
    saved, current = _flatten(common["config"]), _flatten(to_dict(run))
    fixed = [key for key in current if key.split(".")[0] in FIXED_SECTIONS]
    refused = _changes(saved, current, fixed)
    if refused:
        raise ConfigError(
            f"resuming {path} with another {', '.join(refused)}: a resumed run keeps the model and the "
            "EPAS schedule it was trained with. Drop these overrides, or start a new run from its weights "
            f"with checkpoint.load={path} checkpoint.load_optimizer=false and a new checkpoint.dir"
        )
    bucketing = _changes(saved, current, ["parallel.overlap_grad_reduce", "parallel.ddp_bucket_size"])
    if bucketing and run.optimizer.use_distributed_optimizer:
        raise ConfigError(
            f"resuming {path} with another {', '.join(bucketing)}: the distributed optimizer's states are saved "
            "per gradient bucket, and these decide the buckets (ddp_bucket_size parameters each with "
            "overlap_grad_reduce, one bucket without). Keep the checkpoint's values for this run"
        )
    schedule = _changes(saved, current, OPTIMIZER_SCHEDULE)
    if schedule and not run.optimizer.override_on_resume:
        raise ConfigError(
            f"resuming {path} with another {', '.join(schedule)}: the checkpoint's optimizer schedule "
            "would silently win. Add optimizer.override_on_resume=true to use the new values, or drop them"
        )
    warnings = [
        f"resuming {path} with another {change}: the run continues at the same sample count over other data"
        for change in _changes(saved, current, WARNED)
    ]
    steps = _changes(saved, current, ["training.train_steps"])
    if steps and not run.optimizer.override_on_resume:
        warnings.append(
            f"resuming with {steps[0]}: the learning rate keeps decaying over the checkpoint's "
            f"{saved['training.train_steps']} steps; add optimizer.override_on_resume=true to decay over "
            f"{current['training.train_steps']}"
        )
    return warnings
