#!/bin/bash
# The deepspeed launcher for one node of a SLURM job (LAUNCHER=deepspeed in slurm/job.sh); srun
# starts it once per node:
#
#   srun --ntasks-per-node=1 slurm/deepspeed_node.sh PROCS_PER_NODE --master_addr n1 --master_port 29500 \
#       launch/train.py --config my.yaml
#
# Without ssh (`--no_ssh`), each node runs its own launcher with its `--node_rank` (SLURM_NODEID);
# the launcher still wants every host in a hostfile, so this node writes one from the allocation.
# The launcher dies of SIGUSR1 (no handler), so it runs with USR1 ignored; the trainer installs
# its own handler, which replaces the inherited SIG_IGN. Its exit status is the first failed
# rank's; 75 (preempted, checkpoint written) becomes 0 and a mark in DPO_PREEMPTED_FILE, as in
# slurm/torchrun_node.py (which says why).
set -euo pipefail
procs=$1
shift
hostfile=${TMPDIR:-/tmp}/dpo-hostfile-$SLURM_JOB_ID-$SLURM_NODEID
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$procs/" > "$hostfile"
trap '' USR1
status=0
deepspeed --hostfile "$hostfile" --no_ssh --node_rank="$SLURM_NODEID" "$@" || status=$?
rm -f "$hostfile"
if [ "$status" = 75 ] && [ -n "${DPO_PREEMPTED_FILE:-}" ]; then
    [ "$SLURM_NODEID" != 0 ] || : > "$DPO_PREEMPTED_FILE"  # node 0 runs the batch script
    exit 0
fi
exit "$status"
