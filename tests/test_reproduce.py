"""tools/reproduce.py: the whole pipeline on a minimal budget (it checks the pipeline, not the science), and the
report's tables and statements on numbers made up here, where the right answer is known."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest

from analysis.reproduce import check_budget, main
from analysis.reproduction import plan, report
from analysis.reproduction.plan import Settings
from analysis.reproduction.runner import Runner
from epas.errors import EpasError, InputError

SEEDS = (1, 2, 3)


# ---- the pipeline, end to end ---------------------------------------------------------------------------------


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading``."""
    section = markdown.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return [row for row in rows if not set("".join(row)) <= set("-: ")]


@pytest.mark.slow
def test_the_pipeline_writes_every_table_and_a_second_call_resumes(tmp_path, capfd):
    output, published = tmp_path / "out", tmp_path / "docs"
    command = ["--output", str(output), "--seeds", "7", "--pretrain-steps", "5", "--cpt-steps", "5",
               "--held-out-tokens", "1024", "--publish", str(published)]
    assert main(command) == 0
    assert "0 of 16 jobs already done" in capfd.readouterr().out

    # the corpus: three disjoint splits, the tokenizer trained on one of them
    corpus = output / "corpus"
    texts = {split: {json.loads(line)["text"] for line in (corpus / f"{split}.jsonl").open()}
             for split in ("pretrain", "cpt", "heldout")}
    assert all(texts.values())
    assert not texts["heldout"] & (texts["pretrain"] | texts["cpt"]) and not texts["pretrain"] & texts["cpt"]

    result = json.loads((output / "results.json").read_text())
    runs = {run["name"]: run for run in result["runs"]}
    assert sorted(runs) == sorted(f"{run.name}" for run in plan.runs(Settings(output, (7,))))
    for run in runs.values():
        assert all(len(losses) == 5 for losses in run["held_out_loss"].values())
        assert run["held_out_tokens"] == 1023
        # the region grows after every step (5 steps, complete after step 4) in the EPAS runs only
        assert run["growth_steps"] == ([2, 3, 4, 5] if run["uses_epas"] else [])  # the first step on the new region
    assert sorted(runs["pretrain-none-seed7"]["held_out_loss"]) == ["kv", "qk"]

    # what each evaluation ran: the deepest layers, in the mode asked for
    evaluation = json.loads((output / "runs/pretrain-none-seed7/evaluation-kv/results.json").read_text())
    assert evaluation["metadata"]["sharing_mode"] == "kv" and evaluation["settings"]["allow_untrained"]
    assert [length["sharing_layers"] for length in evaluation["runs"]] == [[], [7], [6, 7], [5, 6, 7], [4, 5, 6, 7]]
    exported = json.loads((output / "runs/cpt-epas-seed7/export/config.json").read_text())
    assert (exported["trained_sharing_layers"], exported["sharing_mode"]) == ([4, 5, 6, 7], "qk")
    log = (output / "logs/train-cpt-none-seed7.log").read_text()
    assert re.search(r"loaded .*pretrain-none-seed7/checkpoints.*\(weights only\)", log)

    # the report: every run's numbers as results.json has them, the tables filled in
    markdown = (output / "RESULTS.md").read_text()
    every_run = table_rows(markdown, "## Every run")
    assert len(every_run) == 1 + 6  # header, then each run in each mode it was evaluated in
    for row in every_run[1:]:
        run = runs[f"{row[0].replace(' ', '-')}-seed{row[1]}"]
        assert [float(cell) for cell in row[4:]] == [round(v, 3) for v in run["held_out_loss"][row[3][:2]]]
    table4 = table_rows(markdown, "## Table 4")
    assert [row[0] for row in table4[1:]] == ["no sharing (0/8)", "EPAS qk (4/8)", "EPAS kv (4/8)"]
    assert float(table4[2][2]) == round(runs["pretrain-qk-seed7"]["held_out_loss"]["qk"][4]
                                        - runs["pretrain-none-seed7"]["held_out_loss"]["qk"][0], 3)
    assert len(table_rows(markdown, "## Table 6")[0]) == 6
    for name in ("loss_curves.png", "sharing_lengths.png"):
        assert (output / report.FIGURES / name).read_bytes()[:4] == b"\x89PNG"
        assert (published / report.FIGURES / name).is_file()
    assert (published / "RESULTS.md").read_text() == markdown

    # a second call finds every job done; other settings on the same folder are refused, nothing is touched
    assert main(command) == 0
    assert "16 of 16 jobs already done" in capfd.readouterr().out
    checkpoints = sorted(p.name for p in (output / "runs/pretrain-qk-seed7/checkpoints").iterdir())
    assert main([*command[:5], "6", *command[6:]]) == 2  # --pretrain-steps 6
    assert "records another command for train-pretrain-none-seed7" in capfd.readouterr().err
    assert sorted(p.name for p in (output / "runs/pretrain-qk-seed7/checkpoints").iterdir()) == checkpoints


