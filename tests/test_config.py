"""The typed configuration: presets load, mistakes are named with their fix."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from epas.config import Bound, FinetuneConfig, RunConfig, config_reference, field_docs, load_config, to_dict
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


# ---- values are range-checked by the schema ------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        # each of these crashed, trained something meaningless, or gave wrong advice before reaching a check
        ("data.micro_batch_size=0", "data.micro_batch_size must be at least 1, got 0"),
        ("data.global_batch_size=0", "data.global_batch_size must be at least 1, got 0"),
        ("data.global_batch_size=-16", "data.global_batch_size must be at least 1, got -16"),
        ("training.log_interval=0", "training.log_interval must be at least 1, got 0"),
        ("training.eval_steps=0", "training.eval_steps must be at least 1, got 0"),
        ("training.eval_interval=-5", "training.eval_interval must be 0 or more, got -5"),
        ("checkpoint.save_interval=-1", "checkpoint.save_interval must be at least 1, got -1"),
        ("checkpoint.save_interval=0", "checkpoint.save_interval must be at least 1, got 0"),
        ("optimizer.lr=0", "optimizer.lr must be above 0, got 0.0"),
        ("optimizer.lr=-3e-4", "optimizer.lr must be above 0, got -0.0003"),
        ("optimizer.lr=.inf", "optimizer.lr must be a finite number, got inf"),
        ("optimizer.lr=1e999", "optimizer.lr must be a finite number, got inf"),
        ("optimizer.lr=.nan", "optimizer.lr must be a finite number, got nan"),
        ("optimizer.min_lr=-1e-5", "optimizer.min_lr must be 0 or more, got -1e-05"),
        ("optimizer.min_lr=1", "optimizer.min_lr=1.0 must not exceed optimizer.lr=0.0003"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be 0 or more, got -0.1"),
        ("optimizer.adam_beta1=1", "optimizer.adam_beta1 must be in [0, 1), got 1.0"),
        ("optimizer.adam_beta2=-0.5", "optimizer.adam_beta2 must be in [0, 1), got -0.5"),
        ("optimizer.adam_eps=0", "optimizer.adam_eps must be above 0, got 0.0"),
        ("optimizer.clip_grad=-1", "optimizer.clip_grad must be 0 or more, got -1.0"),
        ("training.train_steps=-5", "training.train_steps must be at least 1, got -5"),
        ("training.train_steps=0", "training.train_steps must be at least 1, got 0"),
        ("optimizer.warmup_steps=-1", "optimizer.warmup_steps must be 0 or more, got -1"),
        ("training.max_skipped_steps=0", "training.max_skipped_steps must be at least 1, got 0"),
        ("training.recompute_num_layers=0", "training.recompute_num_layers must be at least 1, got 0"),
        ("training.exit_interval=0", "training.exit_interval must be at least 1, got 0"),
        ("training.exit_duration_minutes=0", "training.exit_duration_minutes must be above 0, got 0.0"),
        ("training.peak_tflops=-989", "training.peak_tflops must be above 0, got -989.0"),
        ("model.num_layers=0", "model.num_layers must be at least 1, got 0"),
        ("model.hidden_size=-128", "model.hidden_size must be at least 1, got -128"),
        ("model.num_attention_heads=0", "model.num_attention_heads must be at least 1, got 0"),
        ("model.num_query_groups=0", "model.num_query_groups must be at least 1, got 0"),
        ("model.ffn_hidden_size=0", "model.ffn_hidden_size must be at least 1, got 0"),
        ("model.vocab_size=0", "model.vocab_size must be at least 1, got 0"),
        ("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by must be at least 1, got 0"),
        ("model.seq_length=0", "model.seq_length must be at least 1, got 0"),
        ("model.norm_epsilon=0", "model.norm_epsilon must be above 0, got 0.0"),
        ("model.rotary_base=-10000", "model.rotary_base must be above 0, got -10000.0"),
        ("model.init_method_std=0", "model.init_method_std must be above 0, got 0.0"),
        ("parallel.tensor_parallel=0", "parallel.tensor_parallel must be at least 1, got 0"),
        ("parallel.pipeline_parallel=-2", "parallel.pipeline_parallel must be at least 1, got -2"),
        ("parallel.virtual_pipeline=0", "parallel.virtual_pipeline must be at least 1, got 0"),
        ("parallel.first_stage_layers=-1", "parallel.first_stage_layers must be at least 1, got -1"),
        ("epas.growth=0", "epas.growth must be at least 1, got 0"),
        ("epas.num_blocks=0", "epas.num_blocks must be at least 1, got 0"),
        ("epas.start_step=-1", "epas.start_step must be 0 or more, got -1"),
        ("epas.num_sharing_layers=-2", "epas.num_sharing_layers must be 0 or more, got -2"),
        ("data.weights=[0.5, -0.5]", "data.weights[1] must be above 0, got -0.5"),
        ("data.weights=[.nan]", "data.weights[0] must be a finite number, got nan"),
        ("seed=-1", "seed must be in [0, 4294967295], got -1"),
    ],
)
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.micro_batch_size=0", "data.micro_batch_size must be at least 1, got 0"),
        ("data.seq_length=1", "data.seq_length must be at least 2, got 1"),
        ("training.log_interval=0", "training.log_interval must be at least 1, got 0"),
        ("training.eval_samples=0", "training.eval_samples must be at least 1, got 0"),
        ("training.save_total_limit=0", "training.save_total_limit must be at least 1, got 0"),
        ("training.save_interval=-1", "training.save_interval must be at least 1, got -1"),
        ("optimizer.lr=-.inf", "optimizer.lr must be a finite number, got -inf"),
    ],
)
def test_finetune_values_are_range_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override], schema=FinetuneConfig)


@pytest.mark.parametrize(
    "override",
    [
        "training.eval_interval=0",  # no validation
        "checkpoint.save_interval=null",  # save only at the end
        "optimizer.warmup_steps=0",
        "optimizer.min_lr=0",
        "optimizer.min_lr=3e-4",  # = lr: constant after the warm-up
        "optimizer.weight_decay=0",
        "optimizer.clip_grad=0",  # no clipping
        "optimizer.adam_beta1=0",
        "epas.start_step=0",
        "epas.num_sharing_layers=0",
        "training.train_steps=1",
        "seed=0",
    ],
)
def test_the_bounds_themselves_are_allowed(override):
    load_config(None, [override])


def test_range_checks_apply_to_the_final_values_only(tmp_path):
    """A preset's value may be out of range if an override replaces it (the check runs once, at the end)."""
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  log_interval: 0\n")
    assert load_config(path, ["training.log_interval=5"]).training.log_interval == 5
    with pytest.raises(ConfigError, match=re.escape("training.log_interval must be at least 1, got 0")):
        load_config(path)


