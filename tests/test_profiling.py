"""The profiler window of both entry points (epas/profiling.py) over stand-in iterations: exactly the
configured iterations are traced, also after a resume, and a run that ends inside the window still writes it; with
profiling.tool=nsys exactly they lie inside Nsight Systems' capture range (CUDA's profiler API and emit_nvtx stood in
for, since they need CUDA). tests/test_training.py checks the trace of a real run for the EPAS ranges."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import record_function

from epas.config import ProfilingConfig
from epas.profiling import StepProfiler


def _profile(tmp_path, completed: int, last: int, **settings) -> set[str] | None:
    """Iterations ``completed + 1`` .. ``last``, each a named range; the iterations in the trace (None: no trace)."""
    profiling = ProfilingConfig(dir=str(tmp_path), **settings)
    profiler = StepProfiler(profiling, completed, cuda=False)
    for iteration in range(completed + 1, last + 1):
        with record_function(f"iteration {iteration}"):
            pass
        profiler.step()
    profiler.close()
    traces = list(tmp_path.glob("*.pt.trace.json"))
    if not traces:
        return None
    assert [trace.name for trace in traces] == [f"rank0.{profiling.start_step}.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    return {event["name"] for event in events if event.get("name", "").startswith("iteration")}


@pytest.mark.parametrize("completed", [0, 18, 19], ids=["from-the-start", "resumed", "resumed-just-before"])
def test_the_window_traces_exactly_its_iterations(tmp_path, completed):
    assert _profile(tmp_path, completed, 30, start_step=20, num_steps=3) == {"iteration 20", "iteration 21",
                                                                            "iteration 22"}


def test_a_run_ending_inside_the_window_writes_what_it_traced(tmp_path):
    assert _profile(tmp_path, 0, 21, start_step=20, num_steps=3) == {"iteration 20", "iteration 21"}


@pytest.mark.parametrize("completed, settings", [
    (20, {"start_step": 20}),  # resumed after the window's start
    (0, {"start_step": 20, "ranks": [1]}),  # another rank profiles
    (0, {"start_step": None}),
], ids=["resumed-after-the-start", "other-rank", "off"])
def test_nothing_is_traced_outside_the_settings(tmp_path, completed, settings):
    assert _profile(tmp_path, completed, 30, **settings) is None


class _CaptureLog:
    """CUDA's profiler API, device synchronisation and ``emit_nvtx``, logging their calls in order."""

    def __init__(self, monkeypatch):
        self.events: list = []
        log = self.events

        class Nvtx:
            def __init__(self, record_shapes=False):
                log.append(f"nvtx(record_shapes={record_shapes})")

            def __enter__(self):
                log.append("nvtx on")

            def __exit__(self, *exc):
                log.append("nvtx off")

        monkeypatch.setattr(torch.autograd.profiler, "emit_nvtx", Nvtx)
        monkeypatch.setattr(torch.cuda.profiler, "start", lambda: log.append("cudaProfilerStart"))
        monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: log.append("cudaProfilerStop"))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("synchronize"))


def _capture(monkeypatch, completed: int, last: int, **settings) -> list:
    """Iterations ``completed + 1`` .. ``last`` under profiling.tool=nsys: the iterations among the capture calls."""
    capture = _CaptureLog(monkeypatch)
    profiler = StepProfiler(ProfilingConfig(tool="nsys", **settings), completed, cuda=True)
    for iteration in range(completed + 1, last + 1):
        capture.events.append(iteration)
        profiler.step()
    profiler.close()
    return capture.events


CAPTURE_ON = ["cudaProfilerStart", "nvtx on"]
CAPTURE_OFF = ["synchronize", "nvtx off", "cudaProfilerStop"]


@pytest.mark.parametrize("completed", [0, 18, 19], ids=["from-the-start", "resumed", "resumed-just-before"])
def test_the_nsys_capture_range_holds_exactly_the_window(monkeypatch, completed):
    events = _capture(monkeypatch, completed, 30, start_step=20, num_steps=3, record_shapes=True)
    assert events == ["nvtx(record_shapes=True)", *range(completed + 1, 20), *CAPTURE_ON, 20, 21, 22, *CAPTURE_OFF,
                      *range(23, 31)]


def test_a_run_ending_inside_the_capture_range_closes_it(monkeypatch):
    events = _capture(monkeypatch, 0, 21, start_step=20, num_steps=3)
    assert events[-7:] == [*CAPTURE_ON, 20, 21, *CAPTURE_OFF]


@pytest.mark.parametrize("completed, settings", [
    (20, {"start_step": 20}),  # resumed after the window's start
    (0, {"start_step": 20, "ranks": [1]}),  # another rank profiles
], ids=["resumed-after-the-start", "other-rank"])
def test_nothing_is_captured_outside_the_settings(monkeypatch, completed, settings):
    assert _capture(monkeypatch, completed, 30, **settings) == list(range(completed + 1, 31))
