"""A real one-node SLURM cluster on this machine, for tests: munged, slurmctld and slurmd started from
Debian's packages (`munge`, `slurmctld`, `slurmd`, `slurm-client`; `.ci/run` installs them) under a
private folder, and stopped by their pid files whatever happens.

Nothing global is touched or needed: munged gets its own key and socket (`AuthInfo=socket=...`), the
daemons their own slurm.conf (SLURM_CONF / -f), state, spool, pid and log files, and free ports. So
a system munged or SLURM already running here, or a cluster of an earlier or concurrent test run, is
left alone and does not interfere; the daemons of an earlier run whose owning process died (a test
killed before its teardown) are stopped by their pid files when the next cluster starts.

    with one_node_cluster() as cluster:
        job = cluster.sbatch("--ntasks=2", "job.sh", env=env)
        cluster.job(job)["JobState"]
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

# Each program the cluster runs, and the Debian package that provides it.
PACKAGES = {"mungekey": "munge", "munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd",
            "sbatch": "slurm-client", "squeue": "slurm-client", "scancel": "slurm-client",
            "scontrol": "slurm-client", "sinfo": "slurm-client", "srun": "slurm-client"}
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
# Unix socket paths must stay under 108 bytes: the cluster lives in a short folder under /tmp.
_ROOT = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
_PREFIX = "dpdmd-slurm-"
NODE = "localhost"
CPUS = 2


def missing_packages() -> list[str]:
    """'PROGRAM not found: apt-get install PACKAGE' for each program of PACKAGES not installed."""
    return [f"{prog} not found: apt-get install {pkg}" for prog, pkg in PACKAGES.items()
            if shutil.which(prog, path=_SEARCH_PATH) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def _first_job_id() -> int:
    """A random first job id whose jax.distributed coordinator port (JAX's SLURM detection: job id
    % 4096 + 61440) is free: concurrent clusters (other test sessions) then pick other ports."""
    for _ in range(100):
        job_id = random.randrange(10_000, 1_000_000)
        if _port_is_free(job_id % 4096 + 61440):
            return job_id
    raise RuntimeError("no free port in 61440..65535 for jax.distributed's coordinator")


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_daemon(pid_file: str, marker: str, timeout_s: float = 10.0) -> None:
    """SIGTERM (then SIGKILL) the daemon whose pid `pid_file` holds, if that pid is still the daemon
    started with `marker` (its private config / socket path) on its command line: a pid reused by
    another process is never signalled."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    if marker not in _cmdline(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while _alive(pid) and marker in _cmdline(pid) and time.time() < deadline:
        time.sleep(0.1)
    if _alive(pid) and marker in _cmdline(pid):
        os.kill(pid, signal.SIGKILL)


