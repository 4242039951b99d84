"""The profiler window of pretrain_epas.py (megatron_training/profiling.py) over stand-in iterations: exactly the
configured iterations are traced, also after a resume, and a run that ends inside the window still writes it.
tests/test_training.py checks the trace of a real run for the EPAS ranges."""

from __future__ import annotations

import json

import pytest
from torch.profiler import record_function

from epas.config import RunConfig
from megatron_training.profiling import StepProfiler

pytestmark = pytest.mark.usefixtures("megatron_cpu")


def _profile(tmp_path, completed: int, last: int, **settings) -> set[str] | None:
    """Iterations ``completed + 1`` .. ``last``, each a named range; the iterations in the trace (None: no trace)."""
    run = RunConfig()
    run.profiling.dir = str(tmp_path)
    for key, value in settings.items():
        setattr(run.profiling, key, value)
    profiler = StepProfiler(run, completed)
    for iteration in range(completed + 1, last + 1):
        with record_function(f"iteration {iteration}"):
            pass
        profiler.step()
    profiler.close()
    traces = list(tmp_path.glob("*.pt.trace.json"))
    if not traces:
        return None
    assert [trace.name for trace in traces] == [f"rank0.{run.profiling.start_step}.pt.trace.json"]
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
