"""finetune_epas.py: EPAS with the Hugging Face Trainer and DeepSpeed ZeRO on CPU (gloo).

- Two processes with ZeRO-2 (indexed data) and ZeRO-3 (jsonl text): the loss falls and the sharing
  region grows at the configured steps; a run stopped by training.exit_interval resumes from its
  Trainer checkpoint and reproduces the uninterrupted run step for step.
- The final EPAS folder converts with hf-to-megatron and gives the same logits in Megatron-core as
  in transformers, with the same sharing set.
- Supervised data: the loss covers exactly the response tokens (chat template and prompt/response).
- Bad configs fail before start-up with a message naming the fix.
- The ZeRO-2 run's W&B history (offline) equals its TensorBoard scalars, the sharing size included, and its W&B
  config holds the resolved FinetuneConfig.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epas.config import EPASConfig, FinetuneConfig, FinetuneDataConfig, load_config, to_dict
from epas.scheduler import SharingScheduler
from tests.model_utils import relative_error
from tests.multiprocess import run_workers
from tests.test_hf_conversion import _convert_worker, _layout_logits, _tokens, _write_tokenizer
from tests.wandb_offline import as_float32, read_offline_run, tensorboard_series

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-quick leaves them out

REPO = Path(__file__).resolve().parents[1]
VOCAB = 200
LAYERS = 6
STEPS, INTERVAL = 24, 6  # the region (layers 3, 4, 5) grows after steps 6, 12 and 18
TIMEOUT = 600  # the first DeepSpeed run on a machine compiles its CPU communication op (about 90 s)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}w2 {{ m['content'] }} </s> "
    "{% else %}w1 {{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}w2 {% endif %}"
)


def _counting_text(start: int, length: int) -> str:
    """w{start} w{start+1} ...: a pattern a tiny model learns in a few steps."""
    return " ".join(f"w{3 + (start + i) % (VOCAB - 4)}" for i in range(length))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A plain random LLaMA folder with a word-level tokenizer, and jsonl and indexed data."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from epas.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    _write_tokenizer(root / "llama", VOCAB)
    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, VOCAB, (400,), generator=generator).tolist()
    with open(root / "text.jsonl", "w") as file:
        file.writelines(json.dumps({"text": _counting_text(s, 40)}) + "\n" for s in starts)
    preprocess([root / "text.jsonl"], root / "text", root / "llama", progress=False)
    return root


def _arguments(workspace, output: str, *overrides) -> list[str]:
    """finetune_epas.py's arguments: the tiny CPU preset on the workspace's model and data."""
    return [
        "--config", "configs/finetune/tiny_cpu.yaml", f"model={workspace / 'llama'}",
        f"data.paths=[{workspace / 'text'}]", "data.seq_length=32", "data.micro_batch_size=4",
        "data.global_batch_size=8", f"data.cache_dir={workspace / 'cache'}", f"training.train_steps={STEPS}",
        "training.log_interval=1", "training.eval_interval=null", "training.save_interval=null",
        f"epas.interval={INTERVAL}", "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "optimizer.warmup_steps=2",
        f"training.output_dir={workspace / output}", f"logging.tensorboard_dir={workspace / output / 'tb'}",
        *overrides,
    ]


def _finetune(workspace, output: str, *overrides, processes: int = 2, check: bool = True):
    """Run finetune_epas.py (under torchrun for several processes); return its exit code and output."""
    launcher = [sys.executable, "finetune_epas.py"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "finetune_epas.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    result = subprocess.run([*launcher, *_arguments(workspace, output, *overrides)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    output_text = result.stdout + result.stderr
    if check:
        assert result.returncode == 0, output_text[-6000:]
    return result.returncode, output_text


def _history(workspace, output: str) -> dict[int, dict]:
    """Per-step training logs of the newest checkpoint of a run."""
    checkpoints = sorted((workspace / output).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def _expected_sharing_sizes() -> list[int]:
    epas = EPASConfig(num_sharing_layers=3, interval=INTERVAL)
    scheduler = SharingScheduler(LAYERS, epas)
    return [len(scheduler.sharing_layers_at(step - 1)) for step in range(1, STEPS + 1)]


def _zero2_overrides(workspace) -> list[str]:
    """ZeRO-2 on indexed data, tracked by TensorBoard and by W&B (offline)."""
    return ["training.deepspeed=configs/deepspeed/zero2.json", "logging.wandb_project=epas-test",
            "logging.wandb_run_name=zero2", f"logging.wandb_dir={workspace / 'zero2'}"]


@pytest.fixture(scope="module")
def zero2_run(workspace):
    _finetune(workspace, "zero2", *_zero2_overrides(workspace))
    return _history(workspace, "zero2")


@pytest.fixture(scope="module")
def zero3_run(workspace):
    _finetune(workspace, "zero3", "training.deepspeed=configs/deepspeed/zero3.json", "data.format=text",
              f"data.paths=[{workspace / 'text.jsonl'}]")
    return _history(workspace, "zero3")


@pytest.mark.parametrize("run", ["zero2_run", "zero3_run"])
def test_two_processes_lower_the_loss_and_grow_the_region_on_schedule(request, run):
    history = request.getfixturevalue(run)
    assert sorted(history) == list(range(1, STEPS + 1))
    losses = [history[step]["loss"] for step in range(1, STEPS + 1)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses
    sizes = [history[step]["epas/num_sharing_layers"] for step in range(1, STEPS + 1)]
    assert sizes == _expected_sharing_sizes()
    assert sizes[INTERVAL - 1 : INTERVAL + 1] == [0, 1] and sizes[-1] == 3


def test_tensorboard_wandb_and_plots_show_the_run(workspace, zero2_run):
    from analysis.plot_runs import SHARING, plot_runs, read_scalars

    scalars = read_scalars(workspace / "zero2" / "tb")
    steps, sizes = scalars[SHARING]
    assert list(steps) == list(range(1, STEPS + 1)) and list(sizes) == _expected_sharing_sizes()
    assert [p.name for p in plot_runs([workspace / "zero2" / "tb"], workspace / "plots")] == ["loss.png"]

    # W&B's history holds TensorBoard's scalars, the sharing size included (the Trainer's W&B callback keeps its
    # end-of-training totals in the run summary instead); its config holds the resolved FinetuneConfig
    wandb_run = read_offline_run(workspace / "zero2")
    totals = {f"train/{key}" for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second",
                                           "train_loss", "total_flos")}
    history = wandb_run.series(step_key="train/global_step")
    assert as_float32(history) == tensorboard_series(workspace / "zero2" / "tb", exclude=totals)
    assert [history["train/epas/num_sharing_layers"][step] for step in range(1, STEPS + 1)] == _expected_sharing_sizes()
    arguments = _arguments(workspace, "zero2", *_zero2_overrides(workspace))
    resolved = json.loads(json.dumps(to_dict(load_config(REPO / arguments[1], arguments[2:], FinetuneConfig))))
    assert {key: wandb_run.config[key] for key in resolved} == resolved


def _projections_per_profiled_step(trace: Path) -> dict[str, int]:
    """The profiler's step markers in a torch trace, each with the linear layers run inside it."""
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [event for event in events if event.get("name", "").startswith("ProfilerStep#")]
    linears = [event["ts"] for event in events if event.get("name") == "aten::linear"]
    return {step["name"]: sum(step["ts"] <= ts <= step["ts"] + step["dur"] for ts in linears) for step in steps}


