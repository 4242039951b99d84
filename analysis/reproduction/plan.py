"""The reproduction's runs as a list of jobs: commands of the project's own tools, with what each one needs first.

Per seed (the trainings of every seed start first, then the exports and evaluations):
    pretrain-none / -qk / -kv      pretrain_epas.py on the pretrain split (the same data order and steps)
    cpt-epas / cpt-none            the model pretrained without sharing, continued on the cpt split (qk EPAS or none)
    export-<run>                   tools/convert_checkpoint.py megatron-to-hf
    evaluate-<run>-<mode>          tools/evaluate.py: held-out perplexity at every sharing length; models trained
                                   without EPAS with inference-time sharing (--allow-untrained)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from epas.config import RunConfig, load_config
from epas.errors import InputError

REPOSITORY = Path(__file__).resolve().parents[2]
PRESETS = {"pretrain": REPOSITORY / "configs" / "reproduce.yaml", "cpt": REPOSITORY / "configs" / "reproduce_cpt.yaml"}
PRETRAIN_VARIANTS = ("none", "qk", "kv")  # "none": no sharing; qk/kv: EPAS in that mode
CPT_VARIANTS = ("epas", "none")  # continued with EPAS (qk, the paper's mode) or without sharing
CPT_MODE = "qk"
EVALUATION_BATCH = 32


@dataclass(frozen=True)
class Run:
    """One training run: which stage, variant and seed, and the sharing mode its model is evaluated in."""

    stage: str  # "pretrain" or "cpt"
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.variant}-seed{self.seed}"

    @property
    def uses_epas(self) -> bool:
        return self.variant != "none"

    @property
    def mode(self) -> str:
        return CPT_MODE if self.stage == "cpt" else (self.variant if self.uses_epas else "qk")

    @property
    def evaluation_modes(self) -> tuple[str, ...]:
        """An EPAS model in its own mode; a pretrained model without EPAS in both (inference-time sharing); a
        continued one without EPAS in the mode its EPAS twin was continued in."""
        if self.uses_epas:
            return (self.mode,)
        return ("qk", "kv") if self.stage == "pretrain" else (CPT_MODE,)


@dataclass(frozen=True)
class Job:
    """A command run from the repository root; ``needs`` are the names of jobs that must finish first."""

    name: str
    kind: str  # "train", "export" or "evaluate"
    argv: tuple[str, ...]
    needs: tuple[str, ...] = ()
    steps: int = 0  # training steps, for the progress estimate


@dataclass(frozen=True)
class Layout:
    """Where everything goes under the output folder."""

    output: Path

    @property
    def corpus(self) -> Path:
        return self.output / "corpus"

    def run_dir(self, run: Run) -> Path:
        return self.output / "runs" / run.name

    def checkpoints(self, run: Run) -> Path:
        return self.run_dir(run) / "checkpoints"

    def tensorboard(self, run: Run) -> Path:
        return self.run_dir(run) / "tensorboard"

    def export(self, run: Run) -> Path:
        return self.run_dir(run) / "export"

    def evaluation(self, run: Run, mode: str) -> Path:
        return self.run_dir(run) / f"evaluation-{mode}"


@dataclass(frozen=True)
class Settings:
    """What the command line chooses; the rest is in the presets."""

    output: Path
    seeds: tuple[int, ...] = (1, 2, 3)
    pretrain_steps: int | None = None  # None: the preset's
    cpt_steps: int | None = None
    held_out_tokens: int | None = None  # None: the whole held-out split


def runs(settings: Settings) -> list[Run]:
    return [Run(stage, variant, seed) for seed in settings.seeds
            for stage, variants in (("pretrain", PRETRAIN_VARIANTS), ("cpt", CPT_VARIANTS)) for variant in variants]


def schedule_overrides(stage: str, steps: int | None, option: str) -> list[str]:
    """A run of another length than its preset's keeps the shape of its schedules: the region completes, and the
    learning rate's warm-up ends, at the same fraction of the run."""
    config = preset(stage)
    if steps is None or steps == config.training.train_steps:
        return []
    if steps <= target(stage):
        raise InputError(f"{option} {steps} is too short for the sharing region to grow to {target(stage)} layers "
                         f"(one layer per step at most) and train on; give at least {target(stage) + 1}")
    fraction = config.epas.interval * target(stage) / config.training.train_steps
    interval = max(1, round(fraction * steps / target(stage)))
    warmup = round(config.optimizer.warmup_steps * steps / config.training.train_steps)
    return [f"training.train_steps={steps}", f"epas.interval={interval}", f"optimizer.warmup_steps={warmup}"]