# ---- the report, on numbers made up here ----------------------------------------------------------------------


def made_up_runs(pretrain: dict, cpt: dict) -> list[dict]:
    """Runs whose held-out loss at length L is base[seed] + slope * L: ``pretrain``/``cpt`` map a variant to
    (bases per seed, slope)."""
    collected = []
    for stage, variants in (("pretrain", pretrain), ("cpt", cpt)):
        for variant, (bases, slope) in variants.items():
            for seed, base in zip(SEEDS, bases, strict=True):
                run = plan.Run(stage, variant, seed)
                losses = [base + slope * length for length in range(5)]
                collected.append({"name": run.name, "stage": stage, "variant": variant, "seed": seed,
                                  "mode": run.mode, "uses_epas": run.uses_epas,
                                  "held_out_loss": {mode: losses for mode in run.evaluation_modes}})
    return collected


BASELINE = [3.0, 3.1, 3.2]


def test_table4_shows_mean_std_and_paired_differences():
    collected = made_up_runs({"none": (BASELINE, 0.5), "qk": ([3.04, 3.13, 3.25], 0.0),
                              "kv": ([2.9, 3.0, 3.1], 0.0)}, {"epas": (BASELINE, 0.01), "none": (BASELINE, 0.2)})
    rows = [line.split("|")[1:-1] for line in report.table4(collected, 4, 8)[2:]]
    assert [cell.strip() for cell in rows[0][:2]] == ["no sharing (0/8)", f"3.100 ± {statistics.stdev(BASELINE):.3f}"]
    assert rows[1][1].strip() == f"3.140 ± {statistics.stdev([3.04, 3.13, 3.25]):.3f}"
    assert rows[1][2].strip() == f"+0.040 ± {statistics.stdev([0.04, 0.03, 0.05]):.3f}"
    assert rows[2][2].strip() == "-0.100 ± 0.000"
    statements = "\n".join(report.verdicts(collected, 4, 8))
    assert "EPAS qk pretraining:** held-out loss +0.040" in statements and "a small cost, as the paper" in statements
    assert "EPAS kv pretraining:** held-out loss -0.100" in statements and "no cost at this scale" in statements
    assert "all 3 seeds agree in sign" in statements
    assert "That holds, in every seed" in statements  # cpt: EPAS rises by 0.04, the plain model by 0.8
    assert "is +0.000 in held-out loss without sharing and +0.040 sharing its 4 layers: no cost" in statements


@pytest.mark.parametrize("epas_slopes, expected", [
    ((0.05, 0.05, 0.05), "That is not reproduced here"),
    ((0.01, 0.1, 0.01), "That holds on average but not in every seed"),
], ids=["same-rise", "one-seed-against"])
def test_table6_statement_follows_every_seed(epas_slopes, expected):
    collected = made_up_runs({"none": (BASELINE, 0.2), "qk": (BASELINE, 0.0), "kv": (BASELINE, 0.0)},
                             {"none": (BASELINE, 0.05)})  # rises by 0.2 at length 4
    for seed, slope in zip(SEEDS, epas_slopes, strict=True):
        run = plan.Run("cpt", "epas", seed)
        collected.append({"name": run.name, "stage": "cpt", "variant": "epas", "seed": seed, "mode": "qk",
                          "uses_epas": True, "held_out_loss": {"qk": [3.0 + slope * length for length in range(5)]}})
    assert expected in "\n".join(report.verdicts(collected, 4, 8))


# ---- settings checked before anything runs ----------------------------------------------------------------------


def test_a_shorter_run_keeps_the_shape_of_its_schedule():
    assert plan.schedule_overrides("pretrain", None, "--pretrain-steps") == []
    assert plan.schedule_overrides("pretrain", 200, "--pretrain-steps") == []
    assert plan.schedule_overrides("pretrain", 100, "--pretrain-steps") == [
        "training.train_steps=100", "epas.interval=12", "optimizer.warmup_steps=10"]
    with pytest.raises(InputError, match="--cpt-steps 4 is too short .* give at least 5"):
        plan.schedule_overrides("cpt", 4, "--cpt-steps")


