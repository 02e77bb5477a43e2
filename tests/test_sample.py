"""The batch sampler: a run's student (or the teacher) -> PNGs + grids + one JSONL row per image;
identical images on 2 and 8 devices, and from two processes; a killed sampler resumes without
duplicates or overwrites; bad input is refused before sampling. On the tiny VP backbone with the toy's prompts, so the
stochastic (re-noising) student, the hardest case for determinism, is the one checked."""

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

import jax
import numpy as np
import pytest
from PIL import Image

from configs import toy as toy_config
from dpdmd_jax.run import sample as run_sample
from dpdmd_jax.sampling import folder as sampling_folder
from dpdmd_jax.config import override
from dpdmd_jax.run import train as run_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"backbone": "tiny_vp", "distill.target": "denoise", "evals": {}, "num_rounds": 2,
             "checkpoint_every": 1, "data.latent_size": (8, 8)}
CLI_OVERRIDES = ["--config.backbone=tiny_vp", "--config.distill.target=denoise", "--config.num_rounds=2",
                 "--config.checkpoint_every=1", "--config.data.latent_size=(8, 8)"]


def config():
    c = override(toy_config.get_config("smoke"), OVERRIDES)
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    run_train.train(config(), workdir)
    return workdir


def pngs(folder: str) -> dict[str, np.ndarray]:
    d = os.path.join(folder, "images")
    return {n: np.asarray(Image.open(os.path.join(d, n))) for n in sorted(os.listdir(d))}


def rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_same_images_on_2_and_8_devices_and_any_batch(run_dir, tmp_path):
    a = run_sample.sample(config(), str(tmp_path / "d8"), workdir=run_dir, seeds=3, per_device_batch=1)
    b = run_sample.sample(config(), str(tmp_path / "d2"), workdir=run_dir, seeds=3, per_device_batch=1,
                          devices=jax.devices()[:2])
    c = run_sample.sample(config(), str(tmp_path / "d2b3"), workdir=run_dir, seeds=3, per_device_batch=3,
                          devices=jax.devices()[:2])
    assert a["images"] == b["images"] == c["images"] == 18 and a["rows"] == 18
    ia, ib, ic = pngs(a["out"]), pngs(b["out"]), pngs(c["out"])
    assert list(ia) == [f"p{p:05d}_s{s:03d}.png" for p in range(6) for s in range(3)]
    for name in ia:
        np.testing.assert_array_equal(ia[name], ib[name], err_msg=name)
        np.testing.assert_array_equal(ia[name], ic[name], err_msg=name)
    # Seeds differ, and so do the images of one prompt (the student's noise really is per image).
    assert not np.array_equal(ia["p00000_s000.png"], ia["p00000_s001.png"])
    r = rows(a["out"])
    assert [(x["prompt_index"], x["seed"]) for x in r] == [(p, s) for p in range(6) for s in range(3)]
    assert r[0]["prompt"] == "red square" and r[0]["sampler"] == "student" and r[0]["nfe"] == 4
    assert r[0]["grid"] == [999.0, 749.0, 499.0, 249.0, -1.0] and r[0]["cfg_scale"] == 1.0
    assert r[0]["source"].endswith("checkpoints/2") and r[0]["seconds"] > 0
    grid = np.asarray(Image.open(os.path.join(a["out"], "grids", "p00005.png")))
    np.testing.assert_array_equal(grid, np.concatenate([ia[f"p00005_s{s:03d}.png"] for s in range(3)], axis=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_sampler(run_dir: str, out: str, port: int, process_id: int, log: str, *flags: str) -> subprocess.Popen:
    """One of two sampler processes of `run_dir`'s student; `flags` come last (absl: the last of a
    repeated flag wins)."""
    return launch_process(["--config=configs/toy.py:smoke", *CLI_OVERRIDES, f"--workdir={run_dir}", f"--out={out}",
                           "--seeds=3", "--per_device_batch=1", *flags], port, process_id, log)


def launch_process(flags: list[str], port: int, process_id: int, log: str) -> subprocess.Popen:
    """`python -m dpdmd_jax.sample FLAGS` as one of two processes on this machine, with 4 of the 8
    virtual devices each; its stdout and stderr go to `log`.out / `log`.err (files: a pipe nobody
    reads could fill and block it)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
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
    got, want = pngs(str(out)), pngs(ref["out"])
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


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


def test_teacher_sampler_and_bad_input(run_dir, tmp_path):
    t = run_sample.sample(config(), str(tmp_path / "teacher"), sampler="teacher", seeds=2, num_prompts=2)
    r = rows(t["out"])
    assert len(r) == 4 and r[0]["sampler"] == "teacher" and r[0]["steps"] == 4 and r[0]["nfe"] == 8
    assert r[0]["cfg_scale"] == 3.5 and r[0]["source"] == "model.source=random"
    # A folder made with other settings is refused, and left as it was.
    with pytest.raises(sampling_folder.SampleError, match="other settings"):
        run_sample.sample(config(), t["out"], workdir=run_dir, seeds=2, num_prompts=2)
    with pytest.raises(sampling_folder.SampleError, match=r"checkpoints at steps \[1, 2\], not 7"):
        run_sample.sample(config(), str(tmp_path / "x"), workdir=run_dir, step=7)
    with pytest.raises(sampling_folder.SampleError, match="no checkpoints/ folder"):
        run_sample.sample(config(), str(tmp_path / "x"), workdir=str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(sampling_folder.SampleError, match="prompt_file"):
        run_sample.sample(config(), str(tmp_path / "x"), prompt_file=str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_text("red square\na purple cat\n")
    with pytest.raises(sampling_folder.SampleError, match="purple cat"):
        run_sample.sample(config(), str(tmp_path / "x"), prompt_file=str(bad))
    with pytest.raises(sampling_folder.SampleError, match="drop --workdir"):
        run_sample.sample(config(), str(tmp_path / "x"), workdir=run_dir, sampler="teacher")
    # A different training config than the run's is refused before anything is sampled.
    other = override(config(), {"distill.anchor_k": 3})
    with pytest.raises(Exception, match="different config"):
        run_sample.sample(other, str(tmp_path / "x"), workdir=run_dir)
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------- SIGTERM, corrupt files


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
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _check_whole(out: str) -> list[dict]:
    """The folder as a stopped sampler must leave it: only whole PNGs, exactly one row for each."""
    names = sorted(os.listdir(os.path.join(out, "images")))
    assert names and all(n.endswith(".png") for n in names), names  # no temporary files left
    assert all(sampling_folder.readable_png(os.path.join(out, "images", n)) for n in names)
    r = rows(out)
    assert sorted(x["file"] for x in r) == names
    return r


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


def test_a_rerun_remakes_truncated_pngs_and_keeps_the_bad_files_aside(run_dir, tmp_path):
    out = str(tmp_path / "samples")
    first = run_sample.sample(config(), out, workdir=run_dir, seeds=2, per_device_batch=1)
    assert first["rows"] == 12
    before = pngs(out)
    image, grid = os.path.join(out, "images", "p00003_s001.png"), os.path.join(out, "grids", "p00003.png")
    for path, keep in ((image, 0.5), (grid, 0.99)):  # cut in the pixel data; cut in the closing chunk
        data = open(path, "rb").read()
        open(path, "wb").write(data[: int(len(data) * keep)])
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        f.write('{"prompt": "red sq')  # a row torn by a kill
    again = run_sample.sample(config(), out, workdir=run_dir, seeds=2, per_device_batch=1)
    assert again["made"] == 1 and again["rows"] == 12
    after = pngs(out)
    assert list(after) == list(before)
    for name in before:  # the remade image is the one that was lost; no other was touched
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert sorted(os.listdir(os.path.join(out, "corrupt"))) == ["p00003.png", "p00003_s001.png"]
    _check_whole(out)
    assert sampling_folder.readable_png(grid)
    assert np.asarray(Image.open(grid)).shape[1] == 2 * before["p00003_s001.png"].shape[1]


# ---------------------------------------------------------------------------- the run's recorded config


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