def _numbers(schema, prefix=""):
    """Every int and float key of ``schema`` (nested sections included) with its type as declared."""
    for item in dataclasses.fields(schema):
        hint = typing.get_type_hints(schema, include_extras=True)[item.name]
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(hint):
            yield from _numbers(hint, f"{key}.")
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for option in options:
            if typing.get_origin(option) is list:
                option = typing.get_args(option)[0]
            base = typing.get_args(option)[0] if typing.get_origin(option) is typing.Annotated else option
            if base in (int, float):
                yield key, option, base


@pytest.mark.parametrize("schema", [RunConfig, FinetuneConfig], ids=lambda s: s.__name__)
def test_every_number_has_a_declared_bound(schema):
    """A new numeric key must say its range (epas.sharing_layers is checked against the model's layers)."""
    unbounded = [key for key, option, _ in _numbers(schema)
                 if not any(isinstance(mark, Bound) for mark in getattr(option, "__metadata__", ()))]
    assert unbounded == ["epas.sharing_layers"]


@pytest.mark.parametrize("schema", [RunConfig, FinetuneConfig], ids=lambda s: s.__name__)
def test_every_float_refuses_nan_and_infinity(schema):
    floats = [key for key, _, base in _numbers(schema) if base is float]
    assert "optimizer.adam_eps" in floats and "data.weights" in floats
    for key in floats:
        value = "[.nan]" if key == "data.weights" else ".nan"
        with pytest.raises(ConfigError, match=re.escape(f"{key}") + r".* must be a finite number, got nan"):
            load_config(None, [f"{key}={value}"], schema=schema)
        with pytest.raises(ConfigError, match="must be a finite number, got -inf"):
            load_config(None, [f"{key}={value.replace('.nan', '-.inf')}"], schema=schema)


def test_the_key_reference_shows_the_bounds():
    reference = config_reference()
    assert "| `data.micro_batch_size` | int ≥ 1 | `4` |" in reference
    assert "| `optimizer.adam_beta2` | float in [0, 1) | `0.95` |" in reference
    assert "| `checkpoint.save_interval` | int ≥ 1 \\| null | `null` |" in reference
    assert "| `training.eval_interval` | int ≥ 0 | `100` |" in reference


# ---- broken, empty and hostile preset files ------------------------------------------------------


