#!/usr/bin/env bash
# Launch pretrain_epas.py (or finetune_epas.py) under torchrun, on one node or as one node of a
# multi-node run.
#
# Run this once per node; the nodes find each other through a c10d rendezvous hosted on
# MASTER_ADDR. Under SLURM, launch/slurm/epas.sbatch runs it on every node for you.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: launch/torchrun.sh [launcher options] [--config FILE] [section.key=value ...]

Launcher options (each may instead come from the environment variable in brackets):
  --nnodes N           number of nodes taking part                  [NNODES, default 1]
  --nproc-per-node N   processes on this node, one per GPU          [NPROC_PER_NODE,
                       default: the GPUs nvidia-smi lists, or 1 without GPUs]
  --master-addr HOST   node that hosts the rendezvous (node 0)      [MASTER_ADDR, default 127.0.0.1]
  --master-port PORT   its port                                     [MASTER_PORT, default 29500]
  --rdzv-id ID         id shared by all nodes of one run            [RDZV_ID, default
                       $SLURM_JOB_ID, else "epas"]
  --rdzv-backend B     c10d (ranks assigned by the rendezvous) or   [RDZV_BACKEND, default c10d]
                       static (ranks from --node-rank)
  --node-rank R        this node's rank, 0..NNODES-1 (static only)  [NODE_RANK, default 0]
  --nsys DIR           run every worker under Nsight Systems; the    [EPAS_NSYS, default: off]
                       ranks in profiling.ranks write DIR/rank<R>.nsys-rep over the
                       iterations of profiling.start_step/num_steps (sets profiling.tool=nsys)
  -h, --help           show this help

Everything else (--config and section.key=value overrides) goes to the entry point, EPAS_ENTRY:
pretrain_epas.py (default, Megatron-core) or finetune_epas.py (Hugging Face Trainer, DeepSpeed).
Environment: PYTHON (default python3) is the interpreter that runs torchrun;
EPAS_SHUTDOWN_TIMEOUT (default 300) is how long torchrun waits after SIGTERM before SIGKILL
(where torchrun has --shutdown-timeout, as in torch 2.13; older versions wait 30 s).

Signals (to this script, or to every process of the run as SLURM sends them):
  SIGUSR1  every rank saves a checkpoint after the same step and exits; the launcher exits 0.
  SIGTERM  torchrun passes it to the workers, which save the same way; torchrun then exits 1,
           reporting the signal, and SIGKILLs workers still running after the shutdown timeout.

Examples:
  launch/torchrun.sh --nproc-per-node 8 --config configs/llama2_7b.yaml
  launch/torchrun.sh --nsys runs/nsys --config configs/llama_125m.yaml profiling.start_step=10
  # two nodes: run on each of them
  NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh --config configs/tiny_cpu.yaml data.mock=true
EOF
}

die() {
    echo "launch/torchrun.sh: $*" >&2
    exit 2
}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-epas}}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
PYTHON=${PYTHON:-python3}
EPAS_SHUTDOWN_TIMEOUT=${EPAS_SHUTDOWN_TIMEOUT:-300}
EPAS_ENTRY=${EPAS_ENTRY:-pretrain_epas.py}
EPAS_NSYS=${EPAS_NSYS:-}
case $EPAS_ENTRY in
    pretrain_epas.py | finetune_epas.py) ;;
    *) die "EPAS_ENTRY must be pretrain_epas.py or finetune_epas.py, got '$EPAS_ENTRY'" ;;
esac

train_args=()
while (($#)); do
    arg=$1
    # Accept both "--flag value" and "--flag=value" for the launcher's own options.
    if [[ $arg == --*=* ]]; then
        name=${arg%%=*} value=${arg#*=} consumed=1
    else
        name=$arg value=${2-} consumed=2
    fi
    case $name in
        -h | --help) usage; exit 0 ;;
        --nnodes | --node-rank | --nproc-per-node | --master-addr | --master-port | --rdzv-id | --rdzv-backend | --nsys)
            if ((consumed == 2 && $# < 2)); then die "$name needs a value"; fi
            case $name in
                --nnodes) NNODES=$value ;;
                --node-rank) NODE_RANK=$value ;;
                --nproc-per-node) NPROC_PER_NODE=$value ;;
                --master-addr) MASTER_ADDR=$value ;;
                --master-port) MASTER_PORT=$value ;;
                --rdzv-id) RDZV_ID=$value ;;
                --rdzv-backend) RDZV_BACKEND=$value ;;
                --nsys) EPAS_NSYS=$value ;;
            esac
            shift "$consumed" ;;
        --) shift; train_args+=("$@"); break ;;
        *) train_args+=("$arg"); shift ;;
    esac
done

if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if ((gpus > 0)); then NPROC_PER_NODE=$gpus; fi
    fi
