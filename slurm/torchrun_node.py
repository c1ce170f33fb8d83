"""torchrun for one node of a SLURM job: what the sbatch scripts start with `srun`, one task per node.

    srun --ntasks-per-node=1 python slurm/torchrun_node.py --nnodes 2 --nproc_per_node 8 \
        --master_addr n1 --master_port 29500 launch/train.py --config my.yaml

The arguments are torchrun's; this adds `--node_rank` from SLURM_NODEID (so global ranks follow the
node order of the allocation and rank 0 sits on the first host, where the rendezvous store runs),
and changes two things about torchrun:

* SIGUSR1 does not kill the agent. SLURM delivers a signal sent to a job step (`srun` forwarding
  one, `scancel --signal=USR1 <job>`, `--signal=USR1@<grace>`) to every process of the step on
  every node: the training workers get it straight from slurmstepd and checkpoint, while a stock
  torchrun agent would die of it (USR1's default action) and its workers with it. The agent
  ignores it, and so do the workers until the trainer installs its handler (a USR1 that comes
  while the models load is dropped; at the time limit SLURM sends SIGTERM, which the trainer
  also answers with a checkpoint if KillWait gives it time).
* The exit status is the first failed worker's, not always 1 (a worker killed by signal N gives
  128+N, as in a shell), and that rank and its node are named in one line starting `dpo-dist:`.
  Except after a preemption (the workers exit 75: "checkpoint written; requeue me") when
  DPO_PREEMPTED_FILE is set: then the file is created and the status is 0, because `srun
  --kill-on-bad-exit` would end the other nodes' tasks the moment the first node exits non-zero,
  and a node still exiting would report "Terminated" in place of 75. slurm/job.sh sets the
  variable and reads the file; node 0 (where the batch script runs) writes it.
"""

import os
import signal
import socket
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    node_rank = os.environ.get("SLURM_NODEID")
    if node_rank is None:
        print("dpo-dist: torchrun_node.py runs under srun (SLURM_NODEID is not set)", file=sys.stderr)
        return 2
    # Ignored here and, inherited across exec, in the workers until the trainer installs its
    # handler: a USR1 during startup is dropped rather than killing a rank that cannot checkpoint yet.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        torchrun_main([f"--node_rank={node_rank}", *argv])
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        if code == 75:
            what = "exited 75: preempted, checkpoint written"
        elif failure.exitcode < 0:
            what = f"was killed by signal {-failure.exitcode}"
        else:
            what = f"failed with exit code {code}"
        print(f"dpo-dist: rank {rank} on node {socket.gethostname()} (node_rank {node_rank}) {what}", file=sys.stderr, flush=True)
        if code == 75 and os.environ.get("DPO_PREEMPTED_FILE"):
            if node_rank == "0":  # the batch script's node: the first of the allocation
                with open(os.environ["DPO_PREEMPTED_FILE"], "w"):
                    pass
            return 0
        return code
    except SignalException as err:  # SLURM ends the step (scancel, time limit, another node failed)
        print(f"dpo-dist: torchrun on node {socket.gethostname()} stopped its workers on {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + err.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
