"""The typed configuration: presets load, mistakes are named with their fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_patches.config import ConfigError, FinetuneConfig, load_config, to_dict

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
    ],
)
def test_mistakes_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])


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