def test_resume_from_a_trainer_checkpoint_continues_the_schedule(workspace, zero2_run):
    stop_at = 9  # between two growths, with a growth (after step 12) still to come
    # the profiler window, optimizer steps 12 and 13, lies in the resumed half, around a growth of the region
    settings = ["training.deepspeed=configs/deepspeed/zero2.json", "profiling.start_step=12", "profiling.num_steps=2"]
    _, first = _finetune(workspace, "resumed", *settings, f"training.exit_interval={stop_at}")
    assert f"stopped at step {stop_at}" in first and not (workspace / "resumed" / "model").exists()
    assert not (workspace / "resumed" / "tb" / "profile").exists()
    schedule = json.loads((workspace / "resumed" / f"checkpoint-{stop_at}" / "epas_schedule.json").read_text())
    assert schedule["completed_steps"] == stop_at and schedule["target"] == [3, 4, 5]
    _, second = _finetune(workspace, "resumed", *settings)
    assert f"checkpoint-{stop_at} (step {stop_at})" in second
    # counted from the resumed step: steps 10 and 11 (markers 0 and 1) wait, 12 and 13 are traced on rank 0;
    # step 13 runs fewer projections than step 12: its region grew after step 12
    traces = list((workspace / "resumed" / "tb" / "profile").iterdir())
    assert [trace.name for trace in traces] == ["rank0.12.pt.trace.json"]
    projections = _projections_per_profiled_step(traces[0])
    assert sorted(projections) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert projections["ProfilerStep#2"] > projections["ProfilerStep#3"] > 0, projections
    assert "rank 0: profiled iterations 12-13" in second
    resumed = _history(workspace, "resumed")
    for step in range(1, STEPS + 1):
        assert resumed[step]["epas/num_sharing_layers"] == zero2_run[step]["epas/num_sharing_layers"]
        assert resumed[step]["loss"] == pytest.approx(zero2_run[step]["loss"], rel=1e-4), step