fi
for pair in "NNODES=$NNODES" "NODE_RANK=$NODE_RANK" "NPROC_PER_NODE=$NPROC_PER_NODE" \
    "MASTER_PORT=$MASTER_PORT" "EPAS_SHUTDOWN_TIMEOUT=$EPAS_SHUTDOWN_TIMEOUT"; do
    [[ ${pair#*=} =~ ^[0-9]+$ ]] || die "${pair%%=*} must be a non-negative integer, got '${pair#*=}'"
done
((NNODES >= 1 && NPROC_PER_NODE >= 1)) || die "NNODES and NPROC_PER_NODE must be at least 1"

# torchrun is run as "python -m torch.distributed.run" so that it is always the torch of $PYTHON.
torchrun=("$PYTHON" -m torch.distributed.run)
cmd=("${torchrun[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
if ((NNODES == 1)); then
    # One node: torchrun picks a free local port itself, so parallel runs cannot collide.
    cmd+=(--standalone)
else
    case $RDZV_BACKEND in
        c10d)
            # The agent on MASTER_ADDR hosts the rendezvous store; the others connect to it. Ranks
            # are assigned as nodes join, so NODE_RANK is not needed.
            cmd+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID") ;;
        static)
            ((NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
            cmd+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT") ;;
        *) die "RDZV_BACKEND must be c10d or static, got '$RDZV_BACKEND'" ;;
    esac
fi
# Writing a large model's checkpoint can take longer than torchrun's default 30 s between SIGTERM
# and SIGKILL. Recent torchrun (torch 2.13 has it) lets us raise that; older versions cannot.
torchrun_help=$("${torchrun[@]}" --help 2>/dev/null) || die "cannot run torchrun with PYTHON=$PYTHON"
if [[ $torchrun_help == *--shutdown-timeout* ]]; then
    cmd+=(--shutdown-timeout "$EPAS_SHUTDOWN_TIMEOUT")
fi
if [[ -n $EPAS_NSYS ]]; then
    command -v nsys >/dev/null 2>&1 || die "--nsys: nsys (Nsight Systems) is not on PATH; load or install it (the NGC PyTorch image has it)"
    mkdir -p "$EPAS_NSYS" || die "--nsys: cannot create the report folder $EPAS_NSYS"
    # Each worker runs under its own nsys, which records only between the cudaProfilerStart and Stop of
    # the profiling window (profiling.tool=nsys, given first so that a later override still wins).
    # %q{RANK} is the worker's global rank, from the environment torchrun gives it.
    cmd+=(--no-python nsys profile "--trace=cuda,nvtx" --sample=none --cpuctxsw=none
        --capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite=true
        "--output=$EPAS_NSYS/rank%q{RANK}" "$PYTHON" "$repo_root/$EPAS_ENTRY" profiling.tool=nsys)
else
    cmd+=("$repo_root/$EPAS_ENTRY")
fi
cmd+=("${train_args[@]}")

echo "launch/torchrun.sh on $(hostname): ${cmd[*]}" >&2

# Workers print through torchrun; unbuffered output keeps batch logs current.
export PYTHONUNBUFFERED=1

# SIGUSR1 is SLURM's "time is nearly up" warning. torchrun does not pass it on safely: by default
# it dies of it (its workers run in sessions of their own and never hear of it), and versions that
# can forward it (--signals-to-handle) then SIGKILL the workers after the shutdown timeout,
# possibly mid-save, and exit non-zero. So torchrun runs with SIGUSR1 ignored and this script
# hands the signal straight to the workers. They save and exit 0, and torchrun then exits 0 as
# after a normal run.
torchrun_pid=
interrupted=0
# The workers: the first processes below torchrun that run its interpreter, so torchrun's children,
# or with --nsys nsys's. Processes they start themselves are left alone.
# shellcheck disable=SC2317,SC2329  # (the traps below call these functions)
workers_below() {
    local child
    for child in $(pgrep -P "$1"); do
        if [[ $(readlink "/proc/$child/exe") == "$2" ]]; then echo "$child"; else workers_below "$child" "$2"; fi
    done
}
# shellcheck disable=SC2317,SC2329
forward_to_workers() {
    interrupted=1
    echo "launch/torchrun.sh: SIGUSR1 received, asking the workers to save and stop" >&2
    local workers=()
    if [[ -n $torchrun_pid ]]; then
        mapfile -t workers < <(workers_below "$torchrun_pid" "$(readlink "/proc/$torchrun_pid/exe")")
    fi
    if ((${#workers[@]} == 0)); then
        echo "launch/torchrun.sh: no worker to signal yet" >&2
    else
        kill -USR1 "${workers[@]}" 2>/dev/null || true  # one may have ended meanwhile
    fi
}
# SIGTERM/SIGINT/SIGHUP: torchrun handles these itself (it signals the workers, then SIGKILLs them
# after the shutdown timeout). This script passes them on, in case only it was signalled (a
# duplicate is harmless), and keeps waiting so that it exits last.
# shellcheck disable=SC2317,SC2329
forward_to_torchrun() {
    interrupted=1
    if [[ -n $torchrun_pid ]]; then kill -s "$1" "$torchrun_pid" 2>/dev/null || true; fi
}
trap forward_to_workers USR1
trap 'forward_to_torchrun TERM' TERM
trap 'forward_to_torchrun INT' INT
trap 'forward_to_torchrun HUP' HUP

(
    trap '' USR1
    exec "${cmd[@]}"
) &
torchrun_pid=$!

# A trapped signal makes "wait" return early (status > 128) while torchrun still runs: wait again
# until a wait ends without a signal. 127 means an earlier pass already collected the exit status.
status=
while true; do
    interrupted=0
    rc=0
    wait "$torchrun_pid" || rc=$?
    if ((rc == 127)) && [[ -n $status ]]; then break; fi
    status=$rc
    if ((!interrupted)); then break; fi
done
exit "$status"
