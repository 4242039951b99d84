"""verify_checkpoint: a checkpoint someone handed over runs no code when loaded, and an incomplete one is named.

Each crafted file is first shown to run its code through megatron-core's own reader (the defect), then refused
by verify_checkpoint before anything runs; real checkpoints, with and without optimizer state, pass.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from epas.errors import InputError
from megatron_patches.model import build_model
from megatron_training import checkpointing
from megatron_training import convert as convert_checkpoint
from megatron_training.builders import build_chunks, build_lr_scheduler, build_optimizer, training_transformer_config
from megatron_training.checkpoint_files import verify_checkpoint
from tests.model_utils import lm_loss, tiny_run
from tests.multiprocess import run_workers

pytestmark = pytest.mark.usefixtures("megatron_cpu", "one_thread")


class Payload:
    """Unpickles into a call of ``function``: here, one that creates the marker file."""

    def __init__(self, function, marker: Path):
        self.function, self.marker = function, marker

    def __reduce__(self):
        if self.function == "exec":
            return exec, (f"open({str(self.marker)!r}, 'w').close()",)
        return os.system, (f"touch '{self.marker}'",)


def _trained(distributed_optimizer: bool):
    """A 2-layer model after one optimizer step (so Adam's state exists), its optimizer and LR schedule."""
    run = tiny_run(num_layers=2)
    run.optimizer.use_distributed_optimizer = distributed_optimizer
    config = training_transformer_config(run)
    chunks = build_chunks(run, config)
    optimizer = build_optimizer(run, config, chunks)
    scheduler = build_lr_scheduler(run, optimizer)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    lm_loss(chunks[0], tokens, tokens).backward()
    chunks[0].finish_grad_sync()
    optimizer.step()
    scheduler.step(increment=1)
    return run, unwrap_model(chunks), optimizer, scheduler


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A checkpoint as the trainer saves it: model, optimizer, RNG and schedule."""
    run, models, optimizer, scheduler = _trained(distributed_optimizer=False)
    extra = {"lr_scheduler": scheduler.state_dict(), "consumed_samples": 2}
    return checkpointing.save(tmp_path_factory.mktemp("saved"), 1, models, optimizer, extra, run)


@pytest.fixture
def checkpoint(saved, tmp_path) -> Path:
    """A copy of the saved checkpoint for one test to alter."""
    return Path(shutil.copytree(saved, tmp_path / saved.name))


def _metadata(path: Path):
    with (path / ".metadata").open("rb") as stream:
        return pickle.load(stream)  # our own, untampered file


def _write_metadata(path: Path, metadata) -> None:
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


def _byte_item(metadata, name: str):
    return next(index for index in metadata.storage_data if index.fqn.startswith(name))


def _read_byte_item(path: Path, name: str):
    metadata = _metadata(path)
    info = metadata.storage_data[_byte_item(metadata, name)]
    with (path / info.relative_path).open("rb") as stream:
        stream.seek(info.offset)
        return torch.load(io.BytesIO(stream.read(info.length)), weights_only=True)


def _replace_byte_item(path: Path, name: str, value) -> None:
    """Append ``value`` (as torch.save writes it) to a shard and point the byte item ``name`` at it."""
    metadata = _metadata(path)
    index = _byte_item(metadata, name)
    shard = path / metadata.storage_data[index].relative_path
    buffer = io.BytesIO()
    torch.save(value, buffer)
    offset = shard.stat().st_size
    with shard.open("ab") as stream:
        stream.write(buffer.getvalue())
    metadata.storage_data[index] = _StorageInfo(shard.name, offset, len(buffer.getvalue()))
    _write_metadata(path, metadata)


def _load_with_megatron(path: Path) -> None:
    """What checkpointing.load asks megatron-core to read: the model's tensors and extra states, the RNG state."""
    run = tiny_run(num_layers=2)
    state = {"model": build_model(run).sharded_state_dict(), "rng_state": checkpointing._rng_state()}
    dist_checkpointing.load(state, str(path))


# ---- real checkpoints pass ----------------------------------------------------------------------


def test_a_saved_checkpoint_passes_and_holds_the_byte_items_checked(saved):
    metadata = _metadata(saved)
    byte_items = [i.fqn for i in metadata.storage_data
                  if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)]
    assert any(name.startswith("rng_state") for name in byte_items)
    assert any("_extra_state" in name for name in byte_items)
    assert "optimizer" in torch.load(saved / "common.pt", weights_only=True)
    verify_checkpoint(saved)


