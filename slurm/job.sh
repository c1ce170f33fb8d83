# The part of a dpo-dist SLURM job that slurm/train.sbatch and slurm/precompute_ref.sbatch share.
# Sourced by them; not a job script itself. docs/cluster.md explains the whole flow.
#
# Environment knobs (set them at submit time: sbatch passes the submitting shell's environment):
#   GPUS_PER_NODE      processes per node. Default: the GPUs SLURM gave the job on a node
#                      (--gpus-per-node / --gres), else the GPUs nvidia-smi lists, else 1 (CPU nodes).
#   LAUNCHER           torchrun (default): srun starts slurm/torchrun_node.py, one per node;
#                      deepspeed: srun starts slurm/deepspeed_node.sh (`deepspeed --no_ssh`), one per node.
#   DPO_MASTER_ADDR    rendezvous host. Default: the first node of the allocation (rank 0 runs there).
#   DPO_MASTER_PORT    rendezvous port. Default: 20000 + job id mod 10000, or a free port if that
#                      one is taken on the first node.
#   PYTHON             interpreter (default: `python` on the PATH the job inherited).
#   TORCHRUN_ARGS      extra torchrun arguments, e.g. "--rdzv-conf read_timeout=600".
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, ... reach every rank unchanged
#                      (docs/cluster.md, "Across nodes: interfaces and timeouts").

set -uo pipefail

dpo_log() { echo "[dpo-dist $(date +%T)] $*"; }

# dpo_job SCRIPT ON_USR1 CONFIG [section.key=value ...]
#   SCRIPT   launch/train.py or launch/precompute_ref.py (relative to the checkout)
#   ON_USR1  what SIGUSR1 to the batch shell (--signal=B:USR1@<grace>, scancel --signal=USR1 --batch)
#            does: "checkpoint" forwards it to every rank, which finish the step, checkpoint and
#            exit 75, and the job then requeues itself; "requeue" requeues at once (for work that
#            resumes by itself from what it finished, like the reference precompute).
dpo_job() {
    local script=$1 on_usr1=$2
    shift 2
    # Before anything else: bash's default for SIGUSR1 is to die.
    DPO_USR1=0
    case $on_usr1 in
    checkpoint) trap 'DPO_USR1=1; dpo_log "SIGUSR1: every rank finishes its step, checkpoints and exits 75"; kill -USR1 "${DPO_STEP:-none}" 2>/dev/null' USR1 ;;
    requeue) trap 'DPO_USR1=1; dpo_log "SIGUSR1: requeueing; the rerun continues from what is finished"; scontrol requeue "$SLURM_JOB_ID"' USR1 ;;
    esac

    if [ $# -lt 1 ] || [ ! -f "$1" ]; then
        echo "error: ${1:+config $1 not found (relative to $PWD); }usage: sbatch [sbatch options] $DPO_SBATCH CONFIG [section.key=value ...]" >&2
        exit 2
    fi
    local python=${PYTHON:-python}
    local nnodes=$SLURM_JOB_NUM_NODES

    local nproc=${GPUS_PER_NODE:-}
    if [ -z "$nproc" ]; then
        nproc=${SLURM_GPUS_ON_NODE:-0}
        if [ "$nproc" = 0 ] && command -v nvidia-smi >/dev/null; then
            nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
        fi
        [ "$nproc" -gt 0 ] 2>/dev/null || nproc=1
    fi

    local addr=${DPO_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    if ! getent hosts "$addr" >/dev/null; then
        echo "error: the first node's name '$addr' does not resolve on $(hostname); fix DNS or /etc/hosts on the nodes, or set DPO_MASTER_ADDR to its IP address" >&2
        exit 2
    fi
    local port=${DPO_MASTER_PORT:-$("$python" - "$SLURM_JOB_ID" <<'EOF'
import socket, sys
port = 20000 + int(sys.argv[1]) % 10000  # same on every node of the job, differs between jobs
with socket.socket() as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds: TIME_WAIT is no conflict
    try:
        sock.bind(("", port))
    except OSError:  # taken on this (the first) node: let the kernel pick a free one
        sock.bind(("", 0))
        port = sock.getsockname()[1]
print(port)
EOF
)}

    # One task per node with every CPU the job holds there (srun 22.05 gives a step 1 CPU per task
    # unless told; torchrun then starts the node's processes inside that task). A task that exits
    # non-zero ends the step on every node at once, instead of leaving the others to wait in a
    # collective until deepspeed.timeout_minutes. So that a preempted node (its ranks exit 75 a
    # moment apart from the other nodes') does not end the others mid-exit, the node launchers
    # exit 0 after a preemption, and node 0 (this one) leaves a mark in DPO_PREEMPTED_FILE.
    local srun=(srun --nodes="$nnodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"
                --kill-on-bad-exit=1 --label)
    export DPO_PREEMPTED_FILE=${TMPDIR:-/tmp}/dpo-preempted-$SLURM_JOB_ID
    rm -f "$DPO_PREEMPTED_FILE"
    local cmd
    case ${LAUNCHER:-torchrun} in
    torchrun)
        cmd=("$python" "$DPO_DIST_ROOT/slurm/torchrun_node.py" --nnodes="$nnodes" --nproc_per_node="$nproc"
             --master_addr="$addr" --master_port="$port" ${TORCHRUN_ARGS:-}
             "$DPO_DIST_ROOT/$script" --config "$@") ;;
    deepspeed)
        cmd=(bash "$DPO_DIST_ROOT/slurm/deepspeed_node.sh" "$nproc" --master_addr="$addr" --master_port="$port"
             "$DPO_DIST_ROOT/$script" --config "$@") ;;
    *)
        echo "error: LAUNCHER=$LAUNCHER; use torchrun or deepspeed" >&2
        exit 2 ;;
    esac

    dpo_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $nnodes node(s) x $nproc process(es)," \
            "rendezvous $addr:$port, ${LAUNCHER:-torchrun}; NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-auto}" \
            "GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-auto}"
    dpo_log "${srun[*]} ${cmd[*]}"

    # The step runs in the background and the shell waits: bash runs a trap only between
    # commands, so a foreground srun would hold the signal until training ended.
    "${srun[@]}" "${cmd[@]}" &
    DPO_STEP=$!
    while kill -0 "$DPO_STEP" 2>/dev/null; do
        wait "$DPO_STEP"  # returns early (status > 128) whenever a trap has run
    done
    wait "$DPO_STEP"
    local status=$?

    if [ "$status" = 0 ] && [ -e "$DPO_PREEMPTED_FILE" ]; then
        rm -f "$DPO_PREEMPTED_FILE"
        dpo_log "preempted: every rank checkpointed and exited 75; requeueing job $SLURM_JOB_ID (it resumes from the checkpoint)"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        dpo_log "scontrol requeue failed: resubmit the same command to resume"
        exit 75
    elif [ "$status" != 0 ]; then
        dpo_log "failed with exit status $status$([ "$DPO_USR1" = 1 ] && echo ' after SIGUSR1'); the rank that failed first is named above"
    else
        dpo_log "done"
    fi
    exit "$status"
}