def training_overrides(settings: Settings, run: Run) -> list[str]:
    """Everything a run sets beyond its preset: seed, mode, target, data and where it writes."""
    layout = Layout(settings.output)
    overrides = [
        f"seed={run.seed}", f"epas.mode={run.mode}",
        f"epas.num_sharing_layers={target(run.stage) if run.uses_epas else 0}",
        f"data.paths=[{layout.corpus / run.stage}]",  # the split named as the stage
        f"data.tokenizer={layout.corpus / 'tokenizer'}",
        # its own index cache: runs of the same data and seed start at the same time
        f"data.cache_dir={layout.run_dir(run) / 'data_cache'}",
        f"checkpoint.dir={layout.checkpoints(run)}", f"logging.tensorboard_dir={layout.tensorboard(run)}",
    ]
    overrides += (schedule_overrides("pretrain", settings.pretrain_steps, "--pretrain-steps") if run.stage == "pretrain"
                  else schedule_overrides("cpt", settings.cpt_steps, "--cpt-steps"))
    if run.stage == "cpt":
        overrides.append(f"checkpoint.load={layout.checkpoints(Run('pretrain', 'none', run.seed))}")
    return overrides


@functools.cache
def preset(stage: str) -> RunConfig:
    return load_config(PRESETS[stage])


def target(stage: str) -> int:
    """The sharing region an EPAS run of this stage grows to; every model is evaluated at lengths 0 to it."""
    return preset(stage).epas.num_sharing_layers


def resolved(settings: Settings, run: Run) -> RunConfig:
    """The configuration a run trains with (loading it checks every override before anything starts)."""
    return load_config(PRESETS[run.stage], training_overrides(settings, run))


def jobs(settings: Settings) -> list[Job]:
    """Every job, in the order they are started when their needs are met: the trainings first (they are long and
    the others wait for them), so that the short exports and evaluations fill both slots at the end."""
    layout, planned = Layout(settings.output), []
    for run in runs(settings):
        config = resolved(settings, run)
        needs = (f"train-{Run('pretrain', 'none', run.seed).name}",) if run.stage == "cpt" else ()
        argv = ("pretrain_epas.py", "--config", str(PRESETS[run.stage]), *training_overrides(settings, run))
        planned.append(Job(f"train-{run.name}", "train", argv, needs, config.training.train_steps))
        planned.append(Job(f"export-{run.name}", "export",
                           ("tools/convert_checkpoint.py", "megatron-to-hf", "--input", str(layout.checkpoints(run)),
                            "--output", str(layout.export(run))), (f"train-{run.name}",)))
        lengths = ",".join(map(str, range(target(run.stage) + 1)))
        for mode in run.evaluation_modes:
            argv = ["tools/evaluate.py", str(layout.export(run)), "--sharing-lengths", lengths,
                    "--valid-data", str(layout.corpus / "heldout"), "--batch-size", str(EVALUATION_BATCH),
                    "--device", "cpu", "--output", str(layout.evaluation(run, mode))]
            if settings.held_out_tokens:
                argv += ["--valid-tokens", str(settings.held_out_tokens)]
            if not run.uses_epas:
                argv += ["--allow-untrained", "--sharing-mode", mode]
            planned.append(Job(f"evaluate-{run.name}-{mode}", "evaluate", tuple(argv), (f"export-{run.name}",)))
    return sorted(planned, key=lambda job: ("train", "export", "evaluate").index(job.kind))


def tokens_per_run(config: RunConfig) -> int:
    """The tokens a run trains on."""
    return config.training.train_steps * config.data.global_batch_size * config.model.seq_length


def check_settings(settings: Settings) -> None:
    if not settings.seeds:
        raise InputError("--seeds is empty; give at least one seed, e.g. --seeds 1,2,3")
    if len(set(settings.seeds)) != len(settings.seeds):
        raise InputError(f"--seeds {list(settings.seeds)} repeats a seed; give each seed once")
    schedule_overrides("pretrain", settings.pretrain_steps, "--pretrain-steps")
    schedule_overrides("cpt", settings.cpt_steps, "--cpt-steps")