def test_distributed_optimizer_state_in_byte_items_passes(tmp_path):
    """megatron-core's dp_reshardable format keeps the distributed optimizer's param groups in byte items."""
    run, (model,), optimizer, _ = _trained(distributed_optimizer=True)
    state = {"model": model.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=False, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
    )
    dist_checkpointing.save(state, str(tmp_path))
    metadata = _metadata(tmp_path)
    assert any(index.fqn.startswith("optimizer.distributed") for index in metadata.storage_data)
    verify_checkpoint(tmp_path)


def test_a_weights_only_checkpoint_passes(tmp_path):
    run = tiny_run(num_layers=2)
    verify_checkpoint(checkpointing.save(tmp_path, 0, [build_model(run)], None, {"weights_only": True}, run))


# ---- crafted files: megatron-core runs them, verify_checkpoint refuses them first -----------------


@pytest.mark.parametrize("function, refused", [("exec", "builtins.exec"), ("system", f"{os.name}.system")])
def test_crafted_metadata_runs_in_megatron_and_is_refused(checkpoint, tmp_path, function, refused):
    """A real .metadata with a payload in one field: it still loads, and megatron-core runs the payload."""
    marker = tmp_path / "ran"
    metadata = _metadata(checkpoint)
    metadata.version = Payload(function, marker)
    _write_metadata(checkpoint, metadata)

    with pytest.raises(InputError, match=rf"^{re.escape(str(checkpoint / '.metadata'))} asks to load {refused}\b"):
        verify_checkpoint(checkpoint)
    assert not marker.exists()
    _load_with_megatron(checkpoint)
    assert marker.exists()


