"""Read back what W&B wrote in offline mode (``run-<id>.wandb``), to compare it with TensorBoard.

wandb 0.31 ships no reader of its own for this file. It is a LevelDB-style log: a 7-byte header
(``:W&B``, magic, version), then 32 KiB blocks of chunks (CRC, length, type: full/first/middle/last),
each record a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import html
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7
FULL, LAST = 1, 4


@dataclass
class OfflineRun:
    folder: Path
    project: str = ""
    name: str = ""
    tags: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one dict per logged step

    def series(self, step_key: str = "_step") -> dict[str, dict[int, float]]:
        """Every numeric history key as {tag: {step: value}}, the step taken from ``step_key``."""
        series = {}
        for row in self.history:
            for key, value in row.items():
                if not key.startswith("_") and key != step_key and isinstance(value, (int, float)):
                    series.setdefault(key, {})[int(row[step_key])] = value
        return series

    def texts(self) -> dict[str, dict[int, str]]:
        """The HTML panels W&B holds the texts in, as {tag: {step: text}}."""
        texts = {}
        for row in self.history:
            for key, value in row.items():
                if isinstance(value, dict) and value.get("_type") == "html-file":
                    page = (self.folder / "files" / value["path"]).read_text()
                    text = html.unescape(page.removeprefix("<pre>").removesuffix("</pre>"))
                    texts.setdefault(key, {})[row["_step"]] = text
        return texts


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, payload = HEADER, b""
    while position + CHUNK_HEADER <= len(data):
        if BLOCK - position % BLOCK < CHUNK_HEADER:  # the rest of a block is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        position += CHUNK_HEADER
        payload += data[position:position + length]
        position += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def _nest(row: dict, keys, value) -> None:
    for key in keys[:-1]:
        row = row.setdefault(key, {})
    row[keys[-1]] = value


def read_offline_run(wandb_dir: Path) -> OfflineRun:
    """The one offline run under ``wandb_dir`` (as ``logging.wandb_dir`` or ``WANDB_DIR`` named it)."""
    folders = sorted(Path(wandb_dir).glob("wandb/offline-run-*"))
    assert len(folders) == 1, folders
    run = OfflineRun(folders[0])
    for record in _records(next(folders[0].glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.project, run.name, run.tags = record.run.project, record.run.display_name, list(record.run.tags)
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row = {}
            for item in record.history.item:
                _nest(row, list(item.nested_key) or [item.key], json.loads(item.value_json))
            run.history.append(row)
            continue
        else:
            continue
        for item in updates:
            _nest(run.config, list(item.nested_key) or [item.key], json.loads(item.value_json))
    return run


def tensorboard_series(directory: Path, exclude=()) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar as {tag: {step: value}}."""
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)}
            for tag in events.Tags()["scalars"] if tag not in exclude}


def tensorboard_texts(directory: Path) -> dict[str, dict[int, str]]:
    """Every TensorBoard text as {tag: {step: text}}."""
    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    return {tag.removesuffix("/text_summary"): {event.step: tensor_util.make_ndarray(event.tensor_proto).item().decode()
                                                for event in events.Tensors(tag)}
            for tag in events.Tags()["tensors"] if tag.endswith("/text_summary")}


def as_float32(series: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """TensorBoard stores scalars in float32; W&B keeps the float64 that was logged."""
    return {tag: {step: float(np.float32(value)) for step, value in values.items()} for tag, values in series.items()}
