"""Checkpoint conversion both ways: logits equal transformers' LLaMA and the exported EPAS model; the
export's token ids are the tokenizer's; a conversion never replaces a folder unasked, and one killed at
any step leaves nothing that loads as complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
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

# multi-process or end-to-end tests are marked slow: make test-quick leaves them out

VOCAB, SEQ = 200, 12  # 200 is padded to 256 rows inside megatron-core
# Llama 3.1/3.2's RoPE on the tiny models: theta 500000, llama3 scaling by 3.2's factor from 8192 positions
LLAMA3_ROPE = {"rope_theta": 500000.0, "max_position_embeddings": 16384, "rope_scaling": {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}}
LLAMA3_RUN = ["model.rotary_base=500000.0", "model.rope_scaling_factor=32", "model.max_position_embeddings=16384"]
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


def _hf_llama(folder: Path, groups: int, tied: bool, tokenizer_size: int = VOCAB, dtype=torch.float32):
    """A tiny Llama-3.2-shaped model (GQA, llama3 RoPE, tied or untied), saved as several safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=groups, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        initializer_range=0.2, **LLAMA3_ROPE,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm weight shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(str(folder), max_shard_size="150KB")
    _write_tokenizer(folder, tokenizer_size)
    return model


def _convert_worker(rank, argv):
    return convert_checkpoint.main(argv)


def _run_at_layout(checkpoint: Path, tp: int, pp: int) -> RunConfig:
    run = from_dict(RunConfig, dist_checkpointing.load_common_state_dict(str(checkpoint))["config"])
    run.device, run.spec = "cpu", "local"
    run.parallel.tensor_parallel, run.parallel.pipeline_parallel = tp, pp
    run.parallel.virtual_pipeline = None
    return run


def _logits_worker(rank, cases, tp, pp):
    """Logits of each (checkpoint, sharing layers) case at one TP×PP layout, gathered on the last pipeline stage;
    one process group serves every case (starting the processes is most of the time)."""
    paths = [checkpointing.resolve(Path(checkpoint)) for checkpoint, _ in cases]
    distributed.initialize(_run_at_layout(paths[0], tp, pp))
    tokens = _tokens()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, torch.arange(SEQ).expand_as(batch), None)

        def collect(logits):
            full = gather_from_tensor_model_parallel_region(logits)
            return full.sum() * 0, {"logits": full[..., :VOCAB].clone()}  # [batch, seq, vocab]

        return output, collect

    last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    every_logits = []
    for path, (_, sharing) in zip(paths, cases, strict=True):
        run = _run_at_layout(path, tp, pp)
        model = build_model(
            run, transformer_config(run),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        checkpointing.load(path, [model], None, run)
        model.set_sharing_layers(sharing)
        model.eval()
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([tokens]), model=model,
                num_microbatches=1, seq_length=model.p2p_seq_length(SEQ), micro_batch_size=tokens.shape[0],
                forward_only=True,
            )
        if last:
            every_logits.append(outputs[0]["logits"])
    distributed.shutdown()
    return every_logits if last else None


def _layout_logits(cases, tp=1, pp=1) -> list[torch.Tensor]:
    """The logits of each (checkpoint, sharing layers) in ``cases`` at TP=``tp`` × PP=``pp``, in one launch."""
    results = run_workers(_logits_worker, tp * pp, [(str(path), tuple(sharing)) for path, sharing in cases], tp, pp)
    (every_logits,) = [r for r in results if r is not None]
    return every_logits


def _convert_each_worker(rank, every_argv):
    """Several conversions in one process, one after the other (each starts and ends its own process group)."""
    return [convert_checkpoint.main(argv) for argv in every_argv]


