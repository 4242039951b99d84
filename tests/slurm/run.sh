#!/usr/bin/env bash
# A real SLURM test on this one machine, as root: Debian's slurmctld, slurmd and munge, a throwaway
# cluster of two nodes (each slurmd in its own network namespace, with its own address and host
# name, so that srun, torchrun's rendezvous and gloo really cross "machines"), and
# launch/slurm/epas.sbatch submitted to it in CPU mode with the tiny preset:
#
#   1. a short run: the job COMPLETES, the loss is logged, a checkpoint is written;
#   2. a longer run, pre-empted with "scancel --batch --signal=USR1" (the same path as SLURM's
#      time-limit warning, --signal=B:USR1@120): the trainer saves a checkpoint, the batch script
#      requeues the job, and the requeued job resumes from that checkpoint and COMPLETES.
#
# Usage: tests/slurm/run.sh      (installs slurmctld, slurmd, slurm-client, munge and iproute2 if absent)
# Environment: PYTHON (the interpreter with the project installed; default .venv/bin/python),
#   EPAS_SLURM_NODES (2, or 1 for a single node without network namespaces),
#   EPAS_SLURM_SUBNET (the /24 for the node namespaces, default 10.213.77),
#   EPAS_SLURM_KEEP=1 keeps the work directory (logs, checkpoints) for inspection.
# Everything it starts is stopped on exit; the test gives up after EPAS_SLURM_TIMEOUT (280) s.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$repo/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=$(command -v python3)
# Absolute (the jobs run elsewhere), without resolving a virtual environment's symbolic link.
if [[ $PYTHON == */* ]]; then PYTHON=$(realpath -s "$PYTHON"); fi
export PYTHON
nodes_wanted=${EPAS_SLURM_NODES:-2}
subnet=${EPAS_SLURM_SUBNET:-10.213.77}
deadline=$((SECONDS + ${EPAS_SLURM_TIMEOUT:-280}))
passed=0

say() { echo "[slurm-test +${SECONDS}s] $*"; }

if ((EUID != 0)); then
    echo "tests/slurm/run.sh must run as root (it starts SLURM and munge daemons)" >&2
    exit 2
fi

# ---- install ------------------------------------------------------------------------------------
packages=()
for tool in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge ip:iproute2 nsenter:util-linux; do
    command -v "${tool%%:*}" >/dev/null || packages+=("${tool#*:}")
done
if ((${#packages[@]})); then
    say "installing ${packages[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
say "$(slurmctld -V), $(munged --version 2>&1 | head -n1)"

# ---- bookkeeping and clean-up --------------------------------------------------------------------
work=$(mktemp -d /tmp/epas-slurm.XXXXXX)
chmod 755 "$work"
daemons=()     # PIDs of munged, slurmctld and the slurmd
namespaces=()  # network namespaces we created
bridge=
jobs_submitted=()

show_logs() {
    local file
    for file in "$work"/job-*.out "$work"/slurmctld.log "$work"/slurmd-*.log; do
        [[ -f $file ]] || continue
        echo "----- $file (last 40 lines)" >&2
        tail -n 40 "$file" >&2
    done
}

fail() {
    echo "[slurm-test +${SECONDS}s] FAIL: $*" >&2
    show_logs
    echo "slurm: $passed passed, 1 failed"
    exit 1
}

teardown_network() {
    local ns
    for ns in "${namespaces[@]}"; do
        ip netns del "$ns" 2>/dev/null
    done
    namespaces=()
    if [[ -n $bridge ]]; then ip link del "$bridge" 2>/dev/null; fi
    bridge=
}

cleanup() {
    local status=$? job pid ns
    set +e
    for job in "${jobs_submitted[@]}"; do scancel "$job" 2>/dev/null; done
    # Cancelled jobs need a moment to end: their slurmstepd would outlive slurmd otherwise.
    for _ in $(seq 20); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.5
    done
    for pid in "${daemons[@]}"; do kill "$pid" 2>/dev/null; done
    # Whatever still runs inside our namespaces (a stuck slurmstepd or trainer) is ours.
    for ns in "${namespaces[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    done
    for pid in "${daemons[@]}"; do
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null
    done
    teardown_network
    if [[ ${EPAS_SLURM_KEEP:-0} == 1 ]]; then
        echo "work directory kept: $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free TCP port on this machine (for slurmctld and slurmd, so a system SLURM cannot clash).
free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# ---- network: two namespaces on a bridge, or loopback for one node --------------------------------
# in_node I CMD...: run CMD as "node I": in that node's network namespace, with its own host name
# and its own /etc/hosts (bind-mounted in a private mount namespace; /sys and the cgroup file
# systems stay as they are, which slurmd needs).
in_node() {
    local node=$1
    shift
    # shellcheck disable=SC2016  # (the inner sh expands $1, $2 and $@)
    nsenter --net="/run/netns/${namespaces[node - 1]}" unshare --uts --mount \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' \
        sh "$work/hosts" "node$node" "$@"
}

setup_two_nodes() {
    bridge=epasbr$$
    bridge=${bridge:0:15}
    ip link add "$bridge" type bridge 2>/dev/null || { bridge=; return 1; }
    ip addr add "$subnet.1/24" dev "$bridge"
    ip link set "$bridge" up
    local i ns
    for i in 1 2; do
        ns=epas$$-node$i
        ip netns add "$ns" || return 1
        namespaces+=("$ns")
        ip link add "epas$$v$i" type veth peer name eth0 netns "$ns" || return 1
        ip link set "epas$$v$i" master "$bridge" up
        ip -n "$ns" addr add "$subnet.1$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
    # node1 and node2 resolve inside the namespaces (see in_node) as they would on a real cluster.
    printf '127.0.0.1 localhost\n%s.11 node1\n%s.12 node2\n' "$subnet" "$subnet" >"$work/hosts"
    # Bridged traffic is filtered on some hosts (Docker's iptables rules): check node2 -> node1.
    in_node 1 timeout 10 "$PYTHON" -c '
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 18999)); s.listen(); s.settimeout(8); s.accept()' "$subnet.11" &
    local server=$!
    in_node 2 timeout 10 "$PYTHON" -c '
import socket, sys, time
for _ in range(50):
    try:
        socket.create_connection((sys.argv[1], 18999), timeout=1); break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(1)' "$subnet.11" || { kill "$server" 2>/dev/null; return 1; }
    wait "$server" || return 1
}

controller_addr=127.0.0.1
node_addrs=(127.0.0.1)
if ((nodes_wanted == 2)); then
    if setup_two_nodes; then
        controller_addr=$subnet.1
        node_addrs=("$subnet.11" "$subnet.12")
    else
        say "network namespaces unavailable or bridged traffic blocked: falling back to one node"
        teardown_network
        nodes_wanted=1
    fi
fi
nnodes=$nodes_wanted

# ---- munge, with its own key and socket ---------------------------------------------------------
mkdir -p "$work/munge"
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$work/munge/munge.key"
munge_socket=$work/munge/munge.socket
munged --foreground --force --socket="$munge_socket" --key-file="$work/munge/munge.key" \
    --log-file="$work/munge/munged.log" --pid-file="$work/munge/munged.pid" \
    --seed-file="$work/munge/munged.seed" &
daemons+=($!)

# ---- slurm.conf ---------------------------------------------------------------------------------
ctld_port=$(free_port)
slurmd_port=$(free_port)
ctld_host=$(hostname -s)
{
    echo "ClusterName=epastest"
    echo "SlurmctldHost=$ctld_host($controller_addr)"
    echo "SlurmctldPort=$ctld_port"
    echo "SlurmdPort=$slurmd_port"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # A requeued job may start again only when the credentials of its previous run have expired
    # (its BeginTime): 120 s by default, 20 s here to keep the test short.
    echo "AuthInfo=socket=$munge_socket,cred_expire=20"
    echo "StateSaveLocation=$work/ctld"
    echo "SlurmdSpoolDir=$work/spool-%n"
    echo "SlurmctldPidFile=$work/slurmctld.pid"
    echo "SlurmdPidFile=$work/slurmd-%n.pid"
    echo "SlurmctldLogFile=$work/slurmctld.log"
    echo "SlurmdLogFile=$work/slurmd-%n.log"
    # No cgroups in a test VM or container: track a step's processes by their parent chain.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "MpiDefault=none"
    echo "SchedulerType=sched/backfill"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    # Finished jobs stay visible to "scontrol show job" for the checks below.
    echo "MinJobAge=600"
    echo "KillWait=10"
    echo "JobRequeue=1"
    for i in $(seq "$nnodes"); do
        echo "NodeName=node$i NodeAddr=${node_addrs[i - 1]} CPUs=1 RealMemory=1000 State=UNKNOWN"
    done
    echo "PartitionName=test Nodes=node[1-$nnodes] Default=YES MaxTime=30 State=UP"
} >"$work/slurm.conf"
# slurmd reads cgroup.conf beside slurm.conf. Without systemd (a container, a test VM), it must
# not ask systemd for its cgroup.
printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' >"$work/cgroup.conf"
export SLURM_CONF=$work/slurm.conf
mkdir -p "$work/ctld"
for i in $(seq "$nnodes"); do mkdir -p "$work/spool-node$i"; done

slurmctld -D -i -f "$SLURM_CONF" >"$work/slurmctld.stdout" 2>&1 &
daemons+=($!)
for i in $(seq "$nnodes"); do
    if ((nnodes == 2)); then
        # Own network namespace and host name: node$i is a separate machine as far as SLURM,
        # torchrun and gloo can tell (they share this machine's files, as nodes share storage).
        in_node "$i" slurmd -D -N "node$i" -f "$SLURM_CONF" >"$work/slurmd-node$i.stdout" 2>&1 &
    else
        slurmd -D -N "node$i" -f "$SLURM_CONF" >"$work/slurmd-node$i.stdout" 2>&1 &
    fi
    daemons+=($!)
done

say "waiting for $nnodes node(s) to come up"
for _ in $(seq 60); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)
    ((idle >= nnodes)) && break
    sleep 0.5
done
((idle >= nnodes)) || {
    cat "$work"/*.stdout >&2
    sinfo -N >&2 || true
    echo "slurm: 0 passed, 1 failed"
    exit 1
}
sinfo -N

# ---- helpers ------------------------------------------------------------------------------------
job_field() { # job_field JOBID FIELD -> value from "scontrol show job"
    { scontrol -o show job "$1" 2>/dev/null || true; } | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1
}

wait_for_state() { # wait_for_state JOBID STATE...: until the job is in one of the states
    local job=$1 state
    shift
    while ((SECONDS < deadline)); do
        state=$(job_field "$job" JobState)
        for wanted in "$@"; do
            [[ $state == "$wanted" ]] && return 0
        done
        case $state in
            FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE)
                fail "job $job ended $state (waiting for $*)" ;;
        esac
        sleep 1
    done
    fail "job $job still $(job_field "$job" JobState) at the time limit (waiting for $*)"
}

wait_for_log() { # wait_for_log FILE REGEX
    while ((SECONDS < deadline)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.5
    done
    fail "'$2' never appeared in $1"
}

submit() { # submit NAME ARGS... -> job id; epas.sbatch in CPU mode with the tiny preset
    local name=$1
    shift
    (
        cd "$repo"
        EPAS_CPU=1 sbatch --parsable --job-name="$name" --nodes="$nnodes" --time=10 \
            --output="$work/job-$name.out" launch/slurm/epas.sbatch \
            --config configs/tiny_cpu.yaml data.mock=true optimizer.warmup_steps=2 \
            "logging.tensorboard_dir=$work/tb-$name" "$@"
    )
}

# ---- 1. a short run completes --------------------------------------------------------------------
job=$(submit short training.train_steps=6 training.log_interval=2 "checkpoint.dir=$work/ckpt-short")
jobs_submitted+=("$job")
say "submitted job $job (6 steps on $nnodes node(s))"
wait_for_state "$job" COMPLETED
[[ $(job_field "$job" ExitCode) == 0:0 ]] || fail "job $job exit code $(job_field "$job" ExitCode)"
grep -qE 'iteration +6/6 \| loss [0-9.]+' "$work/job-short.out" || fail "no loss logged in job $job's output"
[[ $(cat "$work/ckpt-short/latest" 2>/dev/null) == 6 && -d $work/ckpt-short/iter_0000006 ]] ||
    fail "no checkpoint for iteration 6 in $work/ckpt-short"
if ((nnodes == 2)); then
    grep -q "2 node(s) x 1 process(es)" "$work/job-short.out" || fail "job $job did not run on two nodes"
fi
grep -E 'iteration +6/6|saved checkpoint' "$work/job-short.out"
say "PASS: job $job COMPLETED, loss logged, checkpoint iteration 6 written"
passed=$((passed + 1))

# ---- 2. pre-emption: checkpoint, requeue, resume -------------------------------------------------
steps=150
job=$(submit preempt "training.train_steps=$steps" training.log_interval=1 "checkpoint.dir=$work/ckpt-preempt")
jobs_submitted+=("$job")
say "submitted job $job ($steps steps); pre-empting it once it trains"
wait_for_log "$work/job-preempt.out" "iteration +[0-9]+/$steps \| loss"
scancel --batch --signal=USR1 "$job"
say "sent SIGUSR1 to job $job's batch shell"
wait_for_log "$work/job-preempt.out" "requeueing job $job"
# The first run is gone once the job has been requeued (Restarts counts requeues).
while ((SECONDS < deadline)) && [[ $(job_field "$job" Restarts) == 0 ]]; do sleep 0.5; done
[[ $(job_field "$job" Restarts) -ge 1 ]] || fail "job $job was not requeued"
saved=$(sed -n 's/^received a stop signal ([A-Z0-9]*): saving at iteration \([0-9]*\).*/\1/p' "$work/job-preempt.out" | head -n1)
[[ -n $saved ]] || fail "the trainer never reported the stop signal"
((saved < steps)) || fail "job $job had finished before the signal arrived; nothing to test"
[[ -d $work/ckpt-preempt/iter_$(printf %07d "$saved") ]] || fail "no checkpoint for iteration $saved"
say "job $job saved iteration $saved and was requeued (state $(job_field "$job" JobState), Restarts=$(job_field "$job" Restarts))"
wait_for_state "$job" COMPLETED
grep -q "resuming at iteration $saved" "$work/job-preempt.out" || fail "the requeued job did not resume from iteration $saved"
[[ $(cat "$work/ckpt-preempt/latest") == "$steps" ]] || fail "the requeued job did not reach iteration $steps"
grep -E "stop signal|requeueing|resuming at|iteration +$steps/$steps|restart [0-9]" "$work/job-preempt.out"
say "PASS: job $job pre-empted at iteration $saved, requeued (Restarts=$(job_field "$job" Restarts)), resumed and COMPLETED"
passed=$((passed + 1))

echo "slurm: $passed passed, 0 failed"
