"""launch/: the TPU VM, GKE (xpk) and GPU launch scripts, run against recording fakes, and shellcheck.

No cloud and no accelerator: a fake `gcloud`, `xpk`, `docker` and `kubectl` first on PATH append
their argv (one JSON line per call) to a log, and the tests assert the exact commands. The fake
`gcloud` also plays a TPU VM of two workers: `tpu-vm scp --worker=all` copies into each worker's
home folder and `tpu-vm ssh --worker=all --command=...` runs the command there, as gcloud does, so
the commands the scripts send are executed: `launch/tpu/worker.sh` unpacks and installs the checkout
(a fake `python3` records pip / uv) and starts `python -m dpdmd_jax.main` (the same fake records
its argv and exits with a chosen code, or waits for SIGTERM and exits 75 as a pre-empted run does).
Neither torch nor JAX is imported here."""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
TPU = str(LAUNCH / "tpu" / "tpu.sh")
GKE = str(LAUNCH / "gke" / "gke.sh")
GPU = str(LAUNCH / "gpu" / "run.sh")

# One fake for every program, dispatched on the name it was called by. Its log: one JSON object
# per call, {"prog", "argv", ...}. Its behaviour: the JSON file $FAKE_CFG.
FAKE = r'''#!{python}
import json, os, shutil, signal, subprocess, sys, time
prog = os.path.basename(sys.argv[0])
argv = sys.argv[1:]
cfg = json.load(open(os.environ["FAKE_CFG"]))
root = os.environ["FAKE_ROOT"]


def log(**extra):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(dict(prog=prog, argv=argv, **extra)) + "\n")


def worker_homes():
    worker = next((a.split("=", 1)[1] for a in argv if a.startswith("--worker=")), "0")
    ids = range(cfg.get("workers", 2)) if worker == "all" else [int(worker)]
    return [(i, os.path.join(root, f"worker{i}")) for i in ids]


def gcloud():
    log()
    words = [a for a in argv if not a.startswith("-")]
    kind, verb = words[2], words[3]  # compute tpus KIND VERB NAME ...
    state = os.path.join(root, f"{kind}.created")
    if verb == "describe":  # the resource exists once created (or if the test says so)
        if not (os.path.exists(state) or cfg.get("exists")):
            print("ERROR: NOT_FOUND", file=sys.stderr)
            return 1
        states = cfg.get("states", ["READY"])
        count = os.path.join(root, "describe.count")
        n = int(open(count).read()) if os.path.exists(count) else 0
        open(count, "w").write(str(n + 1))
        print(states[min(n, len(states) - 1)])
        return 0
    if verb == "create":
        open(state, "w").close()
        return 0
    if verb == "scp":  # gcloud ... scp SRC NAME:DEST --worker=...
        src, dest = words[4], words[5].split(":", 1)[1]
        for _, home in worker_homes():
            os.makedirs(home, exist_ok=True)
            shutil.copy(src, os.path.join(home, dest))
        return 0
    if verb == "ssh":  # every worker at once; gcloud exits with the first worker's failure
        command = next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))
        procs = []
        for i, home in worker_homes():  # a session of its own on each worker, as over ssh
            os.makedirs(home, exist_ok=True)
            env = dict(os.environ, HOME=home, FAKE_HOSTNAME=f"worker{i}")
            procs.append(subprocess.Popen(["bash", "-c", command], cwd=home, env=env, start_new_session=True))
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:  # Ctrl-C: the connections drop, the workers' sessions get SIGHUP
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass
            return 130
        return next((c for c in codes if c), 0)
    return 0


def python():
    if argv[:2] == ["-m", "uv"] and argv[2] == "venv":  # uv venv --python X VENV: a venv whose python is this fake
        os.makedirs(os.path.join(argv[-1], "bin"), exist_ok=True)
        shutil.copy(sys.argv[0], os.path.join(argv[-1], "bin", "python"))
    if argv[:2] != ["-m", "dpdmd_jax.main"]:
        log(home=os.environ.get("HOME"))
        return 0
    worker = os.environ.get("FAKE_HOSTNAME", "local")

    def saved(*_):
        print(f"SIGTERM: saved the round on {worker}", flush=True)
        log(event="sigterm", worker=worker)
        sys.exit(75)

    if cfg.get("wait_for_sigterm"):
        signal.signal(signal.SIGTERM, saved)
    log(home=os.environ.get("HOME"), cwd=os.getcwd(), pid=os.getpid(), worker=worker,
        env={k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS", "NCCL_DEBUG")})
    print(f"training on {worker}", flush=True)
    if cfg.get("wait_for_sigterm"):
        for _ in range(600):
            time.sleep(0.1)
        return 1
    return cfg.get("main_rc", {}).get(worker, 0)


if prog == "hostname":
    print(os.environ.get("FAKE_HOSTNAME", "local"))
    sys.exit(0)
sys.exit(gcloud() if prog == "gcloud" else python() if prog.startswith("python") else (log() or 0))
'''