def _preset(tmp_path, text: str | bytes, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  num_layers: 4\n   hidden_size: 64\n", r"config file '.*run\.yaml' is not valid YAML at line 3, column"),
        ("model: [1, 2\n", r"config file '.*run\.yaml' is not valid YAML at line 2, column 1"),
        ("base: 5\nmodel:\n  num_layers: 2\n", r"run\.yaml': base must be a preset file name such as tiny_cpu\.yaml, got 5"),
        ("base: [a.yaml]\n", r"base must be a preset file name such as tiny_cpu\.yaml, got \['a\.yaml'\]"),
        ("seed: !!python/object/apply:os.getpid []\n",
         r"run\.yaml' uses the YAML tag '!!python/object/apply:os\.getpid' at line 1, column 7; tags are not allowed"),
        ("seed: !!int five\n", r"run\.yaml' is not valid YAML: invalid literal for int\(\)"),
        ("- model\n- data\n", r"run\.yaml' must hold a mapping of sections"),
        ("5: 3\n", r"unknown config key '5'; valid keys: model, parallel"),
    ],
)
def test_broken_yaml_is_named_with_its_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_preset(tmp_path, text))


def test_python_tags_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = _preset(tmp_path, f"seed: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ConfigError, match="tags are not allowed"):
        load_config(path)
    with pytest.raises(ConfigError, match="tags are not allowed"):
        load_config(None, [f"data.paths=!!python/object/apply:os.mkdir ['{marker}']"])
    assert not marker.exists()


def test_an_override_cannot_replace_a_whole_section():
    with pytest.raises(ConfigError, match=r"override 'model=null' would replace the whole 'model' section; set its "
                                          r"keys one by one, e.g\. model\.num_layers=\.\.\."):
        load_config(None, ["model=null"])
    with pytest.raises(ConfigError, match="would replace the whole 'training' section"):
        load_config(None, ["training={train_steps: 5}"])


def test_a_broken_override_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'data\.paths=\[a, b' is not valid YAML at line 1"):
        load_config(None, ["data.paths=[a, b"])


def test_a_preset_that_is_not_utf8_is_named(tmp_path):
    path = _preset(tmp_path, "# caf\xe9 preset\nseed: 3\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"run\.yaml' is not UTF-8 text \(byte 0xe9 at offset 5\)"):
        load_config(path)


def test_a_base_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "presets").mkdir()
    path = _preset(tmp_path, "base: presets\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"config file '.*presets' is a directory; give a YAML file"):
        load_config(path)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["", "\n", "# nothing here yet\n", "{}\n", "base:\n"])
def test_an_empty_preset_is_refused_not_trained_with_the_defaults(tmp_path, text):
    path = _preset(tmp_path, text)
    with pytest.raises(ConfigError, match=r"config file '.*run\.yaml' is empty"):
        load_config(path)
    child = _preset(tmp_path, "base: run.yaml\nseed: 3\n", "child.yaml")
    with pytest.raises(ConfigError, match=r"config file '.*run\.yaml' is empty"):
        load_config(child)


def test_a_preset_of_only_a_base_is_a_copy(tmp_path):
    path = _preset(tmp_path, f"base: {CONFIGS[0]}\n")
    assert to_dict(load_config(path)) == to_dict(load_config(CONFIGS[0]))


def test_an_empty_section_in_a_child_preset_changes_nothing(tmp_path):
    """`model:` with no keys (e.g. every line commented out) keeps the base's model, not the defaults."""
    tiny = Path(__file__).parent.parent / "configs" / "tiny_cpu.yaml"
    path = _preset(tmp_path, f"base: {tiny}\nmodel:\n  # num_layers: 12\ntraining:\n  train_steps: 7\n")
    run, base = load_config(path), load_config(tiny)
    assert run.model == base.model and run.model.num_layers == 6 and run.model.vocab_size == 512
    assert run.training.train_steps == 7


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("seed: !!python/object/apply:os.getpid []\n", [], "uses the YAML tag '!!python/object/apply:os.getpid'"),
        ("", [], "is empty"),
        ("seed: 3\n", ["data.micro_batch_size=0"], "data.micro_batch_size must be at least 1, got 0"),
    ],
)
def test_the_entry_points_report_one_line_and_exit_2(tmp_path, capsys, text, overrides, message):
    """What pretrain_epas.py and finetune_epas.py do with these (through epas.cli.run): no traceback."""
    from epas import cli

    status = cli.run(lambda: load_config(_preset(tmp_path, text), overrides))
    stderr = capsys.readouterr().err
    assert status == 2 and stderr.startswith("config error: ") and message in stderr
    assert stderr.count("\n") == 1


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    preset = tmp_path / "twice.yaml"
    preset.write_text("training:\n  train_steps: 10\nmodel:\n  num_layers: 2\ntraining:\n  log_interval: 1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml' is not valid YAML at line 5, column 1: key 'training' is given twice"):
        load_config(preset)
