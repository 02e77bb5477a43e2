"""The SLURM launch script on a real one-node SLURM cluster (tests/slurm_cluster.py: munged, slurmctld
and slurmd from Debian's packages, started here and stopped by their pid files whatever happens; on a
machine without those packages every test here fails naming them).

The jobs are `launch/slurm/dpdmd.sbatch` itself, submitted as a user would, with two tasks on the one
node standing in for two nodes (`--ntasks-per-node=2` overrides the script's one task per node).

The main test trains the toy smoke config on two processes of 2 virtual CPU devices each (2, not 4:
on this 2-core machine 8 device threads exchanging gloo collectives made a toy round take ~10 s, 2 x 2
~2 s); jax.distributed finds everything in SLURM's environment, and each process builds only its rows
of every batch. On the first run task 1 compiles the round 40 s after task 0 (gloo gives up on a peer
after 30 s), as a host with a cold compile cache or a busy CPU does: the compile barrier of
`parallel.multihost.SyncedJit` must hold them together. The scheduler's SIGTERM (`scancel
--signal=TERM`: the tasks get what `--signal=TERM@...` sends before a time limit) lands after the
first checkpoint: both processes save the same round and exit 75, the script requeues the job, and
the requeued job resumes from that round and finishes with the metrics of an uninterrupted run, the
same config and mesh trained in one process on 4 devices (`uninterrupted_smoke_run`,
tests/conftest.py). (A SIGTERM to one host only is the sampler's two-process test,
tests/integration/test_sample_cli.py: the same `multihost.Preemption`.)

Two quick tests put a stand-in `python` under the script: a failing run ends the job with its exit
code, unrequeued; and the header's recipe to stop a job for good still saves (75) without requeue.

Time: each start of the two-process job costs about a minute on 2 busy cores, mostly tracing and
compiling the round: JAX writes compile-cache entries from process 0 only, and on CPU process 1's
cache key differs from process 0's (the devices' topology fingerprint), so process 1 compiles the
round at every start."""

from __future__ import annotations

import itertools
import os
import re
import sys
import threading
import time

import numpy as np
import pytest

from tests import slurm_cluster
from tests.helpers import REPO, SHARDED_MESH, UNINTERRUPTED_ROUNDS, read_metrics

SCRIPT = os.path.join(REPO, "launch", "slurm", "dpdmd.sbatch")
ROUNDS = UNINTERRUPTED_ROUNDS  # SIGTERM after round 2's checkpoint lands rounds before the end
DEVICES_PER_PROCESS = 2
MESH = SHARDED_MESH  # data=2 over the processes, fsdp=2 within each: the tests' shared sharded mesh
assert MESH["mesh.fsdp"] == DEVICES_PER_PROCESS
TIMEOUT_S = 900
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster():
    """The one-node cluster this module's tests share; None without Debian's packages (each test
    then fails naming them: `_started`)."""
    if slurm_cluster.missing_packages():
        yield None
        return
    with slurm_cluster.one_node_cluster() as c:
        yield c


def _started(cluster) -> slurm_cluster.Cluster:
    assert cluster is not None, ("the SLURM tests need Debian's munge and SLURM packages:\n  "
                                 + "\n  ".join(slurm_cluster.missing_packages()))
    return cluster


def _wait_finished(cluster, job_id: str, log: str, t0: float) -> dict[str, str]:
    while (job := cluster.job(job_id))["JobState"] not in FINISHED:
        assert time.time() - t0 < TIMEOUT_S, f"job {job_id} still {job['JobState']}\n{_tail(log)}"
        time.sleep(0.5)
    return job


def _steps(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _job_env(cluster: slurm_cluster.Cluster) -> dict:
    """This process's environment (the compile cache, CPU platform, matmul precision of
    tests/conftest.py) with 2 virtual devices a process and this interpreter for the script; sbatch
    --export=ALL hands it to the job and srun to its tasks."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHON"] = sys.executable
    return cluster.env(env)


def _sigterm_after_first_checkpoint(cluster, job_id, workdir, seen: dict) -> None:
    """Waits for the job's first checkpoint, records what it holds, and sends the scheduler's SIGTERM
    to the job's tasks (scancel --signal=TERM signals the job steps, not the batch script)."""
    try:
        t0 = time.time()
        for i in itertools.count():
            if _steps(workdir):
                break
            if i % 20 == 0 and (state := cluster.job(job_id)["JobState"]) in FINISHED:  # every 2 s
                raise AssertionError(f"job {job_id} ended ({state}) before its first checkpoint")
            if time.time() - t0 > TIMEOUT_S:
                raise AssertionError(f"no checkpoint after {TIMEOUT_S} s")
            time.sleep(0.1)
        seen["first_step"] = step = _steps(workdir)[0]
        seen["files"] = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(step), "state")))
        cluster.run("scancel", "--signal=TERM", job_id)
    except BaseException as e:  # noqa: BLE001 (reported by the test's thread)
        seen["error"] = e