@pytest.mark.slow
def test_hf_to_megatron_equals_transformers_at_tp1_and_tp2_pp2(tmp_path):
    """Llama 3.2 in miniature (GQA, untied and tied), from sharded safetensors: the converted model at TP=1 and
    TP=2×PP=2, and its export (sharded again), give transformers' logits. Both variants share each launch."""
    from transformers import AutoModelForCausalLM

    from megatron_training.hf_files import HfWeights

    variants = {"untied": False, "tied": True}
    expected = {}
    for name, tied in variants.items():
        hf_model = _hf_llama(tmp_path / name / "hf", 2, tied)
        assert (tmp_path / name / "hf" / "model.safetensors.index.json").is_file()
        with torch.no_grad():
            expected[name] = hf_model(_tokens()).logits
    assert run_workers(_convert_each_worker, 1, [
        ["hf-to-megatron", "--input", str(tmp_path / name / "hf"), "--output", str(tmp_path / name / "ckpt")]
        for name in variants]) == [[0, 0]]
    checkpoints = [(tmp_path / name / "ckpt", ()) for name in variants]
    for tp, pp in ((1, 1), (2, 2)):
        for name, logits in zip(variants, _layout_logits(checkpoints, tp, pp), strict=True):
            assert relative_error(logits, expected[name]) < 1e-5, (name, tp, pp)

    assert run_workers(_convert_each_worker, 1, [
        ["megatron-to-hf", "--input", str(tmp_path / name / "ckpt"), "--output", str(tmp_path / name / "export"),
         "--max-shard-size", "200KB"] for name in variants]) == [[0, 0]]
    for name in variants:
        assert (tmp_path / name / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
        export = tmp_path / name / "export"
        config = json.loads((export / "config.json").read_text())
        assert config["max_position_embeddings"] == 16384 and config["dtype"] == "float32"
        exported, original = HfWeights(export), HfWeights(tmp_path / name / "hf")
        assert len(set(exported.files.values())) > 1 and exported.keys() == original.keys()
        assert all(torch.equal(exported[key], original[key]) for key in original)
        export_model = AutoModelForCausalLM.from_pretrained(str(export), trust_remote_code=True).eval()
        with torch.no_grad():
            assert relative_error(export_model(_tokens()).logits, expected[name]) < 1e-5, name


@pytest.mark.slow
def test_megatron_to_hf_with_sharing_from_tp2_pp2_training(tmp_path):
    """kv, not the default mode: the export must carry the mode it was trained with (the HF model's equality with
    the reference in both modes is test_hf_model.py's)."""
    from transformers import AutoModelForCausalLM

    mode = "kv"

    _write_tokenizer(tmp_path / "tok", VOCAB)
    run = load_config(TINY, [
        "data.mock=true", "data.micro_batch_size=2", "data.global_batch_size=4",
        f"data.tokenizer={tmp_path / 'tok'}", f"model.vocab_size={VOCAB}", f"model.seq_length={SEQ}",
        "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", f"epas.mode={mode}",
        "epas.interval=1", "training.train_steps=3", "optimizer.warmup_steps=1",
        "training.eval_interval=0", f"checkpoint.dir={tmp_path / 'ckpt'}", *LLAMA3_RUN,
    ])
    run_workers(train_worker, 4, run)  # after 3 steps layers 3, 4, 5 share: 3|4 is a stage boundary
    assert run_workers(_convert_worker, 1, ["megatron-to-hf", "--input", str(tmp_path / "ckpt"),
                                            "--output", str(tmp_path / "hf"), "--dtype", "float32"]) == [0]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["sharing_layers"] == [3, 4, 5] and config["sharing_mode"] == mode
    rope = config.get("rope_parameters") or config["rope_scaling"]  # transformers 5 / 4
    assert (rope["rope_type"], rope["factor"]) == ("llama3", 32.0) and config["max_position_embeddings"] == 16384
    assert "auto_map" in config and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (config["bos_token_id"], config["eos_token_id"]) == (None, VOCAB - 1)  # the tokenizer's: no <s>

    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    with torch.no_grad():
        exported = hf_model(_tokens()).logits
    expected, without_sharing = _layout_logits([(tmp_path / "ckpt", (3, 4, 5)), (tmp_path / "ckpt", ())])
    assert relative_error(exported, expected) < 1e-5
    assert relative_error(without_sharing, expected) > 1e-3  # the comparison sees sharing


def _error(argv) -> str:
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert convert_checkpoint.main(argv) == 2
    return stderr.getvalue()


@pytest.mark.slow
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

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / name).unlink(missing_ok=True)
    *_, last = sorted(source.glob("model-*.safetensors"))
    last.unlink()  # an interrupted download
    assert f"model.safetensors.index.json lists {last.name}, not in {source}" in _error(convert)
    for path in source.glob("model*.safetensors*"):
        path.unlink()
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


def _convert_after_a_failure_worker(rank, broken, source, output):
    """A conversion that fails with the process group up, then a good one in the same process."""
    failed = convert_checkpoint.main(["hf-to-megatron", "--input", broken, "--output", f"{output}.broken"])
    left_up = torch.distributed.is_initialized() or parallel_state.model_parallel_is_initialized()
    return failed, left_up, convert_checkpoint.main(["hf-to-megatron", "--input", source, "--output", output])