def _stop_at_first_loss(command: list[str], env: dict) -> tuple[int, str]:
    """Start a run, send it SIGUSR1 when it logs its first loss; it must exit 0. Returns the step it saved at."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "'loss'" in line:
            process.send_signal(signal.SIGUSR1)
            break
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=TIMEOUT) == 0, output[-4000:]
    stopped = int(output.split("received a stop signal: saving at step ")[1].split()[0])
    assert 1 <= stopped < STEPS
    return stopped, output


def test_stop_signal_saves_and_an_incomplete_checkpoint_is_passed_over(workspace):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    stopped, output = _stop_at_first_loss([sys.executable, "finetune_epas.py", *_arguments(workspace, "signalled")],
                                          env)
    assert f"stopped at step {stopped}" in output
    assert (workspace / "signalled" / f"checkpoint-{stopped}" / "epas_schedule.json").is_file()
    assert not (workspace / "signalled" / "model").exists()

    cut_short = workspace / "signalled" / f"checkpoint-{stopped + 1}"  # as a kill during its save leaves it
    cut_short.mkdir()
    (cut_short / "config.json").write_text("{}")
    _, output = _finetune(workspace, "signalled", processes=1)
    assert f"skipping {cut_short}: incomplete" in output and f"(step {stopped})" in output
    assert (workspace / "signalled" / "model" / "config.json").is_file()


def test_launcher_runs_the_trainer_path_and_forwards_sigusr1(workspace):
    """launch/torchrun.sh (and so the SLURM scripts) with EPAS_ENTRY=finetune_epas.py: SLURM's time-limit
    warning to the launcher makes both processes save the same step and the job exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EPAS_ENTRY": "finetune_epas.py", "PYTHON": sys.executable}
    stopped, _ = _stop_at_first_loss(["bash", "launch/torchrun.sh", "--nproc-per-node", "2",
                                      *_arguments(workspace, "launched")], env)
    assert (workspace / "launched" / f"checkpoint-{stopped}" / "epas_schedule.json").is_file()


def test_resuming_with_another_schedule_is_refused(workspace, zero2_run):
    code, output = _finetune(workspace, "zero2", "epas.interval=5", "training.train_steps=30", processes=1,
                             check=False)
    assert code == 2 and "the checkpoint's EPAS schedule has interval=6 but this run has interval=5" in output


