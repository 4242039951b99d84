"""Atomic distributed checkpoints (megatron-core ``dist_checkpointing``, torch_dist format).

Layout of ``checkpoint.dir``::

    iter_0000200/          one complete checkpoint (loadable at any TP/PP layout)
    iter_0000300.tmp/      a save in progress, or one that was killed: never loaded
    latest                 the iteration of the newest complete checkpoint

A save writes into ``iter_N.tmp``, renames it to ``iter_N`` once every rank has finished and only
then moves ``latest`` (write-then-rename), so a crash at any moment leaves the previous
checkpoint loadable and ``latest`` pointing at it. A save that fails (a full disk) says so and
leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from functools import cache, partial
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from epas.config import RunConfig, to_dict
from epas.errors import ConfigError, InputError
from megatron_training.checkpoint_files import verify_checkpoint
from megatron_training.distributed import end_with_parent

LATEST = "latest"
# The distributed optimizer's states as each DP rank holds them (Megatron-LM's default): saved and
# loaded in parallel, reshardable over DP. megatron-core 0.16's own default (fully_sharded_model_space)
# cannot be saved at all, and its fully_reshardable load fails with torch's Adam. Other optimizers ignore it.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def _staging_dir(root: Path, iteration: int) -> Path:
    """Where checkpoint ``iteration`` is written before it is complete (never loaded)."""
    return root / f"iter_{iteration:07d}.tmp"


def saved_iterations(root: Path) -> list[int]:
    """The iterations of the ``iter_N`` folders under ``root``, newest first (complete or not)."""
    names = (path.name for path in root.glob("iter_*"))
    return sorted((int(name[5:]) for name in names if re.fullmatch(r"iter_\d{7}", name)), reverse=True)


def latest_iteration(root: Path) -> int | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{pointer} holds {text!r}, not an iteration number")
    return int(text)


def _layout() -> list[int]:
    return [
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    ]


def _rng_state() -> ShardedObject:
    """This rank's RNG states, keyed by its place in the parallel layout."""
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, tuple(_layout()), rank, replica_id=0)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model_chunks, optimizer, is_loading: bool) -> dict:
    state = {}
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        state[key] = chunk.sharded_state_dict()
    if optimizer is not None:
        if is_loading:
            _create_adam_states(optimizer)
        model_state = {k: v for k, v in state.items() if k.startswith("model")}
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=OPTIMIZER_FORMAT
        )
    return state


