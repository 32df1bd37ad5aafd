"""A real two-node Slurm cluster on this one machine, for the slurm/ tests.

munged and slurmctld run in this network namespace; each slurmd "node" runs in its own network namespace
(a veth on a bridge, so every node has its own IP and `eth0`), its own UTS namespace (so `hostname` is the
node name) and its own mount namespace (so a private /etc/hosts resolves node names). Filesystems are shared,
as on a cluster with a shared filesystem. All state lives in one temporary directory; every daemon is tracked
by pid, and teardown kills daemons and job processes and deletes the namespaces and links even after a failure.
A previous crashed run's leftovers (namespaces, bridge, daemons in the pid registry) are removed at startup.

Cgroup-free on purpose (proctrack/linuxproc, task/none): it must run inside containers.
Job records: no slurmdbd, so final states come from the jobcomp/filetxt plugin (one line per finished job)
plus `scontrol show job` while the controller still holds the job (MinJobAge is long).
"""
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm.jobs import ACTIVE, parse_records

PREFIX = "slt"                       # every namespace / link / temp dir this module creates starts with it
BRIDGE = f"{PREFIX}br0"
SUBNET = "10.77.0"                   # controller at .1, nodes at .11, .12, ...
NODES = ("nodea", "nodeb")
CPUS_PER_NODE = 4                    # declared, not real: lets training and eval_watch share the two cores
REGISTRY = Path(tempfile.gettempdir()) / f"{PREFIX}-cluster.pids"   # pids of the last run, for crash cleanup
NODE_IFNAME = "eth0"                 # the interface name inside every node: GLOO_SOCKET_IFNAME