def test_resuming_with_another_learning_rate_is_refused_and_the_named_fix_trains(workspace, zero2_run):
    """The Trainer would restore the checkpoint's rate over the config's without a word."""
    code, output = _finetune(workspace, "zero2", "optimizer.lr=1e-3", "optimizer.adam_beta2=0.99",
                             "training.train_steps=30", processes=1, check=False)
    checkpoint = workspace / "zero2" / f"checkpoint-{STEPS}"
    assert code == 2 and (f"resuming {checkpoint} with another optimizer.lr=0.001 (checkpoint: 0.003), "
                          "optimizer.adam_beta2=0.99 (checkpoint: 0.95)") in output
    _, output = _finetune(workspace, "from_checkpoint", f"model={checkpoint}", f"data.tokenizer={workspace / 'llama'}",
                          "optimizer.lr=1e-3", "training.train_steps=2", processes=1)
    assert (workspace / "from_checkpoint" / "model" / "config.json").is_file()


def test_final_folder_gives_megatron_the_same_logits(workspace, zero3_run):
    from transformers import AutoModelForCausalLM

    folder = workspace / "zero3" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["sharing_layers"] == config["trained_sharing_layers"] == [3, 4, 5]
    hf_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert run_workers(_convert_worker, 1, ["hf-to-megatron", "--input", str(folder),
                                            "--output", str(workspace / "zero3_megatron")]) == [0]
    expected = {}
    every_sharing = ([3, 4, 5], [5], [])
    every_logits = _layout_logits([(workspace / "zero3_megatron", sharing) for sharing in every_sharing])
    for sharing, logits in zip(every_sharing, every_logits, strict=True):
        hf_model.set_sharing_layers(sharing)
        with torch.no_grad():
            expected[len(sharing)] = hf_model(_tokens()).logits
        assert relative_error(logits, expected[len(sharing)]) < 1e-5, sharing
    assert relative_error(expected[3], expected[0]) > 1e-3  # the set matters, so the comparison could fail


# ---- supervised fine-tuning data -------------------------------------------------------------------


def _tokenizer(workspace, chat: bool = True):
    from epas.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(workspace / "llama")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _words(tokenizer, ids) -> str:
    return " ".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def test_chat_loss_covers_exactly_the_assistant_turns(workspace, tmp_path):
    from hf_training.data import build_datasets

    conversation = [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w20 w21"},
                    {"role": "user", "content": "w12"}, {"role": "assistant", "content": "w22"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    tokenizer = _tokenizer(workspace)
    data = FinetuneDataConfig(format="chat", paths=[str(path)], seq_length=64)
    train, valid = build_datasets(data, tokenizer, "tok", seed=0, num_train_samples=1, num_valid_samples=0)
    (example,) = train.examples
    assert valid is None
    assert _words(tokenizer, example["input_ids"]) == "w1 w10 w11 w2 w20 w21 </s> w1 w12 w2 w22 </s>"
    targets = example["input_ids"][example["labels"] != -100]
    assert _words(tokenizer, targets) == "w20 w21 </s> w22 </s>"
    # what the model is asked to write is what generation after the template's prompt produces
    prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.split() == "w1 w10 w11 w2".split()


def test_instruction_loss_covers_the_response_and_eos_and_truncates(workspace, tmp_path):
    from hf_training.data import PadToLongest, build_datasets

    path = _write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "w10 w11 w12", "response": "w20"},
        {"prompt": "w10", "response": "w20 w21 w22 w23"},
        {"prompt": "w10 w11 w12 w13 w14", "response": "w20"},  # no response token within 4 tokens: dropped
    ])
    tokenizer = _tokenizer(workspace, chat=False)
    data = FinetuneDataConfig(format="instruction", paths=[str(path)], seq_length=4)
    train, _ = build_datasets(data, tokenizer, "tok", seed=0, num_train_samples=2, num_valid_samples=0)
    assert len(train) == 2
    first, second = train.examples
    assert _words(tokenizer, first["input_ids"]) == "w10 w11 w12 w20"  # truncated before EOS
    assert first["labels"].tolist() == [-100, -100, -100, first["input_ids"][3].item()]
    assert _words(tokenizer, second["input_ids"][second["labels"] != -100]) == "w20 w21 w22"
    batch = PadToLongest(pad_id=0)([first, {k: v[:2] for k, v in second.items()}])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"][1, 2:].tolist() == [-100, -100]