COMPILE_DELAY_S = 40
# $PYTHON of the main test's job: `python -m dpdmd_jax.main ARGS`, task 1 of the first run compiling its
# round COMPILE_DELAY_S late.
SLOW_PYTHON = f"""#!/usr/bin/env bash
shift 2  # -m dpdmd_jax.main
exec "$REAL_PYTHON" -c '
import os, runpy, sys, time
sys.path.insert(0, os.getcwd())
from dpdmd_jax.parallel import multihost
late = os.environ["SLURM_PROCID"] == "1" and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
compile_ = multihost.SyncedJit.compile
def slow(self, *args):
    if late and self.name == "round" and not self._compiled:
        print("task 1: compiling the round {COMPILE_DELAY_S} s late", flush=True)
        time.sleep({COMPILE_DELAY_S})
    return compile_(self, *args)
multihost.SyncedJit.compile = slow
sys.argv[0] = "dpdmd_jax.main"
runpy.run_module("dpdmd_jax.main", run_name="__main__", alter_sys=True)
' "$@"
"""

# Stands in for python on the script's srun line: prints its arguments, then exits $FAKE_EXIT, or
# (FAKE_EXIT=wait) says it is ready, waits for SIGTERM and exits 75 as a pre-empted run does.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "task $SLURM_PROCID of $SLURM_NTASKS: $*"
if [[ $FAKE_EXIT == wait ]]; then
  trap 'echo "task $SLURM_PROCID: SIGTERM"; exit 75' TERM
  touch "$FAKE_READY.$SLURM_PROCID"
  while true; do sleep 0.1; done
fi
exit "$FAKE_EXIT"
"""


def _submit_fake(cluster, tmp_path, fake_exit: str, *flags: str) -> tuple[str, str]:
    """Submits the script with FAKE_PYTHON as $PYTHON; (job id, its log)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(_job_env(cluster), PYTHON=str(fake), FAKE_EXIT=fake_exit, FAKE_READY=str(tmp_path / "ready"))
    job_id = cluster.sbatch("--ntasks-per-node=2", "--export=ALL", f"--chdir={REPO}",
                            f"--output={tmp_path}/slurm-%j.out", SCRIPT, *flags, env=env)
    return job_id, f"{tmp_path}/slurm-{job_id}.out"


def test_sbatch_failure_ends_the_job_with_its_exit_code_without_requeue(cluster, tmp_path):
    """A run that fails (a stand-in python exiting 2, "bad input") ends the job with that code, not
    requeued; the script hands its arguments to every task verbatim, under $PYTHON."""
    cluster = _started(cluster)
    job_id, log = _submit_fake(cluster, tmp_path, "2", "--config=configs/toy.py:smoke", "--workdir=/runs/a b")
    job = _wait_finished(cluster, job_id, log, time.time())
    text = _read(log)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "2:0", "0"), text
    for task in (0, 1):
        assert f"task {task} of 2: -m dpdmd_jax.main --config=configs/toy.py:smoke --workdir=/runs/a b\n" in text, text
    assert _task_exit_codes(text) == {0: 2, 1: 2} and "requeue" not in text, text


def test_sbatch_stopped_for_good_keeps_the_round_without_requeue(cluster, tmp_path):
    """The script header's recipe to stop a job and keep its round: `scontrol update JobId=J
    Requeue=0`, then `scancel --signal=TERM J`: the tasks get SIGTERM and exit 75 (saved), and the
    job ends with 75 instead of requeueing."""
    cluster = _started(cluster)
    t0 = time.time()
    job_id, log = _submit_fake(cluster, tmp_path, "wait", "--workdir=/runs/x")
    while not all(os.path.exists(tmp_path / f"ready.{task}") for task in (0, 1)):
        assert time.time() - t0 < 120 and cluster.job(job_id)["JobState"] not in FINISHED, _tail(log)
        time.sleep(0.1)
    cluster.run("scontrol", "update", f"JobId={job_id}", "Requeue=0")
    cluster.run("scancel", "--signal=TERM", job_id)
    job = _wait_finished(cluster, job_id, log, t0)
    text = _read(log)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "75:0", "0"), text
    assert "task 0: SIGTERM" in text and "task 1: SIGTERM" in text and _task_exit_codes(text) == {0: 75, 1: 75}, text
    assert "requeue failed; submit the same command again" in text, text