class Fakes:
    """The fake programs in tmp/bin, their log and their configuration."""

    def __init__(self, tmp: Path):
        self.root, self.bin, self.log = tmp, tmp / "bin", tmp / "calls.jsonl"
        self.bin.mkdir()
        fake = self.bin / "fake"
        fake.write_text(FAKE.replace("{python}", sys.executable))
        fake.chmod(0o755)
        for name in ("gcloud", "xpk", "docker", "kubectl", "python3", "python", "hostname"):
            (self.bin / name).symlink_to(fake)
        self.configure()

    def configure(self, **cfg):
        """The fakes' behaviour from now on (a fresh cloud: nothing created, no describe answered yet)."""
        (self.root / "cfg.json").write_text(json.dumps(cfg))
        for state in ("describe.count", "tpu-vm.created", "queued-resources.created"):
            (self.root / state).unlink(missing_ok=True)

    def env(self, **extra) -> dict:
        # A clean environment: no XLA_FLAGS etc. from the test process.
        env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "HOME": str(self.root / "home"), "LANG": "C.UTF-8",
               "TMPDIR": str(self.root), "FAKE_LOG": str(self.log), "FAKE_CFG": str(self.root / "cfg.json"),
               "FAKE_ROOT": str(self.root)}
        return {**env, **extra}

    def run(self, *cmd, timeout=120, **env) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], env=self.env(**env), cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def calls(self, prog: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [r for r in rows if prog is None or r["prog"] == prog]

    def argvs(self, prog: str) -> list[list[str]]:
        return [[prog, *r["argv"]] for r in self.calls(prog)]

    def mains(self) -> list[dict]:
        return [r for r in self.calls() if r["prog"].startswith("python") and r["argv"][:2] == ["-m", "dpdmd_jax.main"]]


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path)


def lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.strip().splitlines()]


# The user's flags, with words a careless quoting would split or mangle.
MAIN = ["--config=configs/sd35.py", "--workdir=gs://my-bucket/runs/sd35",
        "--config.data.prompt_file=/data/my prompts.txt", "--config.name=it's $HOME"]