class ClusterError(RuntimeError):
    pass


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def check_slurm_installed() -> None:
    """Debian's slurm-wlm and munge (and iproute2, util-linux for the namespaces): .ci/run installs them on a fresh
    machine, before the test command."""
    needed = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge",
              "ip": "iproute2", "nsenter": "util-linux"}
    missing = sorted({pkg for binary, pkg in needed.items() if not shutil.which(binary)})
    if missing:
        raise ClusterError(f"the Slurm cluster tests need {' '.join(missing)}: run .ci/run as root (it installs them), "
                           f"or apt-get install {' '.join(missing)}; or leave these tests out with -m 'not slurm'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _kill_pids(pids) -> None:
    """SIGKILL: the cluster's state is thrown away, so nothing needs a graceful shutdown."""
    for pid in pids:
        if pid > 1 and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _netns_pids(ns: str) -> list[int]:
    done = _run("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in done.stdout.split()]


def cluster_fixture():
    """Generator body for a pytest fixture: a started cluster, torn down whatever happens."""
    cluster = SlurmCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def cleanup_leftovers() -> None:
    """Remove what a crashed earlier run left: daemons from the registry, node namespaces, the bridge."""
    if REGISTRY.exists():
        for line in REGISTRY.read_text().split():
            pid = int(line)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if any(d in cmdline for d in (b"munged", b"slurmctld", b"slurmd")):   # not a reused pid
                _kill_pids([pid])
        REGISTRY.unlink()
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(f"{PREFIX}-"):
            _kill_pids(_netns_pids(ns))
            _run("ip", "netns", "delete", ns, check=False)
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        _run("ip", "link", "delete", BRIDGE, check=False)
    for i in range(len(NODES)):   # a node's veth outlives its namespace's name while the namespace lingers
        _run("ip", "link", "delete", f"{PREFIX}v{i}", check=False)


class SlurmCluster:
    """Start with .start(), always .stop(). .env is the environment for sbatch/squeue/scontrol clients."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))   # short: munge's socket path must fit 108 bytes
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.log_dir = self.root / "log"
        self.jobcomp = self.log_dir / "jobcomp.txt"
        self.controller_host = socket.gethostname().split(".")[0]
        self.controller_addr = f"{SUBNET}.1"
        self.node_addrs = {n: f"{SUBNET}.{11 + i}" for i, n in enumerate(NODES)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        check_slurm_installed()
        cleanup_leftovers()
        self.root.chmod(0o755)                        # munge wants its socket reachable by every user
        for sub in ("munge", "log", "ctld", "spool", "run"):
            (self.root / sub).mkdir(mode=0o755)
        self._network()
        self._write_config()
        self._start_munge()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)], self.log_dir / "slurmctld.out")
        self._wait_for(lambda: "is UP" in self._scontrol("ping"), "slurmctld to answer", 30)
        for node in NODES:
            self._spawn(f"slurmd-{node}", self._in_node(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]),
                        self.log_dir / f"slurmd-{node}.out")
        self._wait_for(self._all_nodes_idle, "both slurmd nodes to register idle", 60)
        return self

    def stop(self) -> None:
        for name in reversed(list(self.procs)):       # nodes first, then controller, then munge
            if name.startswith("slurmd-"):
                # slurmstepd and job processes outlive slurmd: everything in the node's namespace goes
                _kill_pids(_netns_pids(self._ns(name.removeprefix("slurmd-"))) + [self.procs[name].pid])
        _kill_pids([p.pid for p in self.procs.values()])
        for p in self.procs.values():
            p.wait(timeout=10)
        for node in NODES:
            _run("ip", "netns", "delete", self._ns(node), check=False)
        _run("ip", "link", "delete", BRIDGE, check=False)
        REGISTRY.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # --- queries used by tests ---------------------------------------------------------------------------------
    def _scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True).stdout

    def squeue(self) -> list[str]:
        """Ids of the jobs the controller has pending or running."""
        return subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True,
                              text=True).stdout.split()

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as dicts (JobState, ExitCode, Restarts, ...): one per array task, [] once forgotten."""
        out = self._scontrol("show", "job", "-o", str(job_id))
        return parse_records(out)

    def job_state(self, job_id: str) -> str:
        """The job's state; an array's distinct task states joined by commas ("COMPLETED" when all agree)."""
        return ",".join(sorted({r.get("JobState", "") for r in self.job_records(job_id)}))

    def completion_records(self) -> list[dict[str, str]]:
        """jobcomp/filetxt lines: one per job end, requeues included (JobId, Name, JobState, ExitCode, ...)."""
        if not self.jobcomp.exists():
            return []
        return parse_records(self.jobcomp.read_text())

    def wait_jobs(self, job_ids, timeout: float) -> dict[str, str]:
        """Wait until every job (every task of an array) has ended; returns {job id: job_state}."""
        deadline = time.monotonic() + timeout
        while True:
            states = {str(j): self.job_state(j) for j in job_ids}
            if all(s and not ACTIVE & set(s.split(",")) for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise ClusterError(f"jobs not finished after {timeout:.0f}s: {states}")
            time.sleep(0.5)

    def logs_tail(self, chars: int = 3000) -> str:
        """The daemons' logs, for assertion messages when a test fails."""
        parts = []
        for f in sorted(self.log_dir.glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # --- setup pieces ------------------------------------------------------------------------------------------
    @staticmethod
    def _ns(node: str) -> str:
        return f"{PREFIX}-{node}"

    def _network(self) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{self.controller_addr}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        hosts = [f"127.0.0.1 localhost", f"{self.controller_addr} {self.controller_host}"]
        for i, (node, addr) in enumerate(self.node_addrs.items()):
            ns, veth = self._ns(node), f"{PREFIX}v{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns)
            _run("ip", "link", "set", veth, "master", BRIDGE)
            _run("ip", "link", "set", veth, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", NODE_IFNAME)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", NODE_IFNAME, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            hosts.append(f"{addr} {node}")
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")

    def _in_node(self, node: str, cmd: list[str]) -> list[str]:
        """Run cmd as node: its network namespace, its hostname, its /etc/hosts (exec keeps the pid)."""
        script = 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self._ns(node)}", "unshare", "--uts", "--mount",
                "sh", "-c", script, node, str(self.root / "hosts"), *cmd]

    def _write_config(self) -> None:
        r = self.root
        lines = [
            "ClusterName=slt",
            f"SlurmctldHost={self.controller_host}({self.controller_addr})",
            f"SlurmctldPort={_free_port()}",
            "SlurmdPort=6818",                       # per node namespace, so never taken by anything else
            "SlurmUser=root", "SlurmdUser=root",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/ctld", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log", f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            f"PlugStackConfig={r}/plugstack.conf",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={self.jobcomp}",
            "MpiDefault=none", "MailProg=/bin/true", "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",     # trust the declared CPUs: both nodes share the real cores
            "ReturnToService=2", "MinJobAge=3600", "KillWait=10",
            "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "MessageTimeout=20",
            "SchedulerParameters=sched_interval=2",
            *(f"NodeName={n} NodeAddr={a} CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN"
              for n, a in self.node_addrs.items()),
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        (r / "plugstack.conf").write_text("")

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        d = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed",
                               f"--log-file={self.log_dir}/munged.log"], self.log_dir / "munged.out")
        self._wait_for(self.munge_socket.exists, "munged's socket", 15)

    def _spawn(self, name: str, cmd: list[str], out: Path) -> None:
        with open(out, "ab") as f:
            self.procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)
        with open(REGISTRY, "a") as f:
            f.write(f"{self.procs[name].pid}\n")

    def _all_nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                             text=True).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n, "").startswith("idle") for n in NODES)

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f}s"
                raise ClusterError(f"waiting for {what}: {why}\n{self.logs_tail()}")
            time.sleep(0.3)


# --- pipeline files for the slurm/ tests ---------------------------------------------------------------------
def write_env_file(path: Path, values: dict) -> Path:
    """A pipeline or site file: KEY=value lines, each value shell-quoted (paths with spaces stay whole)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, (list, tuple)):   # a bash array
            lines.append(f"{key}=({' '.join(shlex.quote(str(v)) for v in value)})")
        else:
            lines.append(f"{key}={shlex.quote(str(value))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def split_inputs(repo: Path, text: Path, out_dir: Path, files: int = 2) -> Path:
    """Tiny Shakespeare as jsonl documents in `files` files (one tokenize unit, so one array task, each)."""
    subprocess.run([sys.executable, str(repo / "slurm" / "demo_data.py"), str(out_dir), "--text", str(text),
                    "--files", str(files)], check=True, capture_output=True)
    return out_dir
