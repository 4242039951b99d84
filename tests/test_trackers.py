"""A W&B project without the wandb package is refused by both entry points before anything is built, with the
command that installs it (the trackers themselves are compared with TensorBoard by the training runs of
tests/test_training.py and tests/test_finetune.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from epas.config import FinetuneConfig, LoggingConfig, load_config
from epas.errors import ConfigError

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml")
MESSAGE = r"logging.wandb_project=epas is set but wandb is not installed: pip install 'epas\[wandb\]' or wandb"


@pytest.fixture
def without_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError


def test_pretraining_refuses_a_wandb_project_without_wandb(without_wandb):
    from megatron_training.validation import validate_run

    run = load_config(TINY, ["data.mock=true"])
    validate_run(run, 1)  # the same run without a project is fine
    run.logging.wandb_project = "epas"
    with pytest.raises(ConfigError, match=MESSAGE):
        validate_run(run, 1)


def test_finetuning_refuses_a_wandb_project_without_wandb(without_wandb):
    from hf_training.finetune import validate_finetune

    with pytest.raises(ConfigError, match=MESSAGE):
        validate_finetune(FinetuneConfig(logging=LoggingConfig(wandb_project="epas")), 1)
