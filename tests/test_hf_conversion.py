"""Checkpoint conversion both ways: logits equal transformers' LLaMA and the exported EPAS model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_training import checkpointing, distributed
from epas.config import RunConfig, from_dict, load_config
from epas.errors import ConfigError
from megatron_patches.model import build_model, transformer_config
from megatron_training.trainer import Trainer
from tests.model_utils import relative_error
from tests.multiprocess import run_workers, train_worker
from megatron_training import convert as convert_checkpoint

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-quick leaves them out

VOCAB, SEQ = 200, 12  # 200 is padded to 256 rows inside megatron-core
TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml")


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _write_tokenizer(folder: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size - 1)} | {"</s>": size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>").save_pretrained(str(folder))


def _hf_llama(folder: Path, groups: int, tied: bool, tokenizer_size: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=groups, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm weight shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder))
    _write_tokenizer(folder, tokenizer_size)
    return model


def _convert_worker(rank, argv):
    return convert_checkpoint.main(argv)


def _logits_worker(rank, checkpoint, tp, pp, sharing):
    """Logits of a checkpoint at a TP×PP layout, gathered on the last pipeline stage."""
    path = checkpointing.resolve(Path(checkpoint))
    run = from_dict(RunConfig, dist_checkpointing.load_common_state_dict(str(path))["config"])
    run.device, run.spec = "cpu", "local"
    run.parallel.tensor_parallel, run.parallel.pipeline_parallel = tp, pp
    run.parallel.virtual_pipeline = None
    distributed.initialize(run)
    model = build_model(
        run, transformer_config(run),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    checkpointing.load(path, [model], None, run)
    model.set_sharing_layers(sharing)
    model.eval()
    tokens = _tokens()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, torch.arange(SEQ).expand_as(batch), None)

        def collect(logits):
            full = gather_from_tensor_model_parallel_region(logits)
            return full.sum() * 0, {"logits": full[..., :VOCAB].clone()}  # [batch, seq, vocab]

        return output, collect

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=model,
            num_microbatches=1, seq_length=model.p2p_seq_length(SEQ), micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    distributed.shutdown()
    return outputs[0]["logits"] if last else None


def _layout_logits(checkpoint, tp=1, pp=1, sharing=()):
    results = run_workers(_logits_worker, tp * pp, str(checkpoint), tp, pp, tuple(sharing))
    (logits,) = [r for r in results if r is not None]
    return logits


@pytest.mark.parametrize("groups, tied", [(4, False), (2, True)], ids=["mha-untied", "gqa-tied"])
def test_hf_to_megatron_equals_transformers_at_tp1_and_tp2_pp2(tmp_path, groups, tied):
    hf_model = _hf_llama(tmp_path / "hf", groups, tied)
    with torch.no_grad():
        expected = hf_model(_tokens()).logits
    assert run_workers(_convert_worker, 1, ["hf-to-megatron", "--input", str(tmp_path / "hf"),
                                            "--output", str(tmp_path / "ckpt")]) == [0]
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    assert relative_error(_layout_logits(tmp_path / "ckpt"), expected) < 1e-5
    assert relative_error(_layout_logits(tmp_path / "ckpt", tp=2, pp=2), expected) < 1e-5


@pytest.mark.parametrize("mode", ["qk", "kv"])
def test_megatron_to_hf_with_sharing_from_tp2_pp2_training(tmp_path, mode):
    from transformers import AutoModelForCausalLM

    _write_tokenizer(tmp_path / "tok", VOCAB)
    run = load_config(TINY, [
        "data.mock=true", "data.micro_batch_size=2", "data.global_batch_size=4",
        f"data.tokenizer={tmp_path / 'tok'}", f"model.vocab_size={VOCAB}", f"model.seq_length={SEQ}",
        "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", f"epas.mode={mode}",
        "epas.interval=1", "training.train_steps=3", "optimizer.warmup_steps=1",
        "training.eval_interval=0", f"checkpoint.dir={tmp_path / 'ckpt'}",
    ])
    run_workers(train_worker, 4, run)  # after 3 steps layers 3, 4, 5 share: 3|4 is a stage boundary
    assert run_workers(_convert_worker, 1, ["megatron-to-hf", "--input", str(tmp_path / "ckpt"),
                                            "--output", str(tmp_path / "hf"), "--dtype", "float32"]) == [0]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["sharing_layers"] == [3, 4, 5] and config["sharing_mode"] == mode
    assert "auto_map" in config and (tmp_path / "hf" / "tokenizer.json").is_file()

    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    with torch.no_grad():
        exported = hf_model(_tokens()).logits
    expected = _layout_logits(tmp_path / "ckpt", sharing=(3, 4, 5))
    assert relative_error(exported, expected) < 1e-5
    without_sharing = _layout_logits(tmp_path / "ckpt")
    assert relative_error(without_sharing, expected) > 1e-3  # the comparison sees sharing


def _error(argv) -> str:
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert convert_checkpoint.main(argv) == 2
    return stderr.getvalue()


def test_conversion_errors(tmp_path):
    source = tmp_path / "hf"
    _hf_llama(source, 4, False)
    convert = ["hf-to-megatron", "--input", str(source), "--output", str(tmp_path / "out")]

    assert "config.json not found" in _error(["hf-to-megatron", "--input", str(tmp_path), "--output", str(tmp_path / "o")])

    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"architectures": ["MistralForCausalLM"]}))
    assert "unsupported architecture MistralForCausalLM" in _error(convert)
    (source / "config.json").write_text(json.dumps(config | {"vocab_size": VOCAB + 8}))
    assert f"has {VOCAB} rows but config.json's vocab_size is {VOCAB + 8}" in _error(convert)
    (source / "config.json").write_text(json.dumps(config))

    _write_tokenizer(source, VOCAB + 50)
    assert f"has {VOCAB + 50} tokens but the model's vocabulary has {VOCAB} rows" in _error(convert)

    (source / "model.safetensors").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / name).unlink(missing_ok=True)
    assert "no weights in" in _error(convert)


def _load_into_other_shape_worker(rank, checkpoint):
    run = load_config(TINY, ["model.hidden_size=96", "model.num_attention_heads=4"])
    distributed.initialize(run)
    model = build_model(run)
    try:
        checkpointing.load(checkpointing.resolve(Path(checkpoint)), [model], None, run)
    except ConfigError as error:
        return str(error)
    finally:
        distributed.shutdown()


def _export_layer_zero_worker(rank, checkpoint, output):
    return convert_checkpoint.main(["megatron-to-hf", "--input", checkpoint, "--output", output, "--sharing-layers", "0,3"])


def test_checkpoint_shape_and_sharing_set_errors(tmp_path):
    _hf_llama(tmp_path / "hf", 4, False)
    run_workers(_convert_worker, 1, ["hf-to-megatron", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt")])
    (message,) = run_workers(_load_into_other_shape_worker, 1, str(tmp_path / "ckpt"))
    assert "holds another model shape" in message and "model.hidden_size=64 (run: 96)" in message
    assert run_workers(_export_layer_zero_worker, 1, str(tmp_path / "ckpt"), str(tmp_path / "out")) == [2]


def _continue_worker(rank, run):
    distributed.initialize(run)
    try:
        return Trainer(run).train()
    except ConfigError as error:
        return str(error)
    finally:
        distributed.shutdown()


def test_training_continues_from_a_converted_checkpoint(tmp_path):
    _hf_llama(tmp_path / "hf", 2, False)
    run_workers(_convert_worker, 1, ["hf-to-megatron", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt")])
    shape = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
             "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=128",
             "model.norm_epsilon=1.0e-5", "epas.num_sharing_layers=2", "model.seq_length=16"]
    common = ["data.mock=true", "data.micro_batch_size=2", "data.global_batch_size=2", "training.train_steps=2",
              "optimizer.warmup_steps=1", "training.eval_interval=0", f"checkpoint.load={tmp_path / 'ckpt'}"]
    refused = load_config(TINY, shape + common + [f"checkpoint.dir={tmp_path / 'a'}"])
    assert "holds weights only" in run_workers(_continue_worker, 1, refused)[0]
    run = load_config(TINY, shape + common + [f"checkpoint.dir={tmp_path / 'b'}", "checkpoint.load_optimizer=false"])
    assert run_workers(_continue_worker, 1, run) == [2]
    assert checkpointing.latest_iteration(tmp_path / "b") == 2
