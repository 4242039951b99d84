"""The typed configuration: presets load, mistakes are named with their fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from epas.config import FinetuneConfig, config_reference, field_docs, load_config, to_dict
from epas.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
FINETUNE_CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs", "finetune").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    run = load_config(path)
    assert run.model.num_layers > 0
    assert to_dict(run)["model"]["hidden_size"] == run.model.hidden_size


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.name)
def test_every_finetune_preset_loads(path):
    config = load_config(path, schema=FinetuneConfig)
    assert config.model and config.data.paths and config.training.output_dir


def test_overrides_are_typed():
    run = load_config(None, ["model.num_layers=8", "epas.sharing_layers=[5, 6, 7]", "epas.mode=kv"])
    assert run.model.num_layers == 8
    assert run.epas.sharing_layers == [5, 6, 7]
    assert run.epas.mode == "kv"
    assert load_config(None, ["model.norm_epsilon=1"]).model.norm_epsilon == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_layer=4", "unknown config key 'model.num_layer'; did you mean 'num_layers'"),
        ("modle.num_layers=4", "unknown config section 'modle'; did you mean 'model'"),
        ("model.num_layers=four", "model.num_layers must be int, got 'four'"),
        ("model.num_layers=true", "model.num_layers must be int, got True"),
        ("epas.sharing_layers=3", "epas.sharing_layers must be a list"),
        ("model.num_layers", "must look like section.key=value"),
        ("model.num_attention_heads=3", "not divisible by model.num_attention_heads=3"),
        # choices are checked by type (Literal), each section by its own validate()
        ("epas.mode=qv", "epas.mode must be one of ('qk', 'kv'), got 'qv'"),
        ("optimizer.decay_style=cosin", "optimizer.decay_style must be one of ('constant', 'linear', 'cosine'"),
        ("training.recompute=partial", "training.recompute must be one of ('selective', 'full'), got 'partial'"),
        ("spec=flash", "spec must be one of ('local', 'te'), got 'flash'"),
        ("epas.interval=0", "epas.interval must be at least 1, got 0"),
    ],
)
def test_mistakes_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_finetune_choices_are_checked():
    with pytest.raises(ConfigError, match=r"data\.format must be one of \('indexed', 'text', 'chat', 'instruction'\)"):
        load_config(None, ["data.format=csv"], schema=FinetuneConfig)


def test_the_key_reference_is_generated_from_the_schema():
    """docs/CONFIG.md is the schema's own description: regenerate it with `python -m epas.config`."""
    path = Path(__file__).parent.parent / "docs" / "CONFIG.md"
    assert path.read_text() == config_reference(), "docs/CONFIG.md is stale: python -m epas.config > docs/CONFIG.md"
    assert "| `epas.mode` | 'qk' \\| 'kv' | `qk` |" in path.read_text()


def test_field_docs_come_from_the_comments():
    from epas.config import ParallelConfig, TrainingConfig

    docs = field_docs(ParallelConfig)
    assert docs["first_stage_layers"].startswith("uneven pipelines: layers on the first / last stage")
    assert docs["last_stage_layers"] == "layers on the last stage (uneven pipelines)"
    assert field_docs(TrainingConfig)["recompute"] == 'null, "selective" (core attention) or "full"'


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epas:\n  intervall: 5\n")
    with pytest.raises(ConfigError, match="'epas.intervall'; did you mean 'interval'"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist; presets live in configs/"):
        load_config("configs/nope.yaml")


def test_exponent_floats_without_a_dot_are_floats():
    run = load_config(None, ["optimizer.lr=3e-4", "optimizer.min_lr=1E-5"])
    assert run.optimizer.lr == 3e-4 and run.optimizer.min_lr == 1e-5
    with pytest.raises(ConfigError, match="optimizer.lr must be float"):
        load_config(None, ["optimizer.lr=fast"])
