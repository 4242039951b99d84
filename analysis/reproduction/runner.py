"""Run the reproduction's jobs a few at a time, with progress and an ETA, so that a second call resumes the first.

A job that exits 0 leaves ``state/<job>.done`` (its command and time); a later call skips it, and one whose
recorded command differs from the planned one is refused (the output folder belongs to other settings). A
training job stopped half-way resumes from its own checkpoints (pretrain_epas.py does that by itself).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from analysis.reproduction.plan import REPOSITORY, Job
from analysis.reproduction.results import write_json
from epas.errors import EpasError, InputError

# First guesses of a job's seconds on one core, replaced by what the finished jobs took.
FIRST_GUESS = {"train": (15.0, 0.8), "export": (12.0, 0.0), "evaluate": (10.0, 0.0)}  # (start-up, per step)
ITERATION = re.compile(rb"iteration +(\d+)/(\d+)")
PROGRESS_EVERY_S = 30.0


@dataclass
class Running:
    job: Job
    process: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)


class Runner:
    """Starts each job whose needs are done, at most ``parallel`` at once, each on ``threads`` CPU threads."""

    def __init__(self, jobs: list[Job], output: Path, parallel: int, threads: int):
        self.jobs, self.parallel, self.threads = jobs, parallel, threads
        self.state, self.logs = output / "state", output / "logs"
        self.done: dict[str, dict] = {}
        self.seconds: dict[str, list[tuple[int, float]]] = {kind: [] for kind in FIRST_GUESS}

    def marker(self, job: Job) -> Path:
        return self.state / f"{job.name}.done"

    def read_markers(self) -> None:
        """The jobs a previous call finished; refuses a folder whose finished jobs ran other commands."""
        for job in self.jobs:
            try:
                record = json.loads(self.marker(job).read_text())
            except (OSError, ValueError):
                continue
            if record.get("argv") != list(job.argv):
                raise InputError(f"{self.marker(job)} records another command for {job.name} than these settings "
                                 f"give ({' '.join(record.get('argv', []))}); rerun with the settings that made this "
                                 "folder, or choose another --output")
            self.done[job.name] = record
            self.seconds[job.kind].append((job.steps, record["seconds"]))

    def run(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.read_markers()
        pending = [job for job in self.jobs if job.name not in self.done]
        print(f"{len(self.done)} of {len(self.jobs)} jobs already done; {len(pending)} to run, {self.parallel} at a "
              f"time on {self.threads} thread(s) each (logs in {self.logs})", flush=True)
        running: list[Running] = []
        failed: list[Running] = []
        last_report = time.monotonic()

        def stop(signum, frame):  # a job scheduler's SIGTERM: the jobs checkpoint and stop, as on Ctrl-C
            for item in running:
                item.process.send_signal(signal.SIGTERM)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            while pending or running:
                while not failed and len(running) < self.parallel:
                    ready = next((job for job in pending if all(need in self.done for need in job.needs)), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    running.append(self.start(ready))
                if not running:
                    break
                time.sleep(0.5)
                for item in [item for item in running if item.process.poll() is not None]:
                    running.remove(item)
                    if item.process.returncode == 0:
                        self.finish(item)
                        self.report(pending, running, f"done {item.job.name} "
                                                      f"({time.monotonic() - item.started:.0f} s)")
                    else:
                        failed.append(item)
                        print(f"FAILED {item.job.name} (exit {item.process.returncode}); waiting for the jobs "
                              "still running", flush=True)
                if time.monotonic() - last_report > PROGRESS_EVERY_S:
                    self.report(pending, running, "running")
                    last_report = time.monotonic()
        except KeyboardInterrupt:
            # the jobs got the same Ctrl-C (one process group) or the SIGTERM above: training saves and stops
            for item in running:
                item.process.wait()
            print("stopped: run the same command again to resume (finished jobs are kept, training resumes from "
                  "its last checkpoint)", file=sys.stderr, flush=True)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        if failed:
            item = failed[0]
            tail = item.log.read_text(errors="replace").strip().splitlines()[-15:]
            raise EpasError(f"{item.job.name} failed (exit {item.process.returncode}); the end of {item.log}:\n"
                           + "\n".join("    " + line for line in tail)
                           + "\nfix the cause and run the same command again: finished jobs are kept")
        if pending:
            raise EpasError(f"jobs left that can never start: {', '.join(job.name for job in pending)}")

    def start(self, job: Job) -> Running:
        log = self.logs / f"{job.name}.log"
        environment = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        handle = log.open("ab")
        handle.write(f"$ {' '.join(job.argv)}\n".encode())
        handle.flush()
        process = subprocess.Popen([sys.executable, *job.argv], cwd=REPOSITORY, env=environment, stdout=handle,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        handle.close()
        print(f"start {job.name}", flush=True)
        return Running(job, process, log)

    def finish(self, item: Running) -> None:
        seconds = time.monotonic() - item.started
        record = {"argv": list(item.job.argv), "seconds": round(seconds, 1), "log": str(item.log)}
        write_json(self.marker(item.job), record)
        self.done[item.job.name] = record
        self.seconds[item.job.kind].append((item.job.steps, seconds))

    def estimate(self, job: Job) -> float:
        """Seconds the job should take: its kind's start-up plus its steps at the pace finished jobs showed."""
        start_up, per_step = FIRST_GUESS[job.kind]
        measured = self.seconds[job.kind]
        if job.kind == "train" and measured:
            per_step = statistics.median((seconds - start_up) / max(steps, 1) for steps, seconds in measured)
        elif measured:
            start_up = statistics.median(seconds for _, seconds in measured)
        return start_up + per_step * job.steps

    def report(self, pending: list[Job], running: list[Running], event: str) -> None:
        now = time.monotonic()
        left = sum(self.estimate(job) for job in pending)
        left += sum(max(self.estimate(item.job) - (now - item.started), 0.0) for item in running)
        states = ", ".join(f"{item.job.name}{self.iteration(item)}" for item in running) or "nothing"
        print(f"[{len(self.done)}/{len(self.jobs)}] {event} | running: {states} | "
              f"ETA {format_duration(left / self.parallel)}", flush=True)

    @staticmethod
    def iteration(item: Running) -> str:
        """A training job's last logged iteration, read from the end of its log."""
        if item.job.kind != "train":
            return ""
        with item.log.open("rb") as handle:
            handle.seek(max(item.log.stat().st_size - 4096, 0))
            found = ITERATION.findall(handle.read())
        return f" {int(found[-1][0])}/{int(found[-1][1])}" if found else " starting"


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes >= 1 else "<1 min"

