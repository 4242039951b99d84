"""Plots of training runs from their TensorBoard logs, to compare a baseline with EPAS runs.

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] [--labels a,b] [--output plots/] [--smooth 0.9]

RUN_DIR is a run's ``logging.tensorboard_dir``. Writes ``loss.png`` (training loss, validation
loss as markers, and a lower panel with the number of sharing layers) and ``throughput.png``
(tokens/s, and TFLOP/s per GPU where logged) against the training step. On every panel a
dashed line in the run's colour marks each step where its sharing region grows, so a change in
loss or speed can be read against the region that caused it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from epas import cli
from epas.errors import InputError

LOSS, VALID, SHARING = "train/loss", "valid/loss", "epas/num_sharing_layers"
TOKENS, TFLOPS = "train/tokens_per_s", "train/tflops_per_gpu"
COLOURS = [f"C{i}" for i in range(10)]
# the Hugging Face Trainer's names for the same series (finetune_epas.py runs)
TRAINER_TAGS = {"eval/loss": VALID, "train/epas/num_sharing_layers": SHARING}

Series = tuple[list[int], list[float]]


def read_scalars(run_dir: Path) -> dict[str, Series]:
    """Every scalar tag of a run as (steps, values), from all its event files.

    A resumed run logs the steps after its checkpoint again, in a newer event file; the latest
    write of a step wins, so the curve is the one the resumed training actually followed. The
    Trainer's tags (finetune_epas.py) are read under pretrain_epas.py's names.
    """
    if not run_dir.is_dir():
        raise InputError(f"run directory {run_dir} does not exist")
    files = sorted(p for p in run_dir.rglob("events.out.tfevents.*") if p.is_file())
    if not files:
        raise InputError(f"no TensorBoard event files (events.out.tfevents.*) under {run_dir}")
    events: dict[str, list] = {}
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            events.setdefault(TRAINER_TAGS.get(tag, tag), []).extend(accumulator.Scalars(tag))
    scalars = {}
    for tag, tag_events in events.items():
        by_step = {e.step: e.value for e in sorted(tag_events, key=lambda e: e.wall_time)}
        steps = sorted(by_step)
        scalars[tag] = (steps, [by_step[s] for s in steps])
    return scalars


def sharing_changes(steps: list[int], values: list[float]) -> list[tuple[int, int]]:
    """The (step, new count) pairs where the number of sharing layers differs from the last log."""
    return [
        (step, int(value))
        for step, value, previous in zip(steps[1:], values[1:], values[:-1])
        if int(value) != int(previous)
    ]


def ema(values: list[float], smooth: float) -> list[float]:
    """Exponential moving average (weight ``smooth`` on the past), to see a trend through noise."""
    out, last = [], values[0] if values else 0.0
    for value in values:
        last = smooth * last + (1 - smooth) * value
        out.append(last)
    return out


def _default_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, or parent/name where names clash (runs often log to ``<run>/tb``)."""
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.resolve().parent.name}/{d.resolve().name}" for d in run_dirs]


def _mark_changes(axes, changes, colour, row: int) -> None:
    """Dashed lines at region growth, the new count written above the top axes (one row per run,
    outside the plot so the labels never hide a curve)."""
    for ax in axes:
        for step, _ in changes:
            ax.axvline(step, color=colour, linestyle="--", linewidth=1, alpha=0.6)
    for step, count in changes:
        axes[0].annotate(
            f"{count} sharing", xy=(step, 1), xycoords=("data", "axes fraction"),
            xytext=(0, 3 + 11 * row), textcoords="offset points",
            ha="center", va="bottom", fontsize=8, color=colour,
        )


def _loss_figure(runs, smooth: float) -> Figure:
    has_sharing = any(SHARING in scalars for _, _, scalars in runs)
    fig = Figure(figsize=(10, 7 if has_sharing else 5), layout="constrained")
    if has_sharing:
        loss_ax, sharing_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        loss_ax, sharing_ax = fig.subplots(), None
    marked = 0
    for label, colour, scalars in runs:
        steps, losses = scalars[LOSS]
        if smooth:
            loss_ax.plot(steps, losses, color=colour, alpha=0.25, linewidth=1)
            losses = ema(losses, smooth)
        loss_ax.plot(steps, losses, color=colour, linewidth=1.5, label=label)
        if VALID in scalars:
            loss_ax.plot(*scalars[VALID], "o", color=colour, markeredgecolor="black",
                         markersize=6, label=f"{label} (valid)")
        if SHARING in scalars:
            sharing_ax.step(*scalars[SHARING], where="post", color=colour, label=label)
            changes = sharing_changes(*scalars[SHARING])
            if changes:
                _mark_changes([loss_ax, sharing_ax], changes, colour, row=marked)
                marked += 1
    loss_ax.set_ylabel("loss" + (f" (EMA {smooth})" if smooth else ""))
    fig.suptitle("Training loss")
    loss_ax.legend(loc="upper right")
    loss_ax.grid(alpha=0.3)
    if sharing_ax is not None:
        sharing_ax.set_ylabel("sharing layers")
        sharing_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        sharing_ax.grid(alpha=0.3)
    (sharing_ax or loss_ax).set_xlabel("step")
    return fig


def _throughput_figure(runs) -> Figure:
    has_tflops = any(TFLOPS in scalars for _, _, scalars in runs)
    fig = Figure(figsize=(10, 7 if has_tflops else 5), layout="constrained")
    axes = list(fig.subplots(2, 1, sharex=True)) if has_tflops else [fig.subplots()]
    marked = 0
    for label, colour, scalars in runs:
        for ax, tag in zip(axes, [TOKENS, TFLOPS]):
            if tag in scalars:
                ax.plot(*scalars[tag], color=colour, linewidth=1.5, label=label)
        changes = sharing_changes(*scalars[SHARING]) if SHARING in scalars else []
        if changes:
            _mark_changes(axes, changes, colour, row=marked)
            marked += 1
    fig.suptitle("Throughput")
    for ax, ylabel in zip(axes, ["tokens/s", "TFLOP/s per GPU"]):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    axes[-1].set_xlabel("step")
    return fig


def plot_runs(run_dirs, output_dir, labels=None, smooth: float = 0.0) -> list[Path]:
    """Write loss.png and (if any run logged tokens/s) throughput.png; returns the paths written."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise InputError("give at least one run directory")
    if labels is None:
        labels = _default_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise InputError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    if not 0 <= smooth < 1:
        raise InputError(f"smoothing must lie in [0, 1), got {smooth}")
    runs = []
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        scalars = read_scalars(run_dir)
        if LOSS not in scalars:
            raise InputError(f"run {run_dir} has no {LOSS}; its scalar tags: {sorted(scalars) or 'none'}")
        runs.append((label, COLOURS[i % len(COLOURS)], scalars))

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {"loss.png": _loss_figure(runs, smooth)}
    if any(TOKENS in scalars for _, _, scalars in runs):
        figures["throughput.png"] = _throughput_figure(runs)
    written = []
    for name, fig in figures.items():
        fig.savefig(output_dir / name, dpi=120)
        written.append(output_dir / name)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--labels", help="comma-separated, one per run (default: directory names)")
    parser.add_argument("--output", type=Path, default=Path("plots"), help="default: plots/")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1); 0 = raw")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    return cli.run(lambda: print(*plot_runs(args.run_dirs, args.output, labels, args.smooth), sep="\n"))


if __name__ == "__main__":
    sys.exit(main())
