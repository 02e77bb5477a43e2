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
from dpdmd_jax import sample as sample_lib
from dpdmd_jax.config import override
from dpdmd_jax.distill import trainer

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
    trainer.train(config(), workdir)
    return workdir


def pngs(folder: str) -> dict[str, np.ndarray]:
    d = os.path.join(folder, "images")
    return {n: np.asarray(Image.open(os.path.join(d, n))) for n in sorted(os.listdir(d))}


def rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_same_images_on_2_and_8_devices_and_any_batch(run_dir, tmp_path):
    a = sample_lib.sample(config(), str(tmp_path / "d8"), workdir=run_dir, seeds=3, per_device_batch=1)
    b = sample_lib.sample(config(), str(tmp_path / "d2"), workdir=run_dir, seeds=3, per_device_batch=1,
                          devices=jax.devices()[:2])
    c = sample_lib.sample(config(), str(tmp_path / "d2b3"), workdir=run_dir, seeds=3, per_device_batch=3,
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


def _launch_sampler(run_dir: str, out: str, port: int, process_id: int, log: str) -> subprocess.Popen:
    """One of two sampler processes on this machine, with 4 of the 8 virtual devices each; its
    stdout and stderr go to `log`.out / `log`.err (files: a pipe nobody reads could fill and block it)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
    cmd = [sys.executable, "-m", "dpdmd_jax.sample", "--config=configs/toy.py:smoke", *CLI_OVERRIDES,
           f"--workdir={run_dir}", f"--out={out}", "--seeds=3", "--per_device_batch=1",
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
    ref = sample_lib.sample(config(), str(tmp_path / "one"), workdir=run_dir, seeds=3, per_device_batch=1)
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
    summary = sample_lib.sample(config(), out, workdir=run_dir, seeds=seeds, per_device_batch=1, num_prompts=6)
    assert summary["made"] <= total - 8 and summary["rows"] == total
    r = rows(out)
    assert sorted((x["prompt_index"], x["seed"]) for x in r) == [(p, s) for p in range(6) for s in range(seeds)]
    for n, mtime in before.items():  # nothing written before the kill was rewritten
        assert os.stat(os.path.join(out, "images", n)).st_mtime_ns == mtime
    assert not [n for n in os.listdir(os.path.join(out, "images")) if not n.endswith(".png")]
    # The same images as a run that was never interrupted.
    ref = sample_lib.sample(config(), str(tmp_path / "ref"), workdir=run_dir, seeds=seeds,
                            per_device_batch=1, num_prompts=6)
    got, want = pngs(out), pngs(ref["out"])
    assert list(got) == list(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    again = sample_lib.sample(config(), out, workdir=run_dir, seeds=seeds, per_device_batch=1, num_prompts=6)
    assert again["made"] == 0 and len(rows(out)) == total


def test_teacher_sampler_and_bad_input(run_dir, tmp_path):
    t = sample_lib.sample(config(), str(tmp_path / "teacher"), sampler="teacher", seeds=2, num_prompts=2)
    r = rows(t["out"])
    assert len(r) == 4 and r[0]["sampler"] == "teacher" and r[0]["steps"] == 4 and r[0]["nfe"] == 8
    assert r[0]["cfg_scale"] == 3.5 and r[0]["source"] == "model.source=random"
    # A folder made with other settings is refused, and left as it was.
    with pytest.raises(sample_lib.SampleError, match="other settings"):
        sample_lib.sample(config(), t["out"], workdir=run_dir, seeds=2, num_prompts=2)
    with pytest.raises(sample_lib.SampleError, match=r"checkpoints at steps \[1, 2\], not 7"):
        sample_lib.sample(config(), str(tmp_path / "x"), workdir=run_dir, step=7)
    with pytest.raises(sample_lib.SampleError, match="no checkpoints/ folder"):
        sample_lib.sample(config(), str(tmp_path / "x"), workdir=str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(sample_lib.SampleError, match="prompt_file"):
        sample_lib.sample(config(), str(tmp_path / "x"), prompt_file=str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_text("red square\na purple cat\n")
    with pytest.raises(sample_lib.SampleError, match="purple cat"):
        sample_lib.sample(config(), str(tmp_path / "x"), prompt_file=str(bad))
    with pytest.raises(sample_lib.SampleError, match="drop --workdir"):
        sample_lib.sample(config(), str(tmp_path / "x"), workdir=run_dir, sampler="teacher")
    # A different training config than the run's is refused before anything is sampled.
    other = override(config(), {"distill.anchor_k": 3})
    with pytest.raises(Exception, match="different config"):
        sample_lib.sample(other, str(tmp_path / "x"), workdir=run_dir)
    assert not os.path.exists(tmp_path / "x")
