"""tools/evaluate.py: a tiny EPAS export, a tiny local multiple-choice task and a tiny .bin/.idx dataset.

Every number of the table is checked against a computation written here from the model's own logits (no
lm-eval), at every sharing length, so a sharing set that was not applied, or applied wrongly, shows.
"""

from __future__ import annotations

import json
import math
import re
import socket
from types import SimpleNamespace

import pytest
import torch
from epas.data.tokenizer import load_tokenizer
from tests.test_hf_model import epas_model, export
from analysis.evaluate import DEFAULT_METRICS, main, markdown_table, pick_metric, plot, sharing_sets
from epas.errors import InputError
from epas.data.demo_corpus import train_tokenizer
from epas.data.preprocess import preprocess

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINED = [1, 2, 3]  # of the tiny model's 4 layers
LENGTHS = [0, 2, 3]
EXPECTED_SETS = {0: [], 2: [2, 3], 3: [1, 2, 3]}
SEQ_LENGTH, BATCH = 16, 3  # several windows, a short last one, and padded batches

ANIMALS = ["cat", "horse", "elephant", "ox", "tiger", "mole", "kangaroo"]
ROWS = [
    {"question": f"Which animal did visitor {i} see first?",
     "choices": [ANIMALS[(i + k) % len(ANIMALS)] for k in range(4)], "answer": i % 4}
    for i in range(16)
]
DOCUMENTS = [
    "The cat sat on the mat while the horse ate hay in the barn.",
    "An elephant never forgets, people say, though nobody asked the ox.",
    "Tigers hunt alone; moles dig tunnels under the garden all night long.",
    "A kangaroo carries its young in a pouch and hops across the plain.",
]
TASK_YAML = """\
task: tiny_animals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("evaluate")
    texts = [json.dumps(row) for row in ROWS] + DOCUMENTS
    model = epas_model(vocab_size=320, trained_sharing_layers=TRAINED, seed=0)
    export(model, root / "model")
    train_tokenizer(texts, 300, root / "model")  # a byte-level BPE: any text encodes
    tokenizer = load_tokenizer(root / "model")

    (root / "tiny_animals.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_animals.yaml").write_text(
        TASK_YAML.format(data=root / "tiny_animals.jsonl", cache=root / "datasets_cache"))

    (root / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    preprocess([root / "docs.jsonl"], root / "valid", root / "model", progress=False)
    return SimpleNamespace(root=root, model=model, tokenizer=tokenizer, folder=root / "model",
                           tasks=root / "tasks", valid=root / "valid")


# ---- the direct computations the tool is checked against ---------------------------------------------------


@torch.no_grad()
def continuation_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, ids[0, positions + 1]].sum().item()


def direct_accuracies(model, tokenizer) -> dict[str, float]:
    """acc: the choice of highest log-likelihood after the question; acc_norm: per character of the choice."""
    hits = {"acc": 0, "acc_norm": 0}
    for row in ROWS:
        context_ids = tokenizer(f"Question: {row['question']}\nAnswer:")["input_ids"]
        scores = [continuation_loglikelihood(model, context_ids,
                                             tokenizer(" " + choice, add_special_tokens=False)["input_ids"])
                  for choice in row["choices"]]
        normalised = [score / len(choice) for score, choice in zip(scores, row["choices"], strict=True)]
        hits["acc"] += max(range(4), key=scores.__getitem__) == row["answer"]
        hits["acc_norm"] += max(range(4), key=normalised.__getitem__) == row["answer"]
    return {metric: count / len(ROWS) for metric, count in hits.items()}


@torch.no_grad()
def direct_perplexity(model, tokenizer, seq_length: int) -> float:
    """Documents + EOS concatenated, windows of seq_length inputs starting every seq_length tokens."""
    tokens = [t for text in DOCUMENTS for t in tokenizer(text, add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id]]
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_length):
        window = torch.tensor([tokens[start:start + seq_length + 1]])
        logprobs = model(window[:, :-1]).logits[0].log_softmax(-1)
        total -= logprobs.gather(1, window[0, 1:, None]).sum().item()
        count += window.shape[1] - 1
    assert count == len(tokens) - 1  # every token but the first is predicted once
    return math.exp(total / count)


def table_cells(table: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split("|") for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if not set("".join(row)) <= set("-: ")]


# ---- the table -----------------------------------------------------------------------------------------------


def test_table_equals_direct_computation_at_every_sharing_length(setup, tmp_path, monkeypatch, capsys):
    attempts = []

    def no_network(sock, address):
        attempts.append(address)
        raise OSError("tests run offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    output = tmp_path / "out"
    status = main([str(setup.folder), "--sharing-lengths", ",".join(map(str, LENGTHS)), "--tasks", "tiny_animals",
                   "--include-path", str(setup.tasks), "--valid-data", str(setup.valid),
                   "--seq-length", str(SEQ_LENGTH), "--batch-size", str(BATCH), "--metrics", "acc",
                   "--output", str(output)])
    assert status == 0
    assert attempts == []  # local tasks and folders: nothing reached for the hub
    printed = capsys.readouterr().out
    assert "[3/3] sharing length 3: layers 1-3" in printed

    result = json.loads((output / "results.json").read_text())
    runs = {run["sharing_length"]: run for run in result["runs"]}
    assert {length: run["sharing_layers"] for length, run in runs.items()} == EXPECTED_SETS

    direct = {}
    for length, layers in EXPECTED_SETS.items():
        setup.model.set_sharing_layers(layers)
        direct[length] = {**direct_accuracies(setup.model, setup.tokenizer),
                          "perplexity": direct_perplexity(setup.model, setup.tokenizer, SEQ_LENGTH)}
    # the sharing sets change the model's output enough to tell them apart by the table's numbers
    for metric in ("acc", "perplexity"):
        assert len({value[metric] for value in direct.values()}) == len(LENGTHS), metric

    for length, run in runs.items():
        task = run["tasks"]["tiny_animals"]
        assert task["metric"] == "acc" and task["higher_is_better"]
        assert task["all"]["acc,none"] == pytest.approx(direct[length]["acc"], abs=1e-12)
        assert task["all"]["acc_norm,none"] == pytest.approx(direct[length]["acc_norm"], abs=1e-12)
        assert run["average"] == task["value"]  # one accuracy task: its own average
        assert run["validation"]["perplexity"] == pytest.approx(direct[length]["perplexity"], rel=1e-5)

    cells = table_cells((output / "table.md").read_text())
    header, body = cells[0], cells[1:]
    assert header == ["task (metric)", "0/4 (none)", "2/4 (2-3)", "3/4 (1-3)"]
    assert [row[0] for row in body] == ["tiny_animals (acc)", "**Average**", "validation perplexity"]
    expected_rows = [[100 * direct[length]["acc"] for length in LENGTHS]] * 2
    expected_rows.append([direct[length]["perplexity"] for length in LENGTHS])
    for row, expected in zip(body, expected_rows, strict=True):
        assert len(row) == len(LENGTHS) + 1
        assert [float(cell) for cell in row[1:]] == pytest.approx(expected, abs=0.006)
    assert (output / "sharing_lengths.png").stat().st_size > 0


def test_perplexity_alone_needs_no_task(setup, tmp_path):
    output = tmp_path / "out"
    assert main([str(setup.folder), "--sharing-lengths", "0", "--valid-data", f"{setup.valid}.bin",
                 "--valid-tokens", "40", "--seq-length", "8", "--output", str(output)]) == 0
    run = json.loads((output / "results.json").read_text())["runs"][0]
    assert run["tasks"] == {} and run["average"] is None and run["validation"]["tokens"] == 39
    assert [row[0] for row in table_cells((output / "table.md").read_text())[1:]] == ["validation perplexity"]


def test_a_plain_llama_folder_runs_with_inference_time_sharing(setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = tmp_path / "llama"
    config = {key: value for key, value in setup.model.config.to_dict().items()
              if key not in ("sharing_layers", "sharing_mode", "trained_sharing_layers", "model_type", "auto_map")}
    llama = LlamaForCausalLM(LlamaConfig(**config))
    llama.load_state_dict(setup.model.state_dict())  # the export's weights as a plain LLaMA
    llama.save_pretrained(plain)
    setup.tokenizer.save_pretrained(plain)
    assert json.loads((plain / "config.json").read_text())["model_type"] == "llama"
    output = tmp_path / "out"
    arguments = [str(plain), "--sharing-lengths", "0,2", "--valid-data", str(setup.valid), "--seq-length", "8",
                 "--output", str(output)]
    assert main(arguments) == 2  # no trained region: lengths above 0 need --allow-untrained
    assert main([*arguments, "--allow-untrained"]) == 0
    runs = json.loads((output / "results.json").read_text())["runs"]
    assert [run["sharing_layers"] for run in runs] == [[], [config["num_hidden_layers"] - 2,
                                                            config["num_hidden_layers"] - 1]]
    setup.model.set_sharing_layers(runs[1]["sharing_layers"])
    assert runs[1]["validation"]["perplexity"] == pytest.approx(direct_perplexity(setup.model, setup.tokenizer, 8),
                                                               rel=1e-5)


def test_task_rows_show_the_preferred_metric():
    multiple_choice = {"alias": "piqa", "acc,none": 0.7, "acc_stderr,none": 0.01, "acc_norm,none": 0.72,
                       "acc_norm_stderr,none": 0.02}
    higher = {"acc": True, "acc_norm": True}
    assert pick_metric("piqa", multiple_choice, higher, list(DEFAULT_METRICS)) == {
        "metric": "acc_norm", "value": 0.72, "stderr": 0.02, "higher_is_better": True,
        "all": {key: value for key, value in multiple_choice.items() if key != "alias"}}
    assert pick_metric("piqa", multiple_choice, higher, ["acc"])["value"] == 0.7
    generative = {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": "N/A",
                  "exact_match,flexible-extract": 0.2}
    assert pick_metric("gsm8k", generative, {"exact_match": True}, list(DEFAULT_METRICS)) == {
        "metric": "exact_match (strict-match)", "value": 0.1, "stderr": None, "higher_is_better": True,
        "all": generative}
    rolling = {"word_perplexity,none": 31.5, "bits_per_byte,none": 0.9}
    chosen = pick_metric("wikitext", rolling, {"word_perplexity": False, "bits_per_byte": False}, ["bits_per_byte"])
    assert chosen["metric"] == "bits_per_byte" and not chosen["higher_is_better"]  # shown, kept out of the Average


def test_the_average_takes_only_higher_is_better_tasks(tmp_path):
    def task(metric, value, higher):
        return {"metric": metric, "value": value, "stderr": None, "higher_is_better": higher, "all": {}}

    runs = [{"sharing_length": length, "sharing_layers": layers, "average": average,
             "tasks": {"wikitext": task("word_perplexity", ppl, False), "piqa": task("acc", piqa, True),
                       "arc_easy": task("acc_norm", arc, True)}}
            for length, layers, ppl, piqa, arc, average in [(0, [], 20.0, 0.7, 0.5, 0.6),
                                                            (2, [6, 7], 25.0, 0.6, 0.4, 0.5)]]
    result = {"metadata": {"model": "m", "num_layers": 8, "sharing_mode": "qk", "trained_sharing_mode": "qk",
                           "trained_sharing_layers": [5, 6, 7]},
              "settings": {"tasks": ["wikitext", "piqa", "arc_easy"]}, "runs": runs}
    assert table_cells(markdown_table(result)) == [
        ["task (metric)", "0/8 (none)", "2/8 (6-7)"],
        ["piqa (acc)", "70.00", "60.00"],
        ["arc_easy (acc_norm)", "50.00", "40.00"],
        ["**Average**", "60.00", "50.00"],
        ["wikitext (word_perplexity)", "20.00", "25.00"],
    ]
    plot(result, tmp_path / "plot.png")  # two panels: accuracies, and the perplexity
    assert (tmp_path / "plot.png").stat().st_size > 0


# ---- sharing lengths -----------------------------------------------------------------------------------------


def test_sharing_lengths_count_from_the_deep_end_of_the_trained_region():
    assert sharing_sets(8, [3, 4, 5, 6, 7], [0, 3, 5], False) == {0: [], 3: [5, 6, 7], 5: [3, 4, 5, 6, 7]}
    assert sharing_sets(8, [2, 3, 4], [1], False) == {1: [4]}  # a region away from the last layer
    assert sharing_sets(8, None, [0], False) == {0: []}
    assert sharing_sets(8, None, [2, 7], True) == {2: [6, 7], 7: [1, 2, 3, 4, 5, 6, 7]}
    with pytest.raises(InputError, match=r"lengths \[6\].*trained to share 5 layers.*--allow-untrained"):
        sharing_sets(8, [3, 4, 5, 6, 7], [0, 6], False)
    with pytest.raises(InputError, match="records no trained sharing region"):
        sharing_sets(8, None, [1], False)
    with pytest.raises(InputError, match="layer 0 has no source"):
        sharing_sets(8, None, [8], True)


# ---- bad input -----------------------------------------------------------------------------------------------


def test_another_sharing_mode_is_inference_time_sharing(setup, tmp_path, capsys):
    """The qk-trained model run with kv sharing: refused without --allow-untrained, then equal to a direct
    computation in kv mode and different from qk (so a mode that was not applied would show)."""
    output = tmp_path / "out"
    arguments = [str(setup.folder), "--sharing-lengths", "0,2", "--sharing-mode", "kv", "--valid-data",
                 str(setup.valid), "--seq-length", "8", "--output", str(output)]
    assert main(arguments) == 2
    assert "trained to share in qk mode, so kv sharing is inference-time sharing" in capsys.readouterr().err
    assert main([*arguments, "--allow-untrained"]) == 0
    result = json.loads((output / "results.json").read_text())
    assert (result["metadata"]["sharing_mode"], result["metadata"]["trained_sharing_mode"]) == ("kv", "qk")
    assert result["runs"][1]["sharing_layers"] == [2, 3]
    perplexity = {}
    try:
        for mode in ("kv", "qk"):
            setup.model.config.sharing_mode = mode
            setup.model.set_sharing_layers([2, 3])
            perplexity[mode] = direct_perplexity(setup.model, setup.tokenizer, 8)
    finally:
        setup.model.config.sharing_mode = "qk"
        setup.model.set_sharing_layers([])
    assert result["runs"][1]["validation"]["perplexity"] == pytest.approx(perplexity["kv"], rel=1e-5)
    assert abs(perplexity["kv"] - perplexity["qk"]) > 1e-3 * perplexity["qk"]
    assert "kv sharing, trained region [1, 2, 3] in qk mode" in (output / "table.md").read_text()


def _not_epas_folder(setup, tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(tmp_path)


@pytest.mark.parametrize("make_args, message", [
    (lambda s, t: [str(t / "missing"), "--sharing-lengths", "0", "--valid-data", str(s.valid)], "does not exist"),
    (lambda s, t: [_not_epas_folder(s, t), "--sharing-lengths", "0", "--valid-data", str(s.valid)],
     "holds a 'gpt2' model"),
    (lambda s, t: [str(s.folder), "--sharing-lengths", "0,4", "--valid-data", str(s.valid)],
     r"lengths \[4\] exceed the trained region"),
    (lambda s, t: [str(s.folder), "--sharing-lengths", "0", "--valid-data", str(t / "nodata")],
     "nodata.bin and .*nodata.idx not found"),
    (lambda s, t: [str(s.folder), "--sharing-lengths", "0", "--tasks", "tiny_animals", "--include-path",
                   str(t / "no_tasks")], "is not a folder"),
    (lambda s, t: [str(s.folder), "--sharing-lengths", "0", "--tasks", "tiny_animals,no_such_task_xyz",
                   "--include-path", str(s.tasks)], "unknown task.*no_such_task_xyz"),
], ids=["missing-folder", "not-epas", "too-long", "missing-data", "missing-include-path", "unknown-task"])
def test_bad_input_is_named_with_its_fix(setup, tmp_path, capsys, make_args, message):
    assert main(make_args(setup, tmp_path)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    assert re.search(message, error)


@pytest.mark.parametrize("args", [["--sharing-lengths", "0,x"], ["--sharing-lengths", "-1"],
                                  ["--sharing-lengths", "0"]], ids=["not-a-number", "negative", "nothing-to-evaluate"])
def test_bad_arguments_stop_the_parser(setup, args):
    with pytest.raises(SystemExit) as stop:
        main([str(setup.folder), *args])
    assert stop.value.code == 2
