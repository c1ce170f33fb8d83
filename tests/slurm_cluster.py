"""A real two-node SLURM cluster on this one machine, for tests: munged, slurmctld and two slurmd
from Debian's packages (slurm-wlm 22.05: `apt-get install munge slurmctld slurmd slurm-client`;
`.ci/run` installs them). Written from the recipe in ../shared/recipes/local-slurm/.

Two layouts (both need root):

* `netns` (the default, closer to real nodes): each slurmd runs in its own network namespace with
  its own address and hostname (n1 = 10.99.0.1, n2 = 10.99.0.2), slurmctld in a third (`ctl`,
  10.99.0.254) that holds the bridge between them; cross-node traffic goes over veth pairs and the
  bridge. The host's network gets nothing: clients (sbatch, squeue, scontrol) run inside the
  controller's namespace, which `Cluster.command` arranges.
* `localhost`: both slurmd on 127.0.0.1 with their own ports (`slurmd -N n1`, `-N n2`). No
  namespaces needed beyond mount and UTS; two "nodes" share one network stack.

Every daemon runs in the foreground as a child of this process, so it is stopped by its own PID.
Each slurmd (and so every job step) sees a private /etc/hosts that names the nodes, bind-mounted in
its own mount namespace; the host's /etc/hosts and hostname are never touched. Names of namespaces
carry this process's PID, so two test sessions on one machine do not meet.

    python tests/slurm_cluster.py [netns|localhost]    # start one by hand; Ctrl-C stops it
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("n1", "n2")


def missing_requirements() -> str | None:
    """Why a cluster cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (slurmd, network namespaces, bind-mounted /etc/hosts)"
    missing = [tool for tool in (*DAEMONS, "sbatch", "unshare", "nsenter", "mungekey") if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install munge slurmctld slurmd slurm-client)"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no /sys/fs/cgroup: slurmd 22.05 always initialises a cgroup plugin"
    return None


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (e.g. a container without CAP_NET_ADMIN)."""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """Start with `start()`, stop with `stop()`; `command([...])` wraps a client command."""

    def __init__(self, root: Path, mode: str = "netns", cpus: int | None = None):
        assert mode in ("netns", "localhost"), mode
        self.root = Path(root)
        self.mode = mode
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "etc" / "slurm.conf"
        self.hosts = self.root / "etc" / "hosts"
        self.munge_dir = self.root / "munge"
        tag = f"dposlurm{os.getpid()}"
        self.netns = {name: f"{tag}_{name}" for name in ("ctl", *NODES)}
        self.procs: list[subprocess.Popen] = []
        self.made_netns: list[str] = []

    # ---------------------------------------------------------------- clients
    def command(self, args: list[str]) -> list[str]:
        """A client command (sbatch, squeue, scontrol, ...) as it must run to reach the controller."""
        if self.mode == "netns":
            return ["nsenter", f"--net=/run/netns/{self.netns['ctl']}", *args]
        return list(args)

    @property
    def env(self) -> dict[str, str]:
        """What a client needs in its environment to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def client(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(list(args)), env={**os.environ, **self.env}, capture_output=True, text=True, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, BatchHost, ...)."""
        text = self.client("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_job(self, job_id: int, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job has ended (COMPLETED, FAILED, TIMEOUT, CANCELLED, ...); its final record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING"):
                return info
            if time.monotonic() > deadline:
                self.client("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s (cancelled)")
            time.sleep(poll)

    # ---------------------------------------------------------------- start / stop
    def start(self, timeout: float = 30.0) -> "Cluster":
        t0 = time.monotonic()
        for sub in ("etc", "state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        try:
            if self.mode == "netns":
                self._make_network()
            self._write_config()
            self._start_munged()
            self._start_in_node("ctl", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait(lambda: "UP" in self.client("scontrol", "ping", check=False).stdout, t0 + timeout, "slurmctld")
            for node in NODES:
                node_args = ["-N", node] if self.mode == "localhost" else []  # netns: node name = hostname
                self._start_in_node(node, ["slurmd", "-D", "-f", str(self.conf), *node_args])
            idle = lambda: self.client("sinfo", "-h", "-t", "idle", "-o", "%D", check=False).stdout.strip() == str(len(NODES))
            self._wait(idle, t0 + timeout, "both slurmd idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel what still runs (job steps outlive slurmd), then SIGTERM each daemon by PID (slurmd
        first, munged last), SIGKILL what outlives 15 s, and drop the namespaces."""
        if self.procs and all(proc.poll() is None for proc in self.procs):
            jobs = self.client("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.client("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while self.client("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for name in reversed(self.made_netns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made_netns.clear()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self) -> str:
        """The daemons' log tails, for a failure message."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    # ---------------------------------------------------------------- pieces
    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _make_network(self) -> None:
        ctl = self.netns["ctl"]
        try:
            self._ip("netns", "add", ctl)
        except subprocess.CalledProcessError as err:
            raise NetnsUnavailable(f"ip netns add: {err.stderr.strip()}") from None
        self.made_netns.append(ctl)
        self._ip("-n", ctl, "link", "set", "lo", "up")
        self._ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        self._ip("-n", ctl, "addr", "add", "10.99.0.254/24", "dev", "br0")
        self._ip("-n", ctl, "link", "set", "br0", "up")
        for index, node in enumerate(NODES, start=1):
            ns = self.netns[node]
            self._ip("netns", "add", ns)
            self.made_netns.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{node}", "netns", ctl)
            self._ip("-n", ns, "addr", "add", f"10.99.0.{index}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ctl, "link", "set", f"v{node}", "master", "br0")
            self._ip("-n", ctl, "link", "set", f"v{node}", "up")

    def _write_config(self) -> None:
        r = self.root
        if self.mode == "netns":
            head = ["ClusterName=dpotest", "SlurmctldHost=ctl(10.99.0.254)"]
            nodes = [f"NodeName={n} NodeAddr=10.99.0.{i} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN" for i, n in enumerate(NODES, 1)]
            hosts = ["127.0.0.1 localhost", "10.99.0.254 ctl", *(f"10.99.0.{i} {n}" for i, n in enumerate(NODES, 1))]
        else:  # one network stack: every daemon needs its own free port
            head = ["ClusterName=dpotest", "SlurmctldHost=localhost", f"SlurmctldPort={_free_port()}"]
            nodes = [
                f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
                for n in NODES
            ]
            names = re.compile(r"\s(" + "|".join(NODES) + r")(\s|$)")
            hosts = [line for line in Path("/etc/hosts").read_text().splitlines() if not names.search(line)]
            hosts.append("127.0.0.1 " + " ".join(NODES))
        settings = [
            *head,
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire and sched_interval: a requeued job starts again in seconds, not ~150 s.
            f"AuthInfo=socket={self.munge_dir}/munge.socket.2,cred_expire=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/state/slurmctld.pid",
            f"SlurmdPidFile={r}/spool/slurmd.%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "ReturnToService=2",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=300",
            *nodes,
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(settings) + "\n")
        # slurmd 22.05 always sets up a cgroup plugin; on a cgroup v2 host without systemd it must
        # not ask systemd (over dbus) for its scope. cgroup v1 hosts ignore this.
        (self.conf.parent / "cgroup.conf").write_text("IgnoreSystemd=yes\n")
        self.hosts.write_text("\n".join(hosts) + "\n")

    def _start_munged(self) -> None:
        """munged as user munge; its socket directory must be o+x, its key 0400 munge:munge."""
        import pwd

        munge = pwd.getpwnam("munge")
        self.root.chmod(0o755)
        blocked = [str(p) for p in self.root.parents if not os.stat(p).st_mode & 0o001]
        if blocked:  # e.g. pytest's tmp_path (0700): munged could not reach its socket
            raise RuntimeError(f"SLURM test cluster: {', '.join(blocked)} not searchable by other users; put the cluster elsewhere")
        self.munge_dir.mkdir(exist_ok=True)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o755)
        key = self.munge_dir / "munge.key"
        as_munge = {"user": munge.pw_uid, "group": munge.pw_gid, "extra_groups": []}
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, **as_munge)
            key.chmod(0o400)
        socket_path = self.munge_dir / "munge.socket.2"
        self._spawn(
            "munged",
            ["munged", "-F", f"--socket={socket_path}", f"--key-file={key}", f"--log-file={self.root}/log/munged.log",
             f"--pid-file={self.munge_dir}/munged.pid", f"--seed-file={self.munge_dir}/munged.seed"],
            **as_munge,
        )
        self._wait(socket_path.exists, time.monotonic() + 10, "munged")

    def _start_in_node(self, node: str, args: list[str]) -> None:
        """Run a daemon with hostname `node` and the private /etc/hosts (in netns mode, in the node's
        network namespace). nsenter, not `ip netns exec`: that one remounts /sys, and slurmd then finds
        no cgroup filesystem. Every wrapper execs, so the PID we hold is the daemon's own."""
        inner = f"hostname {node} && mount --bind {self.hosts} /etc/hosts && exec {' '.join(args)}"
        wrapper = ["unshare", "-u", "-m", "--propagation", "private", "sh", "-c", inner]
        if self.mode == "netns":
            wrapper = ["nsenter", f"--net=/run/netns/{self.netns[node]}", *wrapper]
        self._spawn(args[0], wrapper)

    def _spawn(self, name: str, args: list[str], **kwargs) -> None:
        log = open(self.root / "log" / f"{name}.{len(self.procs)}.stdout", "wb")
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, **kwargs)
        log.close()
        self.procs.append(proc)

    def _wait(self, ready, deadline: float, what: str) -> None:
        while not ready():
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: {what} did not come up ({'exited: ' + str(dead) if dead else 'timeout'})\n{self.logs()}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The two-node cluster, once per session: network-namespace nodes where iproute2 and the kernel
    allow them, else both slurmd on localhost (DPO_SLURM_MODE=localhost forces that). Skips, saying
    why, without root or without the SLURM packages."""
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no SLURM test cluster: {reason}")
    mode = os.environ.get("DPO_SLURM_MODE") or ("netns" if shutil.which("ip") else "localhost")  # ip: iproute2
    root = Path(tempfile.mkdtemp(prefix="dpo-slurm-"))  # not under pytest's tmp: munged needs o+x on the path
    cluster = Cluster(root, mode)
    try:
        cluster.start()
    except NetnsUnavailable as err:
        print(f"SLURM test cluster: {err}; falling back to localhost mode")
        cluster = Cluster(root, "localhost").start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "netns"
    reason = missing_requirements()
    if reason:
        sys.exit(f"cannot start a cluster: {reason}")
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="dpo-slurm-")), mode).start()
    prefix = " ".join(cluster.command([]))
    print(f"cluster up ({mode}); export SLURM_CONF={cluster.conf}; clients: {prefix} sbatch ...", flush=True)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        signal.sigwait(stop_signals)
    finally:
        cluster.stop()
        print("stopped", flush=True)