def _distributed_optimizer(optimizer) -> DistributedOptimizer | None:
    """The run's DistributedOptimizer (alone, or the single one megatron-core chains), else None."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return chained[0] if len(chained) == 1 and isinstance(chained[0], DistributedOptimizer) else None


def _create_adam_states(optimizer) -> None:
    """Give every parameter of a distributed optimizer's torch Adam its (zero) states.

    megatron-core's DistributedOptimizer reads Adam's ``step`` from every state before it loads
    into them, but torch's Adam creates states only at its first step (Transformer Engine's and
    apex's Adam, which megatron-core expects on GPUs, keep ``step`` elsewhere); the load then
    overwrites these zeros.
    """
    distributed = _distributed_optimizer(optimizer)
    if distributed is None:
        return
    adam = distributed.optimizer
    for group in adam.param_groups:
        for parameter in group["params"]:
            if not adam.state[parameter]:
                adam.state[parameter].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(parameter),
                                             exp_avg_sq=torch.zeros_like(parameter))


def _restore_adam_steps(optimizer, saved: dict) -> None:
    """After a distributed optimizer's load, give each torch Adam state its own ``step`` tensor at
    the checkpoint's step.

    With torch's Adam (no Transformer Engine or apex), megatron-core 0.16 keeps the step in the
    saved param groups, but its DP-reshardable load leaves the states at the freshly created step
    and puts one shared tensor into all of them, which Adam would advance once per parameter.
    """
    distributed = _distributed_optimizer(optimizer)
    steps = {group["step"] for group in saved.get("optimizer", {}).get("param_groups", []) if "step" in group}
    if distributed is None or len(steps) != 1:
        return
    (step,) = steps
    for state in distributed.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step))


def save(root: Path, iteration: int, model_chunks, optimizer, extra: dict, run: RunConfig,
         background: BackgroundSaves | None = None, on_published=None) -> Path:
    """Save model, optimizer (unless None), RNG and ``extra`` as checkpoint ``iteration``.

    ``model_chunks`` are the unwrapped models (no DDP), so the keys are the model's own and a
    checkpoint written by a converter or a trainer reads the same. An ``iter_N`` that exists already
    (a save killed before ``latest`` moved, or a run resumed from an earlier iteration) is replaced
    only once the new one is complete. With ``background`` the files are written by a process of
    their own while training goes on, and the checkpoint is published when ``background`` finishes
    it. ``on_published(path)`` runs on every rank once ``latest`` names it.
    """
    final, staging = iteration_dir(root, iteration), _staging_dir(root, iteration)
    if dist.get_rank() == 0:
        if staging.exists():
            shutil.rmtree(staging)  # left behind by a killed save
        staging.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, is_loading=False)
    state.update(
        extra, iteration=iteration, layout=_layout(), rng_state=_rng_state(), config=to_dict(run)
    )
    try:
        request = dist_checkpointing.save(state, str(staging), async_sharded_save=background is not None)
        if dist.get_rank() == 0:
            (staging / "run_config.yaml").write_text(yaml.safe_dump(to_dict(run), sort_keys=False))
    except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        raise _save_error(error, root, staging, iteration) from error
    publish = partial(_publish_everywhere, root, iteration, on_published)
    if background is None:
        publish()
    else:
        background.add(request, publish, root, iteration)
    return final


def _publish_everywhere(root: Path, iteration: int, on_published) -> None:
    """Once every rank has written its part: rename ``iter_N.tmp`` to ``iter_N``, then move ``latest``."""
    dist.barrier()
    final = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        _publish(_staging_dir(root, iteration), final)
        _point_latest_at(root, iteration)
    dist.barrier()
    if on_published is not None:
        on_published(final)


@cache
def _writers_end_with_their_trainer() -> None:
    """The writer processes megatron-core forks for background saves die with the trainer (a ``kill -9``
    of it would otherwise leave them writing a checkpoint nobody publishes)."""
    os.register_at_fork(after_in_child=end_with_parent)


class BackgroundSaves:
    """``checkpoint.async_save``: megatron-core's async sharded saves in flight, each published once
    every rank has finished writing it (megatron-core's queue agrees on that with one all-reduce)."""

    def __init__(self):
        self._queue = AsyncCallsQueue()
        self._in_flight: list[tuple[Path, int]] = []  # (root, iteration), oldest first

    def add(self, request, publish, root: Path, iteration: int) -> None:
        _writers_end_with_their_trainer()
        request.add_finalize_fn(publish)
        self._queue.schedule_async_request(request)
        self._in_flight.append((root, iteration))

    def finish(self, wait: bool) -> None:
        """Publish the saves every rank has written (with ``wait``: all of them, waiting). Collective."""
        if not self._in_flight:
            return
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=wait)
        except (Exception, CheckpointException) as error:
            root, iteration = self._in_flight[0]
            raise _save_error(error, root, _staging_dir(root, iteration), iteration) from error
        del self._in_flight[:len(done)]


def _publish(staging: Path, final: Path) -> None:
    """Rename the complete ``staging`` to ``final``; an existing ``final`` is moved aside first and
    deleted last, so a kill in between leaves a complete copy under some name (``.tmp``/``.replaced``
    folders are never loaded)."""
    replaced = final.with_name(final.name + ".replaced")
    if final.exists():
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(staging, final)
    if replaced.exists():
        shutil.rmtree(replaced)


def _save_error(error: Exception, root: Path, staging: Path, iteration: int) -> Exception:
    """The failed save's error for the user: a full disk named as such, the previous checkpoint's state."""
    previous = latest_iteration(root)
    kept = (
        f"`latest` still points at the complete {iteration_dir(root, previous).name}"
        if previous is not None else "no earlier checkpoint exists"
    )
    free = shutil.disk_usage(root).free
    if _is_disk_full(error) or free < 1 << 20:
        shutil.rmtree(staging, ignore_errors=True)  # the partial save is never loaded; give its space back
        return InputError(
            f"no space left on the device of {root} while saving iteration {iteration} ({free >> 20} MiB "
            f"free); {kept}. Free some space (or set checkpoint.dir to a larger disk) and start again to resume"
        )
    return InputError(f"saving iteration {iteration} into {staging} failed ({error}); {kept}")


def _is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _point_latest_at(root: Path, iteration: int) -> None:
    """Publish ``iteration`` as the one to resume from (atomically: a reader sees the old or the new number)."""
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(f"{iteration}\n")
    os.replace(pointer, root / LATEST)