def test_sbatch_two_processes_preempted_requeued_and_resumed_like_uninterrupted(cluster, uninterrupted_smoke_run,
                                                                                 tmp_path):
    """Two processes under sbatch join one jax.distributed job and checkpoint together; the scheduler's
    SIGTERM saves the same round on both, the script requeues, and the resumed job ends like an
    uninterrupted run."""
    cluster = _started(cluster)
    t_start = time.time()
    workdir, log = tmp_path / "run", tmp_path / "slurm-%j.out"
    slow = tmp_path / "python"
    slow.write_text(SLOW_PYTHON)
    slow.chmod(0o755)
    job_id = cluster.sbatch(
        "--ntasks-per-node=2", "--export=ALL", f"--chdir={REPO}", f"--output={log}", SCRIPT,
        "--config=configs/toy.py:smoke", f"--workdir={workdir}", f"--config.num_rounds={ROUNDS}",
        *(f"--config.{k}={v}" for k, v in MESH.items()),
        env=dict(_job_env(cluster), PYTHON=str(slow), REAL_PYTHON=sys.executable))
    log = str(log).replace("%j", job_id)
    seen: dict = {}
    watcher = threading.Thread(target=_sigterm_after_first_checkpoint, args=(cluster, job_id, workdir, seen),
                               daemon=True)
    watcher.start()
    # The uninterrupted reference: the same config and mesh, trained in one process (tests/conftest.py).
    reference = uninterrupted_smoke_run
    watcher.join(TIMEOUT_S)
    if "error" in seen:
        raise AssertionError(f"{seen['error']}\n{_tail(log)}") from seen["error"]
    job = _wait_finished(cluster, job_id, log, t_start)
    text = _read(log)

    # Requeued once (by the script, on exit code 75), then finished.
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-5000:]
    runs = re.split(rf"dpdmd\.sbatch: job {job_id} \(restart \d\): 2 processes on localhost\n", text)
    assert len(runs) == 3, text[-5000:]  # the log before the first header, then one part per run
    first, second = runs[1], runs[2]

    # Both processes joined one jax.distributed job of 2 and built their halves of each batch...
    for run in (first, second):
        assert "process 0/2 builds batch rows 0:4 of 8" in run and "process 1/2 builds batch rows 4:8 of 8" in run, run
    assert first.count(f"task 1: compiling the round {COMPILE_DELAY_S} s late") == 1, first[-5000:]
    assert "compiling the round" not in second  # the requeued run: no delay
    # ... and wrote one checkpoint together (each process its shards of the same step).
    assert seen["first_step"] == 2 and {"ocdbt.process_0", "ocdbt.process_1"} <= set(seen["files"]), seen

    # SIGTERM: both processes saved the same round and exited 75; the script requeued the job.
    saved = [int(s) for s in re.findall(r"SIGTERM received: saving round (\d+)", first)]
    assert len(saved) == 2 and saved[0] == saved[1] and 2 <= saved[0] < ROUNDS, first[-5000:]
    assert _task_exit_codes(first) == {0: 75, 1: 75}, first[-5000:]
    assert f"pre-empted, the round is saved; requeueing job {job_id}" in first

    # The requeued job resumed from that round on both processes and finished.
    assert second.count(f"Resuming from checkpoint step {saved[0]}") == 2, second[-5000:]
    assert f"Done: {ROUNDS} rounds" in second and "SIGTERM" not in second, second[-5000:]
    assert _steps(workdir)[-1] == ROUNDS

    # Every round once, with the metrics of the uninterrupted run (collectives may sum in another order).
    logged = read_metrics(workdir)
    assert [m["step"] for m in logged] == list(range(1, ROUNDS + 1)) == [m["step"] for m in reference]
    for a, b in zip(logged, reference, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-7, err_msg=f"round {a['step']}: {k}")


def _task_exit_codes(text: str) -> dict[int, int]:
    """{task: exit code} from srun's reports ("srun: error: localhost: task 1: Exited with exit code
    75", or "tasks 0-1: ..." for several)."""
    codes = {}
    for tasks, code in re.findall(r"srun: error: \S+: tasks? ([\d,-]+): Exited with exit code (\d+)", text):
        for part in tasks.split(","):
            lo, _, hi = part.partition("-")
            codes.update((t, int(code)) for t in range(int(lo), int(hi or lo) + 1))
    return codes


def _read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read().replace("\r", "\n")


def _tail(path, n: int = 8000) -> str:
    return _read(path)[-n:] if os.path.exists(path) else f"(no job log {path})"