def test_runs_that_would_repeat_data_are_refused(tmp_path):
    corpus = {"splits": {"pretrain": {"tokens": 10**6}, "cpt": {"tokens": 100_000}}}
    check_budget(Settings(tmp_path, (1,)), {"splits": {"pretrain": {"tokens": 10**6}, "cpt": {"tokens": 10**6}}})
    with pytest.raises(InputError, match=r"the cpt runs would read 204,800 tokens but the cpt split has 98,000"):
        check_budget(Settings(tmp_path, (1,)), corpus)


@pytest.mark.parametrize("seeds, message", [((), "--seeds is empty"), ((1, 1), "repeats a seed")])
def test_bad_seeds_are_named(tmp_path, seeds, message):
    with pytest.raises(InputError, match=message):
        plan.check_settings(Settings(tmp_path, seeds))


def test_jobs_start_after_what_they_need_and_read_the_held_out_split_only(tmp_path):
    jobs = plan.jobs(Settings(tmp_path, (1, 2)))
    names = [job.name for job in jobs]
    for job in jobs:
        assert all(names.index(need) < names.index(job.name) for need in job.needs)
    assert ("train-pretrain-none-seed2",) == next(job.needs for job in jobs if job.name == "train-cpt-epas-seed2")
    for job in jobs:
        if job.kind == "train":
            keys = {arg.split("=")[0] for arg in job.argv if arg.startswith("data.")}
            assert keys == {"data.paths", "data.tokenizer", "data.cache_dir"}
        data = [arg for arg in job.argv if "corpus/" in arg]
        split = {"train": "cpt" if "-cpt-" in job.name else "pretrain", "evaluate": "heldout"}.get(job.kind)
        assert all(Path(arg.split("=")[-1].strip("[]")).name in (split, "tokenizer") for arg in data)


# ---- the runner, on small Python commands ------------------------------------------------------------------------


def python_job(name: str, code: str, needs: tuple[str, ...] = ()) -> plan.Job:
    return plan.Job(name, "evaluate", ("-c", code), needs)


def test_jobs_run_after_their_needs_and_a_failure_keeps_what_finished(tmp_path, capsys):
    order = tmp_path / "order.txt"
    append = "import sys; open({path!r}, 'a').write('{name} ')"
    jobs = [python_job("first", "import time; time.sleep(0.5); " + append.format(path=str(order), name="first")),
            python_job("second", append.format(path=str(order), name="second"), needs=("first",)),
            python_job("broken", "print('the cause'); raise SystemExit(3)"),
            python_job("after-broken", append.format(path=str(order), name="never"), needs=("broken",))]
    with pytest.raises(EpasError, match=r"(?s)broken failed \(exit 3\).*the cause.*run the same command again"):
        Runner(jobs, tmp_path / "out", parallel=2, threads=1).run()
    # the job running beside the failure finished; none started after it
    assert order.read_text().split() == ["first"]
    assert sorted(p.name for p in (tmp_path / "out/state").iterdir()) == ["first.done"]

    fixed = [*jobs[:2], python_job("broken", "pass"), jobs[3]]
    Runner(fixed, tmp_path / "out", parallel=2, threads=1).run()
    assert order.read_text().split() == ["first", "second", "never"]  # only the jobs not done ran
    assert "1 of 4 jobs already done" in capsys.readouterr().out


def test_sigterm_reaches_the_running_jobs_and_leaves_them_unfinished(tmp_path):
    started = tmp_path / "started"
    job = python_job("long", f"import time; open({str(started)!r}, 'w').close(); time.sleep(60)")

    def terminate_once_started():
        deadline = time.monotonic() + 20
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_started, daemon=True).start()
    begin = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        Runner([job], tmp_path / "out", parallel=1, threads=1).run()
    assert time.monotonic() - begin < 20  # the job was stopped, not waited for
    assert not (tmp_path / "out/state/long.done").exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_readme_summary_quotes_the_published_results():
    """The README sums up docs/RESULTS.md in its own words: results published again must be summed up again."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    summary = readme.split("## Does it do what the paper says?", 1)[1].split("\n## ", 1)[0]
    figures = re.findall(r"[+-]\d+\.\d+(?: ± \d+\.\d+)?", summary)
    results = (root / "docs" / "RESULTS.md").read_text()
    assert len(figures) >= 5
    assert [figure for figure in figures if figure not in results] == []