def newest_loadable(root: Path, warn) -> tuple[Path, dict]:
    """The checkpoint to resume ``root`` from, with its :func:`common_state`: ``latest``, or when that
    one is damaged (a shard cut short or deleted, a file that is not plain data) the newest earlier
    complete one, after ``warn(message)`` names what is wrong. Nothing is deleted; the next saves
    replace the damaged one.
    """
    latest = latest_iteration(root)
    problems = []
    for iteration in [latest, *(i for i in saved_iterations(root) if i < latest)]:
        path = iteration_dir(root, iteration)
        try:
            if not path.is_dir():
                raise InputError(f"{path} does not exist")
            common = common_state(path)
        except InputError as problem:
            problems.append(str(problem))
            continue
        if problems:
            warn(f"{'; '.join(problems)}. Resuming from {path} instead")
        return path, common
    raise InputError(f"no complete checkpoint to resume from in {root}: {'; '.join(problems)}")


def resolve(path: Path) -> Path:
    """A checkpoint folder from either a checkpoint root (with ``latest``) or an ``iter_N`` folder."""
    if not path.exists():
        raise ConfigError(f"checkpoint path {path} does not exist")
    if (path / "metadata.json").is_file():
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        raise ConfigError(
            f"{path} is neither a checkpoint (no metadata.json) nor a checkpoint root "
            f"(no '{LATEST}' file)"
        )
    return iteration_dir(path, iteration)


SHAPE_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "vocab_size", "make_vocab_size_divisible_by", "tie_embeddings",
)


def check_model_shape(saved: dict, run: RunConfig, path: Path) -> None:
    """Refuse a checkpoint whose weights have another shape than ``run.model``, naming the keys."""
    wanted = to_dict(run.model)
    different = [f"model.{k}={saved.get(k)!r} (run: {wanted[k]!r})" for k in SHAPE_KEYS if saved.get(k) != wanted[k]]
    if different:
        raise ConfigError(
            f"checkpoint {path} holds another model shape: {', '.join(different)}; "
            "use the preset the checkpoint was made with or override these keys"
        )


# same weights, another function: a model started from them computes differently than the run that trained them
FUNCTION_KEYS = ("rotary_base", "rope_scaling_factor", "norm_epsilon")


def function_changes(saved: dict, run: RunConfig, path: Path) -> list[str]:
    """Warnings for a weights-only start whose ``run.model`` uses the weights of ``path`` (model config
    ``saved``) with another RoPE or RMSNorm setting: what a context extension means to do, and a silent
    loss of quality when a preset's default was left in by mistake."""
    wanted = to_dict(run.model)
    return [
        f"{path} was trained with model.{key}={saved[key]!r}; this run uses model.{key}={wanted[key]!r}, so its "
        "weights meet another position encoding or normalization. Intended for a context extension; "
        f"otherwise set model.{key}={saved[key]!r}"
        for key in FUNCTION_KEYS
        if key in saved and saved[key] != wanted[key]
    ]


def common_state(path: Path) -> dict:
    """The plain (not sharded) state of checkpoint ``path``: its config, schedules, iteration; read
    only after :func:`verify_checkpoint` has found the folder complete and free of code."""
    verify_checkpoint(path)
    return dist_checkpointing.load_common_state_dict(str(path))


def load(path: Path, model_chunks, optimizer, run: RunConfig, common: dict | None = None) -> dict:
    """Load ``path`` into the model (and the optimizer unless None); return its plain state.

    ``common`` is its :func:`common_state` when the caller has read it already. Any TP/PP layout can
    load any checkpoint; RNG states are per rank, so they are restored only when the layout is unchanged.
    """
    if not (path / "metadata.json").is_file():
        raise ConfigError(f"{path} is not a complete checkpoint (no metadata.json)")
    common = common or common_state(path)
    check_model_shape(common["config"]["model"], run, path)
    state = _sharded_state(model_chunks, optimizer, is_loading=True)
    same_layout = common.get("layout") == _layout()
    if same_layout:
        state["rng_state"] = _rng_state()
    loaded = dist_checkpointing.load(state, str(path))
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        chunk.load_state_dict(loaded.pop(key))
    if optimizer is not None:
        saved = loaded.pop("optimizer")
        with torch.no_grad():  # megatron-core copies into the leaf main parameters
            optimizer.load_state_dict(saved)
        _restore_adam_steps(optimizer, saved)
    if same_layout:
        _set_rng_state(loaded.pop("rng_state"))
    return loaded