def test_crafted_byte_item_runs_in_megatron_and_is_refused(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    (rng_state,) = _read_byte_item(checkpoint, "rng_state")  # megatron stores a ShardedObject as a list of one
    _replace_byte_item(checkpoint, "rng_state", [{**rng_state, "note": Payload("exec", marker)}])

    with pytest.raises(InputError, match=r"__0_\d\.distcp asks to load builtins\.exec"):
        verify_checkpoint(checkpoint)
    assert not marker.exists()
    _load_with_megatron(checkpoint)
    assert marker.exists()


def test_crafted_common_pt_is_refused_even_where_megatron_would_run_it(checkpoint, tmp_path, monkeypatch):
    """megatron-core reads common.pt with torch.load's default: weights-only since torch 2.6, unless the
    documented TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD asks for full unpickling. verify_checkpoint asks for
    weights-only explicitly, which that variable cannot override."""
    marker = tmp_path / "ran"
    common = torch.load(checkpoint / "common.pt", weights_only=True)
    torch.save({**common, "consumed_samples": Payload("exec", marker)}, checkpoint / "common.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    with pytest.raises(InputError, match=rf"^{re.escape(str(checkpoint / 'common.pt'))} asks to load builtins\.exec"):
        verify_checkpoint(checkpoint)
    assert not marker.exists()
    TorchCommonLoadStrategy().load_common(str(checkpoint))
    assert marker.exists()


def test_a_non_empty_extra_state_is_refused(checkpoint, tmp_path):
    """Transformer Engine unpickles a non-empty extra-state byte tensor with plain pickle; torch's
    weights-only load sees only a tensor, so the check looks inside: this recipe saves none (no FP8)."""
    pickled = torch.frombuffer(bytearray(pickle.dumps(Payload("exec", tmp_path / "ran"))), dtype=torch.uint8)
    _replace_byte_item(checkpoint, "decoder.layers.mlp.linear_fc1._extra_state", [pickled])
    with pytest.raises(InputError, match=r"extra state 'decoder\.layers\.mlp\.linear_fc1\._extra_state.*is not empty"):
        verify_checkpoint(checkpoint)


def test_a_shard_path_outside_the_checkpoint_is_refused(checkpoint):
    metadata = _metadata(checkpoint)
    index = _byte_item(metadata, "rng_state")
    metadata.storage_data[index] = _StorageInfo("../elsewhere.distcp", 0, 10)
    _write_metadata(checkpoint, metadata)
    with pytest.raises(InputError, match="not a file slice inside the checkpoint"):
        verify_checkpoint(checkpoint)


def test_a_transformed_shard_entry_is_refused(checkpoint):
    """DCP undoes a stream transform (e.g. compression) named in the metadata; this recipe writes none."""
    metadata = _metadata(checkpoint)
    index = _byte_item(metadata, "rng_state")
    info = metadata.storage_data[index]
    metadata.storage_data[index] = _StorageInfo(info.relative_path, info.offset, info.length, ["zstd"])
    _write_metadata(checkpoint, metadata)
    with pytest.raises(InputError, match=r"'rng_state.*' is stored with transforms \['zstd'\]"):
        verify_checkpoint(checkpoint)


# ---- incomplete checkpoints: the missing or cut file is named -------------------------------------


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "a truncated shard": ("__0_1.distcp", _truncate, "is truncated"),
    "a deleted shard": ("__0_0.distcp", Path.unlink, "is missing"),
    "a truncated .metadata": (".metadata", _truncate, "is truncated or unreadable"),
    "a deleted .metadata": (".metadata", Path.unlink, "is missing"),
    "a truncated common.pt": ("common.pt", _truncate, "is truncated or unreadable"),
    "a deleted common.pt": ("common.pt", Path.unlink, "is missing"),
    "a deleted metadata.json": ("metadata.json", Path.unlink, "is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_incomplete_checkpoint_names_the_file(checkpoint, damage):
    name, harm, problem = DAMAGE[damage]
    harm(checkpoint / name)
    with pytest.raises(InputError, match=rf"^{re.escape(str(checkpoint / name))} {problem}"):
        verify_checkpoint(checkpoint)


# ---- the loaders call the check (megatron-core never opens a refused checkpoint) -----------------

def _with_payload(checkpoint: Path, marker: Path) -> None:
    metadata = _metadata(checkpoint)
    metadata.version = Payload("exec", marker)
    _write_metadata(checkpoint, metadata)


def test_checkpointing_load_refuses_a_crafted_checkpoint(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    _with_payload(checkpoint, marker)
    run = tiny_run(num_layers=2)
    with pytest.raises(InputError, match=r"\.metadata asks to load builtins\.exec"):
        checkpointing.load(checkpoint, [build_model(run)], None, run)
    assert not marker.exists()


def test_checkpointing_load_names_a_truncated_shard(checkpoint):
    _truncate(checkpoint / "__0_0.distcp")
    run = tiny_run(num_layers=2)
    with pytest.raises(InputError, match=rf"^{re.escape(str(checkpoint / '__0_0.distcp'))} is truncated"):
        checkpointing.load(checkpoint, [build_model(run)], None, run)


def _convert_worker(rank, argv):
    return convert_checkpoint.main(argv)


@pytest.mark.slow
def test_megatron_to_hf_refuses_a_crafted_checkpoint(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    _with_payload(checkpoint, marker)
    argv = ["megatron-to-hf", "--input", str(checkpoint), "--output", str(tmp_path / "hf")]
    assert run_workers(_convert_worker, 1, argv) == [2]
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_megatron_to_hf_checks_common_pt_before_reading_it(checkpoint, tmp_path, monkeypatch):
    """megatron-core would unpickle it fully here: the check must come before the first read."""
    marker = tmp_path / "ran"
    common = torch.load(checkpoint / "common.pt", weights_only=True)
    torch.save({**common, "consumed_samples": Payload("exec", marker)}, checkpoint / "common.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # inherited by the worker
    argv = ["megatron-to-hf", "--input", str(checkpoint), "--output", str(tmp_path / "hf")]
    assert run_workers(_convert_worker, 1, argv) == [2]
    assert not marker.exists()