def test_sft_from_an_epas_export_learns_the_responses(workspace, tmp_path, zero3_run):
    """Also with gradient checkpointing (tests/test_hf_model.py checks its gradients)."""
    records = [{"messages": [{"role": "user", "content": _counting_text(s, 4)},
                             {"role": "assistant", "content": _counting_text(s + 4, 6)}]} for s in range(0, 160, 5)]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    tokenizer_dir = tmp_path / "chat_tokenizer"
    _tokenizer(workspace).save_pretrained(tokenizer_dir)
    _, output = _finetune(
        workspace, "sft", "data.format=chat", f"data.paths=[{path}]", f"data.tokenizer={tokenizer_dir}",
        f"model={workspace / 'zero3' / 'model'}", "training.train_steps=20", "epas.interval=4",
        "training.gradient_checkpointing=true", processes=1,
    )
    history = _history(workspace, "sft")
    losses = [history[step]["loss"] for step in range(1, 21)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.8, losses
    assert [history[step]["epas/num_sharing_layers"] for step in (4, 5, 9, 13, 20)] == [0, 1, 2, 3, 3]
    config = json.loads((workspace / "sft" / "model" / "config.json").read_text())
    assert config["sharing_layers"] == [3, 4, 5]
    assert "32 examples (0 truncated" in output


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["data.format=csv"], "data.format must be one of"),
    (["data.paths=[/nonexistent/corpus]"], "data file /nonexistent/corpus.bin not found"),
    (["data.format=chat", "data.paths=[/nonexistent.jsonl]"], "data file '/nonexistent.jsonl' not found"),
    (["data.global_batch_size=6"], "data.global_batch_size=6 is not a multiple"),
    (["optimizer.decay_style=linear"], "optimizer.decay_style='linear' is not available"),
    (["training.deepspeed=/nonexistent.json"], "training.deepspeed file '/nonexistent.json' not found"),
    (["model=/nonexistent"], "model folder /nonexistent does not exist"),
    (["epas.num_sharing_layers=7"], "do not fit in 6 layers"),
    (["optimizer.override_on_resume=true"], "optimizer.override_on_resume is pretrain_epas.py's"),
    (["trainig.train_steps=3"], "did you mean 'training'"),
    (["profiling.tool=nsys", "profiling.start_step=2"], "but this run is on the CPU; use profiling.tool=torch"),
    (["profiling.start_step=2", "profiling.ranks=[2]"], "names rank(s) [2] of a world of 1 processes"),
])
def test_bad_configs_fail_before_start_up(workspace, capsys, overrides, message):
    import finetune_epas

    assert finetune_epas.main(_arguments(workspace, "never", *overrides)) == 2
    assert message in capsys.readouterr().err
    assert not (workspace / "never").exists()


def test_zero3_without_gathered_save_is_refused(workspace, tmp_path, capsys):
    import finetune_epas

    ds_config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    ds_config["zero_optimization"].pop("stage3_gather_16bit_weights_on_model_save")
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ds_config))
    assert finetune_epas.main(_arguments(workspace, "never", f"training.deepspeed={path}")) == 2
    assert "stage3_gather_16bit_weights_on_model_save=true" in capsys.readouterr().err


def test_loss_is_averaged_over_the_whole_steps_targets(workspace):
    """With the Trainer's num_items_in_batch the loss is a sum over the step's target count, as in LlamaForCausalLM."""
    from epas_hf import EpasLlamaForCausalLM

    model = EpasLlamaForCausalLM.from_pretrained(workspace / "llama").eval()
    ids = _tokens()
    labels = ids.clone()
    labels[0, :5] = -100
    targets = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        mean = model(ids, labels=labels).loss
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(3 * targets)).loss
    assert summed.item() == pytest.approx(mean.item() / 3, rel=1e-6)