class Cluster:
    """One node (`localhost`, CPUS CPUs) in one partition, all under `root`."""

    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge", "munge.sock")
        self.pid_files = {"slurmd": os.path.join(root, "slurmd.pid"),
                          "slurmctld": os.path.join(root, "slurmctld.pid"),
                          "munged": os.path.join(root, "munge", "munged.pid")}
        self.logs = {"slurmctld": os.path.join(root, "slurmctld.log"), "slurmd": os.path.join(root, "slurmd.log"),
                     "munged": os.path.join(root, "munge", "munged.log")}

    # -- clients --------------------------------------------------------------------------------

    def env(self, base: dict | None = None) -> dict:
        """`base` (default: this process's environment) for this cluster's clients and jobs: its
        SLURM_CONF, and none of an enclosing SLURM job's or the user's SLURM_* / SBATCH_* settings."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = self.conf
        return env

    def run(self, *cmd: str, env: dict | None = None, check: bool = True, timeout: float = 60) -> str:
        """Runs a SLURM client command (sinfo, scontrol, ...) against this cluster; its stdout."""
        r = subprocess.run(cmd, env=self.env(env), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}\n{self.log_tails()}")
        return r.stdout

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submits a batch job (sbatch ARGS); its job id."""
        return self.run("sbatch", "--parsable", *args, env=env).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, ExitCode, Restarts, ...); finished jobs stay
        visible for MinJobAge (300 s)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def node_state(self) -> str:
        return self.run("sinfo", "--noheader", f"--nodes={NODE}", "--format=%T").strip()

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for path in self.logs.values():
            with contextlib.suppress(OSError), open(path, errors="replace") as f:
                out.append(f"--- {path} (last {lines} lines)\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    # -- daemons --------------------------------------------------------------------------------

    def write_config(self) -> None:
        os.makedirs(os.path.join(self.root, "munge"))
        for d in ("state", "spool"):
            os.makedirs(os.path.join(self.root, d))
        user = getpass.getuser()
        r = self.root
        lines = [
            "ClusterName=dpdmdtest",
            f"SlurmctldHost={NODE}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Our munged; cred_expire also sets how long a requeued job waits before it starts again.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "MpiDefault=none",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={self.logs['slurmd']}",
            "ReturnToService=2",
            f"FirstJobId={_first_job_id()}",
            # Pending (e.g. requeued) jobs start within a second of becoming eligible, not at the
            # next 30 s backfill pass; a cancelled job's leftovers are killed after 5 s, not 30.
            "SchedulerParameters=bf_interval=1,sched_interval=1",
            "KillWait=5",
            # The node is what this file says, whatever the hardware (a 1-CPU machine still has 2).
            "SlurmdParameters=config_overrides",
            f"NodeName={NODE} CPUs={CPUS} RealMemory=20000 State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(self.root, "owner"), "w") as f:  # see stop_stale_clusters
            f.write(str(os.getpid()))

    def start(self, timeout_s: float = 60) -> None:
        self.write_config()
        key = os.path.join(self.root, "munge", "munge.key")
        subprocess.run([shutil.which("mungekey", path=_SEARCH_PATH), "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        m = os.path.join(self.root, "munge")
        # --force: as root munged otherwise refuses some ownership / permission layouts of its files.
        self._start("munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                    f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
        self._start("slurmctld", "-f", self.conf)
        self._start("slurmd", "-f", self.conf)
        deadline = time.time() + timeout_s
        state = ""
        while time.time() < deadline:
            state = self.node_state()
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {NODE} is {state!r}, not idle, {timeout_s:.0f} s after slurmd started:\n"
                           f"{self.run('scontrol', 'show', 'node', NODE, check=False)}\n{self.log_tails()}")

    def _start(self, daemon: str, *args: str) -> None:
        r = subprocess.run([shutil.which(daemon, path=_SEARCH_PATH), *args], env=self.env(),
                           capture_output=True, text=True, timeout=60)
        pid_file = self.pid_files[daemon]
        deadline = time.time() + 20
        while r.returncode == 0 and not os.path.exists(pid_file) and time.time() < deadline:
            time.sleep(0.05)
        if r.returncode or not os.path.exists(pid_file):
            raise RuntimeError(f"{daemon} did not start (exit {r.returncode}): {r.stderr.strip()}\n{self.log_tails()}")

    def stop(self) -> None:
        """Kills the cluster's jobs, then stops slurmd, slurmctld and munged by their pid files."""
        if os.path.exists(self.pid_files["slurmctld"]) and os.path.exists(self.pid_files["munged"]):
            with contextlib.suppress(Exception):
                jobs = self.run("squeue", "--noheader", "--format=%i", timeout=10).split()
                if jobs:
                    self.run("scancel", "--signal=KILL", "--full", *jobs, check=False, timeout=10)
                    self.run("scancel", *jobs, check=False, timeout=10)
                    deadline = time.time() + 20
                    while self.run("squeue", "--noheader", timeout=10).strip() and time.time() < deadline:
                        time.sleep(0.2)
        for daemon in ("slurmd", "slurmctld", "munged"):
            _stop_daemon(self.pid_files[daemon], self.root)


def stop_stale_clusters() -> None:
    """Stops the daemons of clusters left by test runs whose process is gone (killed before their
    teardown), by those clusters' pid files, and removes their folders. Clusters of live test runs
    are theirs to stop."""
    for root in glob.glob(os.path.join(_ROOT, _PREFIX + "*")):
        try:
            with open(os.path.join(root, "owner")) as f:
                owner = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _alive(owner):
            continue
        Cluster(root).stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def one_node_cluster() -> Iterator[Cluster]:
    """A started one-node cluster, stopped (jobs killed, daemons stopped by their pid files) however
    the block ends. Its folder is removed when the block succeeds and kept (logs) when it fails.
    Raises RuntimeError naming the Debian package of each missing program."""
    missing = missing_packages()
    if missing:
        raise RuntimeError("the SLURM test cluster needs Debian's munge and SLURM packages:\n  " + "\n  ".join(missing))
    stop_stale_clusters()
    cluster = Cluster(tempfile.mkdtemp(prefix=_PREFIX, dir=_ROOT))
    ok = False
    try:
        cluster.start()
        yield cluster
        ok = True
    finally:
        cluster.stop()
        if ok:
            shutil.rmtree(cluster.root, ignore_errors=True)
        else:
            print(f"SLURM test cluster folder (logs) kept: {cluster.root}")