def _with_a_misshapen_norm(source: Path, broken: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, broken)
    (shard,) = [path for path in broken.glob("*.safetensors") if "model.norm.weight" in load_file(path)]
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.slow
def test_checkpoint_shape_and_sharing_set_errors(tmp_path, capfd):
    _hf_llama(tmp_path / "hf", 4, False)
    _with_a_misshapen_norm(tmp_path / "hf", tmp_path / "broken")
    converted = run_workers(_convert_after_a_failure_worker, 1, str(tmp_path / "broken"), str(tmp_path / "hf"),
                            str(tmp_path / "ckpt"))
    assert converted == [(2, False, 0)]  # the failed conversion ended its process group
    assert "decoder.final_layernorm.weight: shape (63,) does not fit (64,)" in capfd.readouterr().err
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


@pytest.mark.slow
def test_training_continues_from_a_converted_checkpoint(tmp_path, capfd):
    _hf_llama(tmp_path / "hf", 2, False, dtype=torch.bfloat16)
    run_workers(_convert_worker, 1, ["hf-to-megatron", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt")])
    stored = dist_checkpointing.load_tensors_metadata(str(tmp_path / "ckpt" / "iter_0000000"))
    assert {tensor.dtype for tensor in stored.values()} == {torch.bfloat16}  # the Hugging Face model's dtype
    shape = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
             "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=128",
             "model.norm_epsilon=1.0e-5", "epas.num_sharing_layers=2", "model.seq_length=16", *LLAMA3_RUN]
    common = ["data.mock=true", "data.micro_batch_size=2", "data.global_batch_size=2", "training.train_steps=2",
              "optimizer.warmup_steps=1", "training.eval_interval=0", f"checkpoint.load={tmp_path / 'ckpt'}"]
    refused = load_config(TINY, shape + common + [f"checkpoint.dir={tmp_path / 'a'}"])
    assert "holds weights only" in run_workers(_continue_worker, 1, refused)[0]
    start = common + ["checkpoint.load_optimizer=false"]
    run = load_config(TINY, shape + start + [f"checkpoint.dir={tmp_path / 'b'}"])
    capfd.readouterr()
    assert run_workers(_continue_worker, 1, run) == [2]
    assert checkpointing.latest_iteration(tmp_path / "b") == 2
    assert "was trained with model." not in capfd.readouterr().err

    # a preset's plain RoPE left in by mistake: trains, and says which setting differs from the weights'
    plain_rope = load_config(TINY, [*shape[:-3], *start, f"checkpoint.dir={tmp_path / 'c'}"])
    assert run_workers(_continue_worker, 1, plain_rope) == [2]
    warned = capfd.readouterr().err
    assert "trained with model.rotary_base=500000.0; this run uses model.rotary_base=10000.0" in warned
    assert "trained with model.rope_scaling_factor=32" in warned and "norm_epsilon" not in warned


# --- token ids of the export ------------------------------------------------------------------------

def _demo_llama(folder: Path) -> Path:
    """A tiny Hugging Face LLaMA with a tokenizer made as the demo's is (<s> = 0, </s> = 1, "!" = 2: not
    LLaMA's default bos 1 / eos 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from epas.data.demo_corpus import help_topic_documents, train_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    train_tokenizer([document["text"] for document in help_topic_documents()[:20]], 300, folder)
    return folder


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    """A converted checkpoint root of :func:`_demo_llama`, with its tokenizer (only read by the tests)."""
    root = tmp_path_factory.mktemp("demo")
    argv = ["hf-to-megatron", "--input", str(_demo_llama(root / "hf")), "--output", str(root / "ckpt")]
    assert run_workers(_convert_worker, 1, argv) == [0]
    return root / "ckpt"


def _export_with_and_without_tokenizer_worker(rank, checkpoint, with_tokenizer, without_tokenizer):
    """Export the checkpoint root (its tokenizer/ comes along) and its iter folder (no tokenizer beside it)."""
    status = convert_checkpoint.main(["megatron-to-hf", "--input", checkpoint, "--output", with_tokenizer])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status += convert_checkpoint.main(["megatron-to-hf", "--input", str(Path(checkpoint) / "iter_0000000"),
                                           "--output", without_tokenizer, "--dtype", "bfloat16"])
    return status, [str(warning.message) for warning in caught if "no tokenizer" in str(warning.message)]


class _Forced:
    """A logits processor that makes generate() emit ``tokens`` in order, whatever the model predicts."""

    def __init__(self, tokens: list[int], prompt_length: int):
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_length]] = 0
        return forced


@pytest.mark.slow
def test_export_takes_bos_eos_pad_from_the_tokenizer(tmp_path, demo_checkpoint):
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from epas.data.tokenizer import load_tokenizer

    status, warned = run_workers(_export_with_and_without_tokenizer_worker, 1, str(demo_checkpoint),
                                 str(tmp_path / "hf"), str(tmp_path / "bare"))[0]
    assert status == 0
    tokenizer = load_tokenizer(tmp_path / "hf")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    assert ids == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}
    for name in ("config.json", "generation_config.json"):
        written = json.loads((tmp_path / "hf" / name).read_text())
        assert {key: written.get(key) for key in ids} == ids, name

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    prompt = torch.tensor([[tokenizer.bos_token_id, 40, 41]])
    llama_default_eos = 2  # "!" in this tokenizer: an export with LLaMA's defaults stops here
    forced = [5, llama_default_eos, 7, tokenizer.eos_token_id, 9, 9]
    output = model.generate(prompt, max_new_tokens=len(forced), do_sample=False,
                            logits_processor=LogitsProcessorList([_Forced(forced, prompt.shape[1])]))
    assert output[0, prompt.shape[1]:].tolist() == forced[:4]  # stops at the tokenizer's </s>

    # no tokenizer to export: the ids are unset rather than LLaMA's defaults, and the export says so
    assert len(warned) == 1 and "bos/eos/pad token ids are left unset" in warned[0]
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    bare = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bare"), trust_remote_code=True, dtype="auto")
    assert {p.dtype for p in bare.parameters()} == {torch.bfloat16}  # as --dtype asked (the checkpoint's: float32)
    assert all(torch.equal(p, q.bfloat16()) for p, q in zip(bare.parameters(), model.parameters(), strict=True))
    for name in ("config.json", "generation_config.json"):
        written = json.loads((tmp_path / "bare" / name).read_text())
        assert all(written.get(key) is None for key in ids), name


# --- what an output folder may hold, and conversions killed midway ------------------------------------

def test_a_non_empty_output_is_refused_and_left_as_it_was(tmp_path):
    source = tmp_path / "hf"
    _hf_llama(source, 4, False)
    output = tmp_path / "ckpt"
    (output / "iter_0000000").mkdir(parents=True)  # an earlier conversion's, without `latest`
    (output / "iter_0000000" / "mine.txt").write_text("keep me")
    message = _error(["hf-to-megatron", "--input", str(source), "--output", str(output)])
    assert f"--output {output} is not empty (it holds iter_0000000)" in message and "--overwrite" in message
    assert sorted(p.name for p in output.rglob("*")) == ["iter_0000000", "mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no staging folder either

    assert "which this conversion reads" in _error(
        ["hf-to-megatron", "--input", str(source), "--output", str(tmp_path), "--overwrite"])
    (tmp_path / "file").write_text("")
    assert "is a file" in _error(["hf-to-megatron", "--input", str(source), "--output", str(tmp_path / "file")])


def _siblings(output: Path) -> list[str]:
    """What conversions into ``output`` left beside it."""
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(output.name + "."))


def _weights(output: Path) -> str | None:
    return (output / "weights").read_text() if output.is_dir() else None


def _publish_killed_at(output: Path, point: str) -> None:
    """Replace ``output`` (--overwrite) in a forked child that dies (SIGKILL) at ``point`` of publishing."""
    pid = os.fork()
    if pid == 0:  # the child touches files only (no torch), then dies or exits without running pytest
        try:
            replace = convert_checkpoint.os.replace

            def replace_then_die(source, target):
                if point == "new one complete" and Path(source) == output:
                    os.kill(os.getpid(), signal.SIGKILL)
                replace(source, target)
                if (point == "old set aside" and Path(source) == output
                        or point == "new in place" and Path(target) == output):
                    os.kill(os.getpid(), signal.SIGKILL)

            convert_checkpoint.os.replace = replace_then_die
            with convert_checkpoint._staged_output(output, True, []) as staging:
                (staging / "weights").write_text("new")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# where publishing an --overwrite conversion can be killed -> what OUTPUT holds then, and after the next start
PUBLISH_KILL_POINTS = {"new one complete": ("old", "old"), "old set aside": (None, "old"), "new in place": ("new", "new")}


@pytest.mark.parametrize("point", PUBLISH_KILL_POINTS)
def test_an_overwrite_killed_while_publishing_loses_neither_folder(tmp_path, point):
    output = tmp_path / "out"
    output.mkdir()
    (output / "weights").write_text("old")
    _publish_killed_at(output, point)
    killed, next_start = PUBLISH_KILL_POINTS[point]
    assert _weights(output) == killed  # never a half-written folder under the name
    assert _siblings(output)  # the rest is beside it, under names nothing loads

    with pytest.raises(ConfigError, match="is not empty .*give --overwrite"):  # a rerun without --overwrite
        with convert_checkpoint._staged_output(output, False, []):
            pass
    assert _weights(output) == next_start and _siblings(output) == []  # put back or removed, nothing lost
    with convert_checkpoint._staged_output(output, True, []) as staging:
        (staging / "weights").write_text("newer")
    assert _weights(output) == "newer" and _siblings(output) == []


def test_a_conversion_still_running_into_the_same_output_is_named(tmp_path):
    busy = tmp_path / f"out.tmp-{os.getppid()}"  # a live process's staging folder
    busy.mkdir()
    with pytest.raises(ConfigError, match=f"{busy} belongs to process {os.getppid()}, still running"):
        with convert_checkpoint._staged_output(tmp_path / "out", False, []):
            pass
    assert busy.is_dir() and not (tmp_path / "out").exists()


def _killed_conversion_worker(rank, argv, point, output):
    """Run a conversion that dies (SIGKILL) at ``point``: once the model is written but before the tokenizer,
    or with everything written, before the rename to ``output``."""
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "before the tokenizer":
        load = convert_checkpoint._load_tokenizer

        def load_dying_tokenizer(*args):
            tokenizer = load(*args)
            tokenizer.save_pretrained = die
            return tokenizer

        convert_checkpoint._load_tokenizer = load_dying_tokenizer
    else:
        replace = convert_checkpoint.os.replace

        def replace_unless_publishing(source, target):
            if Path(output) in (Path(source), Path(target)):  # setting an old output aside, or the rename
                die()
            replace(source, target)

        convert_checkpoint.os.replace = replace_unless_publishing
    return convert_checkpoint.main(argv)


CONVERSION_KILL_POINTS = ("before the tokenizer", "before the rename")


@pytest.mark.slow
def test_hf_to_megatron_killed_midway_keeps_the_old_folder_and_reruns(tmp_path):
    output = tmp_path / "ckpt"
    (output / "iter_0000000").mkdir(parents=True)  # an older conversion's (no `latest`), to be replaced
    (output / "iter_0000000" / "old").write_text("")
    argv = ["hf-to-megatron", "--input", str(_demo_llama(tmp_path / "hf")), "--output", str(output), "--overwrite"]
    for point in CONVERSION_KILL_POINTS:
        with pytest.raises(AssertionError, match="died without reporting"):
            run_workers(_killed_conversion_worker, 1, argv, point, str(output))
        assert sorted(p.name for p in output.rglob("*")) == ["iter_0000000", "old"]  # untouched
        with pytest.raises(ConfigError, match="no 'latest' file"):
            checkpointing.resolve(output)
        assert len(_siblings(output)) == 1  # this run's staging folder: the earlier one was removed

    assert run_workers(_convert_worker, 1, argv) == [0]
    assert _siblings(output) == [] and not (output / "iter_0000000" / "old").exists()
    assert checkpointing.resolve(output) == output / "iter_0000000"
    assert (output / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_megatron_to_hf_killed_midway_leaves_no_loadable_folder_and_reruns(tmp_path, demo_checkpoint):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "hf"
    argv = ["megatron-to-hf", "--input", str(demo_checkpoint), "--output", str(output)]
    for point in CONVERSION_KILL_POINTS:
        with pytest.raises(AssertionError, match="died without reporting"):
            run_workers(_killed_conversion_worker, 1, argv, point, str(output))
        assert not output.exists()
        with pytest.raises((OSError, ValueError)):  # transformers < 5 names a missing folder a bad repo id
            AutoModelForCausalLM.from_pretrained(str(output), trust_remote_code=True)
        (staging,) = _siblings(output)  # this run's: the earlier one was removed
        assert (output.parent / staging / "model.safetensors").is_file()  # written, but not under OUTPUT

    assert run_workers(_convert_worker, 1, argv) == [0]
    assert _siblings(output) == [] and (output / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(str(output), trust_remote_code=True)
    assert "is not empty" in _error(argv)  # and a second export does not replace the first unasked
