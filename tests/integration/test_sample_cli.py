"""The batch sampler from the command line: two processes sample like one and resume a folder; a
killed sampler resumes without duplicates or overwrites; SIGTERM stops one or two processes after a
batch with exit 75 and a rerun finishes; `sample` and `export` read the run's recorded config. On
the tiny VP backbone with the toy's prompts (the run: `run_dir`, a session fixture of
tests/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from dpdmd_jax.run import sample as run_sample
from tests.helpers import REPO
from tests.unit.test_sample import _check_whole, assert_same_images, config, pngs, rows


CLI_OVERRIDES = ["--config.backbone=tiny_vp", "--config.distill.target=denoise", "--config.num_rounds=2",
                 "--config.checkpoint_every=1", "--config.data.latent_size=(8, 8)"]


DEVICES_PER_PROCESS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_sampler(run_dir: str, out: str, port: int, process_id: int, log: str, *flags: str) -> subprocess.Popen:
    """One of two sampler processes of `run_dir`'s student; `flags` come last (absl: the last of a
    repeated flag wins)."""
    return launch_process(["--config=configs/toy.py:smoke", *CLI_OVERRIDES, f"--workdir={run_dir}", f"--out={out}",
                           "--seeds=3", "--per_device_batch=2", *flags], port, process_id, log)


def launch_process(flags: list[str], port: int, process_id: int, log: str) -> subprocess.Popen:
    """`python -m dpdmd_jax.sample FLAGS` as one of two processes on this machine, with 2 virtual
    devices each (so a batch of 8 is 2 per device; more device threads than the 2 cores made gloo's
    collectives crawl); its stdout and stderr go to `log`.out / `log`.err (files: a pipe nobody
    reads could fill and block it)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    cmd = [sys.executable, "-m", "dpdmd_jax.sample", *flags,
           f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={process_id}"]
    with open(log + ".out", "w") as stdout, open(log + ".err", "w") as stderr:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr)


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Waits for every process, or until one fails (its peer would wait for it at a barrier for an
    hour) or the time is up; then kills the ones left."""
    deadline = time.time() + timeout_s
    try:
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.returncode for p in procs):
                break
            time.sleep(0.2)
    finally:
        _kill_left(procs)


def _kill_left(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_processes_resume_and_sample_like_one(run_dir, tmp_path):
    # The single-process reference on this process's 8 devices.
    ref = run_sample.sample(config(), str(tmp_path / "one"), workdir=run_dir, seeds=3, per_device_batch=1)
    # A folder as an interrupted run leaves it: its first 2 prompts' 6 images, with their rows.
    out = tmp_path / "two"
    os.makedirs(out / "images")
    shutil.copy(os.path.join(ref["out"], "run.json"), out)
    kept = [r for r in rows(ref["out"]) if r["prompt_index"] < 2]
    for r in kept:
        shutil.copy(os.path.join(ref["out"], "images", r["file"]), out / "images")
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    port, logs = _free_port(), [str(tmp_path / f"process{i}") for i in (0, 1)]
    procs = [_launch_sampler(run_dir, str(out), port, i, logs[i]) for i in (0, 1)]
    _wait_all(procs, timeout_s=600)
    outs = [(open(log + ".out").read(), open(log + ".err").read()) for log in logs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    # Process 0 alone read the folder and reports; both made the 12 missing images (2 batches of 8).
    assert f"18 images; 6 already in {out}" in outs[0][0] and f"18 images in {out} (12 made now)" in outs[0][0]
    assert "images in" not in outs[1][0]
    # One row per image: process 1 wrote none, and nothing already there was made again.
    r = rows(str(out))
    assert sorted((x["prompt_index"], x["seed"]) for x in r) == [(p, s) for p in range(6) for s in range(3)]
    assert_same_images(pngs(str(out)), pngs(ref["out"]))  # 2 processes x 2 devices against 8 devices


def test_killed_sampler_resumes_without_duplicates_or_overwrites(run_dir, tmp_path):
    # 6 prompts x 32 seeds = 24 batches of 8: the kill after the first batch lands well before the end
    # even when the polling process is starved on a loaded machine (4 seeds, 3 batches, was not enough).
    seeds, total = 32, 6 * 32
    out = str(tmp_path / "samples")
    cmd = [sys.executable, "-m", "dpdmd_jax.sample", "--config=configs/toy.py:smoke", *CLI_OVERRIDES,
           f"--workdir={run_dir}", f"--out={out}", f"--seeds={seeds}", "--per_device_batch=1", "--num_prompts=6"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    path = os.path.join(out, "samples.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {n: os.stat(os.path.join(out, "images", n)).st_mtime_ns for n in os.listdir(os.path.join(out, "images"))
              if n.endswith(".png")}
    assert 8 <= len(before) < total
    summary = run_sample.sample(config(), out, workdir=run_dir, seeds=seeds, per_device_batch=1, num_prompts=6)
    assert summary["made"] <= total - 8 and summary["rows"] == total
    r = rows(out)
    assert sorted((x["prompt_index"], x["seed"]) for x in r) == [(p, s) for p in range(6) for s in range(seeds)]
    for n, mtime in before.items():  # nothing written before the kill was rewritten
        assert os.stat(os.path.join(out, "images", n)).st_mtime_ns == mtime
    assert not [n for n in os.listdir(os.path.join(out, "images")) if not n.endswith(".png")]
    # The same images as a run that was never interrupted.
    ref = run_sample.sample(config(), str(tmp_path / "ref"), workdir=run_dir, seeds=seeds,
                            per_device_batch=1, num_prompts=6)
    got, want = pngs(out), pngs(ref["out"])
    assert list(got) == list(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    again = run_sample.sample(config(), out, workdir=run_dir, seeds=seeds, per_device_batch=1, num_prompts=6)
    assert again["made"] == 0 and len(rows(out)) == total


def _rows_at_least(path: str, n: int, procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Waits until samples.jsonl holds `n` rows; fails if a process ends first or time runs out."""
    deadline = time.time() + timeout_s
    while not (os.path.exists(path) and len(open(path).read().splitlines()) >= n):
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, f"a sampler ended before it was signalled (exit {ended[0].returncode})"
        assert time.time() < deadline, "timed out waiting for the first batch"
        time.sleep(0.05)


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Waits for every process (each may exit non-zero: pre-empted), killing those left at the end."""
    deadline = time.time() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        _kill_left(procs)


def test_sigterm_stops_the_sampler_after_a_batch_with_exit_75_and_a_rerun_finishes(run_dir, tmp_path):
    seeds, total = 32, 6 * 32  # 24 batches of 8: the signal lands well before the end
    out = str(tmp_path / "samples")
    cmd = [sys.executable, "-m", "dpdmd_jax.sample", "--config=configs/toy.py:smoke", *CLI_OVERRIDES,
           f"--workdir={run_dir}", f"--out={out}", f"--seeds={seeds}", "--per_device_batch=1"]
    log = tmp_path / "sampler.out"
    with open(log, "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=stdout,
                                stderr=subprocess.STDOUT)
    _rows_at_least(os.path.join(out, "samples.jsonl"), 8, [proc], timeout_s=240)
    proc.send_signal(signal.SIGTERM)
    _wait([proc], timeout_s=120)
    text = log.read_text()
    assert proc.returncode == 75, text[-3000:]  # cli.EXIT_PREEMPTED: a scheduler requeues it
    stopped = int(re.search(r"SIGTERM: stopped after batch (\d+) of 24", text).group(1))
    assert "run the same command again" in text
    r = _check_whole(out)
    assert len(r) == 8 * stopped < total
    summary = run_sample.sample(config(), out, workdir=run_dir, seeds=seeds, per_device_batch=1)
    assert not summary["preempted"] and summary["made"] == total - len(r) and summary["rows"] == total
    assert len(_check_whole(out)) == total


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_batch(run_dir, tmp_path):
    seeds, total = 32, 6 * 32
    out = str(tmp_path / "two")
    port, logs = _free_port(), [str(tmp_path / f"process{i}") for i in (0, 1)]
    procs = [_launch_sampler(run_dir, out, port, i, logs[i], f"--seeds={seeds}") for i in (0, 1)]
    try:
        _rows_at_least(os.path.join(out, "samples.jsonl"), 8, procs, timeout_s=300)
        procs[1].send_signal(signal.SIGTERM)  # pre-empt ONE host; JAX's coordination service catches it
    finally:
        _wait(procs, timeout_s=180)
    texts = [open(log + ".out").read() + open(log + ".err").read() for log in logs]
    for i, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 75, f"process {i}: {text[-3000:]}"
    stopped = [int(re.search(r"SIGTERM: stopped after batch (\d+) of 24", t).group(1)) for t in texts]
    assert stopped[0] == stopped[1]
    r = _check_whole(out)
    assert len(r) == 8 * stopped[0] < total
    summary = run_sample.sample(config(), out, workdir=run_dir, seeds=seeds, per_device_batch=1)
    assert summary["made"] == total - len(r) and len(_check_whole(out)) == total


def _cli(module: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *flags], cwd=REPO, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sample_and_export_read_the_runs_recorded_config(run_dir, tmp_path):
    """The run was trained with overrides of configs/toy.py:smoke (a tiny VP backbone, the denoise target,
    8x8 latents); `sample --workdir` needs none of them again, nor --config."""
    # Refused at once, so these run while the sampler below works.
    refused = _cli("dpdmd_jax.sample", f"--workdir={run_dir}", f"--out={tmp_path / 'x'}",
                   "--config.distill.target=line")
    mistyped = _cli("dpdmd_jax.sample", f"--workdir={run_dir}", f"--out={tmp_path / 'x'}", "--config.distill.foo=1")
    export = _cli("dpdmd_jax.export", f"--workdir={run_dir}", f"--out={tmp_path / 'export'}")
    no_run = _cli("dpdmd_jax.sample", "--sampler=teacher", f"--out={tmp_path / 'x'}")  # no run: --config needed
    # A layout / loop knob may differ from the run's: it does not change what the checkpoint means.
    sampler = _cli("dpdmd_jax.sample", f"--workdir={run_dir}", f"--out={tmp_path / 'cli'}", "--seeds=2",
                   "--num_prompts=2", "--per_device_batch=1", "--config.log_every=5")
    outs = {name: p.communicate(timeout=600) for name, p in
            dict(refused=refused, mistyped=mistyped, export=export, no_run=no_run, sampler=sampler).items()}
    assert sampler.returncode == 0, outs["sampler"][1][-3000:]
    assert "4 images in" in outs["sampler"][0]
    ref = run_sample.sample(config(), str(tmp_path / "ref"), workdir=run_dir, seeds=2, num_prompts=2,
                            per_device_batch=1)
    got, want = pngs(str(tmp_path / "cli")), pngs(ref["out"])
    assert list(got) == list(want)
    for name in want:  # the run's backbone, grid and checkpoint
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert rows(str(tmp_path / "cli"))[0]["source"].endswith("checkpoints/2")

    # An override that changes what the checkpoint means is refused, naming the field; one line, exit 2.
    err = outs["refused"][1].strip()
    assert refused.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "distill.target: denoise -> line" in err and "drop --config" in err and "new --workdir" not in err
    err = outs["mistyped"][1].strip()
    assert mistyped.returncode == 2 and len(err.splitlines()) == 1 and "distill.foo" in err, err
    assert not os.path.exists(tmp_path / "x")
    # export read the run's config too: its backbone is the reason it refuses this run.
    err = outs["export"][1].strip()
    assert export.returncode == 2 and len(err.splitlines()) == 1 and "backbone 'tiny_vp'" in err, err
    err = outs["no_run"][1].strip()
    assert no_run.returncode == 2 and len(err.splitlines()) == 1 and "--config is required" in err, err