WHERE = ["--name=dpdmd-1", "--zone=us-east5-a", "--project=my-project"]
LOC = ["--zone=us-east5-a", "--project=my-project"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
INSTALL = ["--command=rm -rf dpdmd-jax.new && mkdir dpdmd-jax.new && tar -xzf dpdmd-jax.tar.gz -C dpdmd-jax.new "
           "&& bash dpdmd-jax.new/launch/tpu/worker.sh install"]


# MAIN as the scripts quote it into a command line (--command of ssh and xpk).
MAIN_QUOTED = ("--config=configs/sd35.py --workdir=gs://my-bucket/runs/sd35 "
               "--config.data.prompt_file='/data/my prompts.txt' --config.name='it'\\''s $HOME'")


def remote(worker_command: str, main: bool = False) -> str:
    """The --command of an ssh that runs launch/tpu/worker.sh on the workers."""
    return f"--command=bash dpdmd-jax/launch/tpu/worker.sh {worker_command}" + (f" {MAIN_QUOTED}" if main else "")


def test_the_quoted_flags_are_the_flags():
    assert shlex.split(MAIN_QUOTED) == MAIN
    command = remote("run", main=True).split("=", 1)[1]
    assert shlex.split(command) == ["bash", "dpdmd-jax/launch/tpu/worker.sh", "run", *MAIN]


SETUP = "mkdir -p sd35m && echo weights > sd35m/fetched"  # e.g. gcloud storage rsync -r gs://B/sd35m sd35m


def tpu_up_commands(tmp: Path, create: list[str], delete: list[str], setup: bool = True) -> list[list[str]]:
    tarball = str(tmp / "dpdmd-jax-dpdmd-1.tar.gz")
    return [create,
            [*VM, "scp", tarball, "dpdmd-1:dpdmd-jax.tar.gz", *LOC, "--worker=all"],
            [*VM, "ssh", "dpdmd-1", *LOC, "--worker=all", *INSTALL],
            *([[*VM, "ssh", "dpdmd-1", *LOC, "--worker=all", f"--command={SETUP}"]] if setup else []),
            [*VM, "ssh", "dpdmd-1", *LOC, "--worker=all", remote("run", main=True)],
            delete]


CREATE_VM = [*VM, "create", "dpdmd-1", *LOC, "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]
DELETE_VM = [*VM, "delete", "dpdmd-1", *LOC, "--quiet"]


def test_tpu_dry_run_prints_every_command_and_runs_none(fakes):
    r = fakes.run(TPU, "up", *WHERE, "--accelerator-type=v5p-8", "--delete-on-exit", "--dry-run", "--setup", SETUP,
                  "--", *MAIN)
    assert r.returncode == 0, r.stderr
    printed = lines(r.stdout)
    pack = printed.pop(1)  # the local packing of the checkout, a pipeline
    assert pack[:3] == ["cd", str(REPO), "&&"] and "ls-files" in pack
    assert pack[-1] == str(fakes.root / "dpdmd-jax-dpdmd-1.tar.gz")
    assert printed == tpu_up_commands(fakes.root, CREATE_VM, DELETE_VM)
    assert fakes.calls() == [] and not (fakes.root / "dpdmd-jax-dpdmd-1.tar.gz").exists()
    # DRY_RUN=1 is the same switch; a queued resource, on Spot capacity, with a runtime of the user's choosing.
    r = fakes.run(TPU, "up", *WHERE, "--accelerator-type", "v6e-8", "--version=my-runtime", "--queued", "--spot",
                  "--delete-on-exit", "--", *MAIN, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    printed = lines(r.stdout)
    assert printed[0] == [*QR, "create", "dpdmd-1", "--node-id=dpdmd-1", *LOC, "--accelerator-type=v6e-8",
                          "--runtime-version=my-runtime", "--spot"]
    assert printed[-1] == [*QR, "delete", "dpdmd-1", *LOC, "--force", "--quiet"]
    assert fakes.calls() == []


def test_tpu_up_runs_the_same_command_on_every_worker_and_deletes_the_vm(fakes):
    r = fakes.run(TPU, "up", *WHERE, "--accelerator-type=v5p-8", "--delete-on-exit", f"--setup={SETUP}", "--", *MAIN)
    assert r.returncode == 0, r.stdout + r.stderr
    describe = [*VM, "describe", "dpdmd-1", *LOC, "--format=value(state)"]
    assert fakes.argvs("gcloud") == [describe, *tpu_up_commands(fakes.root, CREATE_VM, DELETE_VM)]
    # Each worker unpacked the checkout, installed it with jax[tpu] into its venv and ran
    # `python -m dpdmd_jax.main` with the user's flags, word for word, in the checkout.
    for i in range(2):
        home = fakes.root / f"worker{i}"
        assert (home / "dpdmd-jax" / "launch" / "tpu" / "worker.sh").is_file()
        assert (home / "dpdmd-jax" / "pyproject.toml").is_file() and not (home / "dpdmd-jax.new").exists()
        assert (home / "sd35m" / "fetched").read_text() == "weights\n"  # --setup ran on every worker
        installs = [c["argv"] for c in fakes.calls() if c["prog"] == "python3" and c["home"] == str(home)]
        venv_python = str(home / "dpdmd-venv" / "bin" / "python")
        assert ["-m", "uv", "pip", "install", "--python", venv_python, "--upgrade", "jax[tpu]"] in installs
        assert ["-m", "uv", "pip", "install", "--python", venv_python, "-e", str(home / "dpdmd-jax")] in installs
    mains = fakes.mains()
    assert sorted(m["worker"] for m in mains) == ["worker0", "worker1"]
    for m in mains:
        assert m["argv"] == ["-m", "dpdmd_jax.main", *MAIN]
        assert m["cwd"] == str(fakes.root / m["worker"] / "dpdmd-jax")
    assert "training on worker0" in r.stdout and "training on worker1" in r.stdout


@pytest.mark.parametrize("rc", [1, 75])
def test_tpu_deletes_the_vm_on_exit_also_when_the_run_fails(fakes, rc):
    fakes.configure(main_rc={"worker1": rc})
    r = fakes.run(TPU, "up", *WHERE, "--accelerator-type=v5p-8", "--delete-on-exit", "--", *MAIN)
    assert r.returncode == rc, r.stdout + r.stderr
    assert fakes.argvs("gcloud")[-1] == DELETE_VM
    assert len(fakes.mains()) == 2
    if rc == 75:
        assert "run the same command again to resume" in r.stderr
        # Without --delete-on-exit the VM stays, and the same command again resumes on it: nothing
        # is recreated, the checkout is installed again, the same run starts on every worker.
        fakes.configure(exists=True)
        before = len(fakes.calls("gcloud"))
        r = fakes.run(TPU, "up", *WHERE, "--accelerator-type=v5p-8", "--", *MAIN)
        assert r.returncode == 0, r.stderr
        assert fakes.argvs("gcloud")[before:] == [[*VM, "describe", "dpdmd-1", *LOC, "--format=value(state)"],
                                                  *tpu_up_commands(fakes.root, CREATE_VM, DELETE_VM, setup=False)[1:-1]]
        assert [m["argv"] for m in fakes.mains()] == [["-m", "dpdmd_jax.main", *MAIN]] * 4


def wait_for_runs(fakes, n=2, timeout=60):
    deadline = time.time() + timeout
    while len(fakes.mains()) < n and time.time() < deadline:
        time.sleep(0.1)
    assert sorted(m["worker"] for m in fakes.mains()) == ["worker0", "worker1"]  # one run per worker


def test_tpu_ctrl_c_stops_the_run_then_deletes_the_vm(fakes):
    """Ctrl-C on a one-shot run: the workers' runs get SIGTERM (they save and exit 75), then the VM
    is deleted."""
    fakes.configure(wait_for_sigterm=True)
    # A terminal's SIGINT disposition (pytest-xdist workers ignore SIGINT, and an ignored signal is
    # inherited: bash could not even trap it).
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    p = subprocess.Popen([TPU, "up", *WHERE, "--accelerator-type=v5p-8", "--delete-on-exit", "--", *MAIN],
                         env=fakes.env(), cwd=fakes.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=default_sigint)
    wait_for_runs(fakes)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert fakes.argvs("gcloud")[-2:] == [[*VM, "ssh", "dpdmd-1", *LOC, "--worker=all", remote("stop")], DELETE_VM]
    assert sorted(c["worker"] for c in fakes.calls() if c.get("event") == "sigterm") == ["worker0", "worker1"]


def test_tpu_queued_resource_waits_until_active_and_is_force_deleted(fakes):
    fakes.configure(states=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    r = fakes.run(TPU, "create", *WHERE, "--accelerator-type=v5litepod-16", "--queued", "--spot",
                  TPU_POLL_SECONDS="0")
    assert r.returncode == 0, r.stderr
    describe = [*QR, "describe", "dpdmd-1", *LOC, "--format=value(state.state)"]
    assert fakes.argvs("gcloud") == [
        describe,  # not there yet
        [*QR, "create", "dpdmd-1", "--node-id=dpdmd-1", *LOC, "--accelerator-type=v5litepod-16",
         "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
        describe, describe, describe]
    assert "WAITING_FOR_RESOURCES" in r.stderr
    r = fakes.run(TPU, "delete", *WHERE, "--queued")
    assert r.returncode == 0
    assert fakes.argvs("gcloud")[-1] == [*QR, "delete", "dpdmd-1", *LOC, "--force", "--quiet"]
    # A queued resource that failed is reported, not waited for.
    fakes.configure(states=["FAILED"])
    r = fakes.run(TPU, "create", *WHERE, "--accelerator-type=v5p-8", "--queued", TPU_POLL_SECONDS="0")
    assert r.returncode == 1 and "dpdmd-1 is FAILED" in r.stderr


def test_tpu_create_keeps_a_ready_tpu_and_replaces_a_preempted_one(fakes):
    describe = [*VM, "describe", "dpdmd-1", *LOC, "--format=value(state)"]
    fakes.configure(exists=True, states=["READY"])
    assert fakes.run(TPU, "create", *WHERE, "--accelerator-type=v5p-8").returncode == 0
    assert fakes.argvs("gcloud") == [describe]
    fakes.log.unlink()
    fakes.configure(exists=True, states=["PREEMPTED"])
    assert fakes.run(TPU, "create", *WHERE, "--accelerator-type=v5p-8").returncode == 0
    assert fakes.argvs("gcloud") == [describe, DELETE_VM, CREATE_VM]
    fakes.log.unlink()
    fakes.configure(exists=True, states=["SUSPENDED", "ACTIVE"])
    r = fakes.run(TPU, "create", *WHERE, "--accelerator-type=v5p-8", "--queued", TPU_POLL_SECONDS="0")
    assert r.returncode == 0, r.stderr
    describe = [*QR, "describe", "dpdmd-1", *LOC, "--format=value(state.state)"]
    assert fakes.argvs("gcloud") == [
        describe, [*QR, "delete", "dpdmd-1", *LOC, "--force", "--quiet"],
        [*QR, "create", "dpdmd-1", "--node-id=dpdmd-1", *LOC, "--accelerator-type=v5p-8",
         "--runtime-version=v2-alpha-tpuv5"], describe]


def test_tpu_start_logs_stop(fakes):
    """A detached run on every worker; a second start follows it instead of starting another; stop
    SIGTERMs it on every worker and it exits 75 (saved); logs shows one worker's log."""
    assert fakes.run(TPU, "install", *WHERE).returncode == 0
    fakes.configure(wait_for_sigterm=True)
    for _ in range(2):
        r = fakes.run(TPU, "start", *WHERE, "--", *MAIN, timeout=60)
        assert r.returncode == 0, r.stderr
    assert "already going" in r.stderr
    wait_for_runs(fakes)
    r = fakes.run(TPU, "stop", *WHERE, timeout=60)
    assert r.returncode == 75, r.stdout + r.stderr
    assert sorted(c["worker"] for c in fakes.calls() if c.get("event") == "sigterm") == ["worker0", "worker1"]
    r = fakes.run(TPU, "logs", *WHERE, "--worker=1", timeout=60)
    assert r.returncode == 75
    assert "[worker1] SIGTERM: saved the round on worker1" in r.stdout and "worker0" not in r.stdout
    ssh = [c for c in fakes.argvs("gcloud") if c[4] == "ssh"]
    assert ssh[1:] == [[*VM, "ssh", "dpdmd-1", *LOC, "--worker=all", remote("start", main=True)]] * 2 + [
        [*VM, "ssh", "dpdmd-1", *LOC, "--worker=all", remote("stop")],
        [*VM, "ssh", "dpdmd-1", *LOC, "--worker=1", remote("logs")]]


@pytest.mark.parametrize("args, message", [
    (["run", "--name=x", "--project=p", "--", "--config=c"], "error: --zone is required"),
    (["create", "--name=x", "--zone=z", "--project=p"], "error: --accelerator-type is required"),
    (["create", "--name=x", "--zone=z", "--project=p", "--accelerator-type=v9-8"], "give --version"),
    (["run", *WHERE], "give dpdmd_jax.main's flags after --"),
    (["run", *WHERE, "--config=c"], "error: unknown option --config=c"),
    (["launch", *WHERE], "error: unknown command 'launch'"),
])
def test_tpu_bad_input_is_one_line_and_exit_2(fakes, args, message):
    r = fakes.run(TPU, *args)
    assert r.returncode == 2 and message in r.stderr.splitlines()[-1]
    assert fakes.calls() == []


GKE_WHERE = ["--cluster=tpu-cluster", "--workload=sd35-run", "--project=my-project", "--zone=us-east5-a"]
XPK_CREATE = ["xpk", "workload", "create", "--cluster=tpu-cluster", "--workload=sd35-run", "--tpu-type=v5p-8",
              "--num-slices=2", "--docker-image=us-docker.pkg.dev/p/r/dpdmd-jax:v1", "--max-restarts=10",
              "--project=my-project", "--zone=us-east5-a", "--spot",
              f"--command=python -m dpdmd_jax.main {MAIN_QUOTED}"]


def test_gke_xpk_commands(fakes):
    options = [*GKE_WHERE, "--tpu-type=v5p-8", "--num-slices", "2", "--docker-image=us-docker.pkg.dev/p/r/dpdmd-jax:v1",
               "--xpk-flag=--spot"]
    r = fakes.run(GKE, "create", *options, "--dry-run", "--", *MAIN)
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [XPK_CREATE] and fakes.calls() == []
    r = fakes.run(GKE, "create", *options, "--", *MAIN)
    assert r.returncode == 0, r.stderr
    assert fakes.argvs("xpk") == [XPK_CREATE]
    # The command xpk runs on every host: python -m dpdmd_jax.main and the user's flags, word for word.
    assert shlex.split(XPK_CREATE[-1].split("=", 1)[1]) == ["python", "-m", "dpdmd_jax.main", *MAIN]
    for args in (["list", *GKE_WHERE], ["delete", *GKE_WHERE], ["logs", *GKE_WHERE],
                 ["build", "--docker-image=us-docker.pkg.dev/p/r/dpdmd-jax:v1"]):
        assert fakes.run(GKE, *args).returncode == 0
    assert fakes.argvs("xpk")[1:] == [
        ["xpk", "workload", "list", "--cluster=tpu-cluster", "--project=my-project", "--zone=us-east5-a"],
        ["xpk", "workload", "delete", "--cluster=tpu-cluster", "--workload=sd35-run", "--project=my-project",
         "--zone=us-east5-a"]]
    assert fakes.argvs("gcloud") == [["gcloud", "container", "clusters", "get-credentials", "tpu-cluster",
                                      "--region=us-east5", "--project=my-project"]]
    assert fakes.argvs("kubectl") == [["kubectl", "logs", "--follow", "--prefix", "--max-log-requests=1000",
                                       "--selector=jobset.sigs.k8s.io/jobset-name=sd35-run"]]
    assert fakes.argvs("docker") == [
        ["docker", "build", "--platform=linux/amd64", "-f", str(LAUNCH / "gke" / "Dockerfile"), "-t",
         "us-docker.pkg.dev/p/r/dpdmd-jax:v1", str(REPO)],
        ["docker", "push", "us-docker.pkg.dev/p/r/dpdmd-jax:v1"]]
    # xpk builds the image itself from a base image and this checkout.
    r = fakes.run(GKE, "create", "--cluster=c", "--workload=w", "--tpu-type=v5p-8", "--base-docker-image=dpdmd-base",
                  "--dry-run", "--", "--config=configs/sd35.py")
    assert lines(r.stdout) == [["xpk", "workload", "create", "--cluster=c", "--workload=w", "--tpu-type=v5p-8",
                                "--num-slices=1", "--base-docker-image=dpdmd-base", f"--script-dir={REPO}",
                                "--max-restarts=10", "--command=python -m dpdmd_jax.main --config=configs/sd35.py"]]


@pytest.mark.parametrize("args, message", [
    (["create", "--cluster=c", "--workload=w", "--docker-image=i", "--", "--config=c"], "--tpu-type is required"),
    (["create", "--cluster=c", "--workload=w", "--tpu-type=v5p-8", "--", "--config=c"], "--docker-image is required"),
    (["create", "--cluster=c", "--workload=w", "--tpu-type=v5p-8", "--docker-image=i", "--base-docker-image=b", "--",
      "--config=c"], "not both"),
    (["create", "--cluster=c", "--workload=w", "--tpu-type=v5p-8", "--docker-image=i"], "flags after --"),
    (["delete", "--cluster=c"], "--workload is required"),
])
def test_gke_bad_input_is_one_line_and_exit_2(fakes, args, message):
    r = fakes.run(GKE, *args)
    assert r.returncode == 2 and message in r.stderr.splitlines()[-1]
    assert fakes.calls() == []


GPU_ENV = {"NNODES": "2", "NODE_RANK": "1", "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}


def test_gpu_env_launch_passes_the_coordinator_to_python(fakes):
    fakes.configure(main_rc={"local": 75})
    p = subprocess.Popen([GPU, *MAIN], env=fakes.env(**GPU_ENV, XLA_FLAGS="--xla_dump_to=/tmp/x"), cwd=fakes.root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 75, err  # the run's exit code is the script's
    (main,) = fakes.mains()
    assert main["prog"] == "python"
    assert main["argv"] == ["-m", "dpdmd_jax.main", "--coordinator_address=10.0.0.1:1234", "--num_processes=2",
                            "--process_id=1", *MAIN]
    assert main["pid"] == p.pid  # exec: a SIGTERM to the script is a SIGTERM to the run
    assert main["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92" and main["env"]["NCCL_DEBUG"] == "WARN"
    latency_hiding = "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert main["env"]["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", latency_hiding]  # the user's flags kept
    # A host without a port takes JAX_COORDINATOR_PORT; PYTHON picks the interpreter; the user's values win.
    python = fakes.root / "venv" / "bin" / "python3.11"
    python.parent.mkdir(parents=True)
    python.symlink_to(fakes.bin / "fake")
    fakes.configure()
    r = fakes.run(GPU, "--config=configs/sd35.py", NNODES="4", NODE_RANK="0", JAX_COORDINATOR_ADDRESS="node-a",
                  JAX_COORDINATOR_PORT="9999", PYTHON=str(python), XLA_PYTHON_CLIENT_MEM_FRACTION="0.5")
    assert r.returncode == 0, r.stderr
    main = fakes.mains()[-1]
    assert main["prog"] == "python3.11" and main["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    assert main["argv"] == ["-m", "dpdmd_jax.main", "--coordinator_address=node-a:9999", "--num_processes=4",
                            "--process_id=0", "--config=configs/sd35.py"]
    # One node: no coordinator. DRY_RUN prints the command.
    r = fakes.run(GPU, "--config=configs/sd35.py", NNODES="1", DRY_RUN="1")
    assert lines(r.stdout) == [["python", "-m", "dpdmd_jax.main", "--config=configs/sd35.py"]]
    assert len(fakes.mains()) == 2


@pytest.mark.parametrize("missing", ["NNODES", "NODE_RANK", "JAX_COORDINATOR_ADDRESS"])
def test_gpu_env_launch_names_a_missing_variable(fakes, missing):
    env = {k: v for k, v in GPU_ENV.items() if k != missing}
    r = fakes.run(GPU, "--config=configs/sd35.py", **env)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [next(line for line in r.stderr.splitlines() if missing in line)]
    assert r.stderr.startswith(f"error: {missing} is not set")
    assert fakes.calls() == []
    r = fakes.run(GPU, **{**GPU_ENV, "NODE_RANK": "2"})
    assert r.returncode == 2 and r.stderr.strip() == "error: NODE_RANK=2 must lie in 0 .. NNODES-1"


def test_shellcheck_passes_on_every_launch_script():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: install the Debian package `shellcheck` "
                    "(apt-get install shellcheck; .ci/run does)")
    scripts = sorted(glob.glob(str(LAUNCH / "**" / "*.sh"), recursive=True)
                     + glob.glob(str(LAUNCH / "**" / "*.sbatch"), recursive=True))
    names = {os.path.relpath(s, REPO) for s in scripts}
    assert {"launch/common.sh", "launch/tpu/tpu.sh", "launch/tpu/worker.sh", "launch/gke/gke.sh",
            "launch/gpu/run.sh", "launch/gpu/env.sh"} <= names
    r = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"shellcheck on {sorted(names)}:\n{r.stdout}{r.stderr}"
