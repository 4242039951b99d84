"""Experiment trackers: TensorBoard and Weights & Biases, one class each behind the same three calls.

Both entry points start them from the ``logging`` section with the resolved config stored in the
run: pretrain_epas.py logs through :class:`megatron_training.metrics.MetricsLogger`, which hands every
scalar and text to each tracker alike; finetune_epas.py gives the started TensorBoard writer and W&B run
to the Trainer's own TensorBoard and W&B callbacks. TensorBoard and W&B are imported only when used.
"""

from __future__ import annotations

import html
import importlib
from pathlib import Path

import yaml

from epas.config import LoggingConfig
from epas.errors import ConfigError

CONFIG_TAG = "run/config"  # the TensorBoard text that holds the resolved config


def check_installed(settings: LoggingConfig) -> None:
    """Refuse a W&B project without the wandb package at start-up, before anything is built."""
    if settings.wandb_project is None:
        return
    try:
        importlib.import_module("wandb")
    except ImportError:
        raise ConfigError(f"logging.wandb_project={settings.wandb_project} is set but wandb is not installed: "
                          "pip install 'epas[wandb]' or wandb") from None


class TensorBoardTracker:
    """Event files in ``directory``; the config is a YAML text at step 0."""

    def __init__(self, directory: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(directory)
        self.writer.add_text(CONFIG_TAG, f"```yaml\n{yaml.safe_dump(config, sort_keys=False)}```", 0)

    def scalars(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (online, or offline with ``WANDB_MODE=offline`` and ``wandb sync`` later) holding the config.

    W&B has no plain text series; a text is an HTML panel at its step.
    """

    def __init__(self, settings: LoggingConfig, config: dict):
        import wandb

        self.wandb = wandb
        if settings.wandb_dir:
            Path(settings.wandb_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity,
                              name=settings.wandb_run_name, tags=settings.wandb_tags, dir=settings.wandb_dir,
                              config=config)

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(dict(values), step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>", inject=False)}, step=step)

    def close(self) -> None:
        self.run.finish()


def start_trackers(settings: LoggingConfig, config: dict) -> list:
    """The trackers ``settings`` names (none, one or both), each holding ``config``."""
    trackers = []
    if settings.tensorboard_dir:
        trackers.append(TensorBoardTracker(settings.tensorboard_dir, config))
    if settings.wandb_project:
        trackers.append(WandbTracker(settings, config))
    return trackers
