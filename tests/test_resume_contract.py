"""The resume contract: what a resumed run may change from its checkpoint's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from epas.config import load_config, to_dict
from epas.errors import ConfigError
from megatron_training.resume import check_resume

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml")
CKPT = Path("ckpt/iter_0000004")


def _saved(*overrides: str) -> dict:
    """The plain state of a checkpoint saved by the tiny preset (with ``overrides``)."""
    return {"iteration": 4, "config": to_dict(load_config(TINY, list(overrides)))}


@pytest.mark.parametrize(
    "override",
    ["model.rotary_base=500000.0", "model.norm_epsilon=1.0e-6", "model.seq_length=128", "epas.mode=kv",
     "epas.interval=7", "epas.num_sharing_layers=2"],
)
def test_model_and_epas_changes_are_refused_by_name(override):
    with pytest.raises(ConfigError) as error:
        check_resume(_saved(), load_config(TINY, [override]), CKPT)
    key, value = override.split("=")
    assert key in str(error.value) and "checkpoint.load_optimizer=false" in str(error.value)


@pytest.mark.parametrize(
    "override", ["optimizer.lr=1.0e-3", "optimizer.min_lr=0.0", "optimizer.warmup_steps=3",
                 "optimizer.decay_style=linear", "optimizer.adam_beta2=0.99"],
)
def test_optimizer_schedule_changes_need_the_override(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}.*override_on_resume=true"):
        check_resume(_saved(), load_config(TINY, [override]), CKPT)
    assert check_resume(_saved(), load_config(TINY, [override, "optimizer.override_on_resume=true"]), CKPT) == []


def test_the_gradient_buckets_of_a_distributed_optimizer_checkpoint_are_kept():
    """Its states are saved per bucket; a plain optimizer's are not, so there the overlap may change."""
    zero1 = "optimizer.use_distributed_optimizer=true"
    saved = _saved(zero1)
    with pytest.raises(ConfigError, match=r"parallel.overlap_grad_reduce=True \(checkpoint: False\).*per gradient"):
        check_resume(saved, load_config(TINY, [zero1, "parallel.overlap_grad_reduce=true"]), CKPT)
    overlapped = [zero1, "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
    assert check_resume(_saved(*overlapped[:2]), load_config(TINY, overlapped), CKPT) == []
    with pytest.raises(ConfigError, match=r"parallel.ddp_bucket_size=1000000 \(checkpoint: None\)"):
        check_resume(_saved(*overlapped[:2]), load_config(TINY, [*overlapped, "parallel.ddp_bucket_size=1000000"]), CKPT)
    assert check_resume(_saved(), load_config(TINY, ["parallel.overlap_grad_reduce=true"]), CKPT) == []


def test_data_changes_warn_and_free_settings_pass_silently():
    run = load_config(TINY, ["data.global_batch_size=32", "seed=7", "training.log_interval=3",
                             "parallel.tensor_parallel=2", "optimizer.clip_grad=0.5"])
    warnings = check_resume(_saved(), run, CKPT)
    assert len(warnings) == 2
    assert "data.global_batch_size=32 (checkpoint: 16)" in warnings[0] and "seed=7" in warnings[1]


def test_more_steps_warn_that_the_decay_keeps_its_plan_unless_overridden():
    (warning,) = check_resume(_saved(), load_config(TINY, ["training.train_steps=900"]), CKPT)
    assert "keeps decaying over the checkpoint's" in warning
    assert check_resume(_saved(), load_config(
        TINY, ["training.train_steps=900", "optimizer.override_on_resume=true"]), CKPT) == []


def test_keys_the_checkpoint_predates_are_not_compared():
    saved = _saved()
    del saved["config"]["model"]["init_method_std"], saved["config"]["optimizer"]["adam_eps"]
    assert check_resume(saved, load_config(TINY, ["model.init_method_std=0.01", "optimizer.adam_eps=1.0e-6"]),
                        CKPT) == []


def test_a_converted_checkpoint_is_not_resumed_but_started_from():
    with pytest.raises(ConfigError, match="holds weights only.*checkpoint.load_optimizer=false"):
        check_resume({**_saved(), "weights_only": True}, load_config(TINY), CKPT)
