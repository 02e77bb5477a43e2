"""The trainer end to end: sharded rounds equal single-device ones (student, fake and Adam state
really sharded), the tiny VP test backbone trains through `run_train.train`, checkpoints restore onto
another mesh and export to diffusers, the CLI resumes after SIGKILL with identical metrics, SIGTERM
saves the current round, CLI errors are one paragraph, a corrupt checkpoint and a changed config are
reported."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dpdmd_jax.run import train as run_train
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import workdir as workdir_lib
from tests.helpers import (REPO, SHARDED_DEVICES, SHARDED_FLAGS, SHARDED_MESH, UNINTERRUPTED_ROUNDS, built_once,
                           read_metrics, train_rounds)
from tests.unit.test_trainer import smoke


def run_rounds(c, devices, rounds=2):
    """(setup, state, per-round metrics, the compiled round's FLOPs per device)."""
    setup, _, state, history, fn = train_rounds(c, devices, rounds)
    # The round compiled for these shapes already (SyncedJit caches it): its cost, not a new compile.
    flops = fn.compile(state, setup.frozen, setup_lib.round_batch(setup, 0)).cost_analysis()["flops"]
    return setup, state, history, flops


@pytest.fixture(scope="module")
def single_device_run():
    return run_rounds(smoke(**{"mesh.fsdp": 1}), jax.devices()[:1])


def test_sharded_rounds_equal_single_device(single_device_run):
    """On data=2 x fsdp=4: batch rows over both axes, parameters over fsdp. (Eight devices, not the
    shared 4-device mesh: there XLA's propagation alone splits the rows nearly as well, 0.28 of the
    single-device FLOPs against 0.27, so the FLOPs could not tell a missing split.)"""
    _, ref_state, ref_hist, ref_flops = single_device_run
    setup, state, hist, flops = run_rounds(smoke(**{"mesh.data": 2, "mesh.fsdp": 4}), jax.devices())
    # Each device computes its rows of the batch (1 of 8 here), not the whole batch: the models'
    # activations are split like the batch (parallel.mesh.rows_split), whatever the parameters'
    # sharding would have XLA propagate.
    assert flops < 0.2 * ref_flops, (flops, ref_flops)  # 0.13 now; 0.27 before the split
    kernel = state.student["context_embedder"]["kernel"].get_value()
    assert not kernel.sharding.is_fully_replicated  # student/fake/optimizer really are sharded
    # Adam's moments take their parameter's sharding (optax.tree_map_params), counters are replicated.
    mu = state.opt_student.inner_state[1][0].mu["context_embedder"]["kernel"].get_value()
    assert mu.sharding.is_equivalent_to(kernel.sharding, kernel.ndim)
    assert state.opt_student.notfinite_count.sharding.is_fully_replicated
    for a, b in zip(hist, ref_hist, strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for name in ("student", "fake"):
        for x, y in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(ref_state, name)), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=2e-6)


def test_vp_backbone_trains_through_the_same_trainer(tmp_path):
    """The tiny VP test backbone (epsilon prediction, x0 target, SDXL-shaped conditioning from the
    random data source) runs through `run_train.train` unchanged: finite losses, a checkpoint."""
    c = smoke(**{"backbone": "tiny_vp", "distill.target": "denoise", "data.kind": "random", "num_rounds": 2,
                 "evals": {}})
    run_train.train(c, str(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "loss_dmd", "loss_div", "loss_fake"))
    assert rows[0]["loss_div"] > 0 and 20 <= rows[0]["dmd_level"] <= 980
    assert workdir_lib.checkpoint_manager(str(tmp_path), c).latest_step() == 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`smoke(num_rounds=2)` on the shared data=2 x fsdp=2 mesh, the CLI's `--config=configs/toy.py:smoke`
    run with SHARDED_FLAGS on 4 devices, trained once per session for the tests that need a finished
    run. Each test works on its own copy."""
    train = lambda folder: run_train.train(smoke(num_rounds=2, **SHARDED_MESH), str(folder),
                                           devices=jax.devices()[:SHARDED_DEVICES])
    return built_once(tmp_path_factory, "finished_run", train)


def test_checkpoint_restores_onto_another_mesh(finished_run, tmp_path):
    c = smoke(num_rounds=2, **SHARDED_MESH)
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)  # c trained (on data=2 x fsdp=2)
    mngr = workdir_lib.checkpoint_manager(str(tmp_path), c)
    assert mngr.latest_step() == 2
    saved_setup = setup_lib.build(c, devices=jax.devices()[:SHARDED_DEVICES])
    like, sh = setup_lib.init_train_state(saved_setup)
    saved = workdir_lib.restore(mngr, 2, like, sh)
    other = smoke(**{"num_rounds": 2, "mesh.fsdp": 8})  # all 8 devices, one fsdp axis
    setup = setup_lib.build(other)
    like, shardings = setup_lib.init_train_state(setup)
    restored = workdir_lib.restore(mngr, 2, like, shardings)
    assert int(restored.step) == 2
    for x, y, s in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(shardings), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding.is_equivalent_to(s, x.ndim)
    kernel = restored.fake["context_embedder"]["kernel"].get_value()
    assert dict(kernel.sharding.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}

    # Export (no pipeline behind a random / toy teacher): the student's transformer folder, loaded by
    # diffusers with the student's weights, and a scheduler whose 4 steps are the student's grid.
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from dpdmd_jax.run import export as run_export

    out = run_export.export_student(c, str(tmp_path), str(tmp_path / "export"), run=saved_setup)
    assert sorted(os.listdir(out)) == ["dpdmd_student.json", "scheduler", "transformer"]
    ref = SD3Transformer2DModel.from_pretrained(os.path.join(out, "transformer"))
    np.testing.assert_array_equal(ref.context_embedder.weight.detach().numpy().T,
                                  np.asarray(saved.student["context_embedder"]["kernel"].get_value()))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(4)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), saved_setup.distiller.student_grid, atol=1e-6)


def _main(workdir, *flags, wait=True):
    """The CLI on `configs/toy.py:smoke`, seeing 4 devices and training on the shared data=2 x fsdp=2
    mesh: the program of this file's in-process runs (on 4 of this process's 8 devices); all these
    CLI runs share one persistent-cache entry."""
    cmd = [sys.executable, "-m", "dpdmd_jax.main", "--config=configs/toy.py:smoke", f"--workdir={workdir}",
           *SHARDED_FLAGS, *flags]
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                              f"--xla_force_host_platform_device_count={SHARDED_DEVICES}", env.get("XLA_FLAGS", ""))
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)


def _wait_for(predicate, proc, timeout=1500):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


LONG = [f"--config.num_rounds={UNINTERRUPTED_ROUNDS}", "--config.checkpoint_every=2"]


def test_sigkill_resume_gives_identical_metrics(uninterrupted_smoke_run, tmp_path):
    killed_dir = tmp_path / "killed"
    proc = _main(killed_dir, *LONG, wait=False)
    _wait_for(lambda: os.path.isdir(killed_dir / "checkpoints" / "2"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in read_metrics(killed_dir))
    assert killed_at < UNINTERRUPTED_ROUNDS, "the run finished before it could be killed"
    resumed = _main(killed_dir, *LONG, wait=False)
    out, err = resumed.communicate(timeout=1800)
    assert resumed.returncode == 0, err[-3000:]
    assert "Resuming from checkpoint step" in out
    # Bit-identical to the uninterrupted run (the same program, trained in-process), every logged round once.
    assert read_metrics(killed_dir) == uninterrupted_smoke_run
    # The end-of-run message: what was written, where, and the next commands.
    assert f"Done: {UNINTERRUPTED_ROUNDS} rounds in {killed_dir}" in out
    assert f"{killed_dir}/checkpoints (latest: {UNINTERRUPTED_ROUNDS})" in out
    assert f"python -m dpdmd_jax.sample --workdir={killed_dir}" in out


def test_sigterm_saves_current_round(tmp_path):
    """Also runs from a relative --workdir, as the README does (Orbax wants absolute paths)."""
    relative = os.path.relpath(tmp_path, REPO)
    proc = _main(relative, "--config.num_rounds=100000", "--config.checkpoint_every=100000", wait=False)
    _wait_for(lambda: os.path.exists(tmp_path / "metrics.jsonl") and len(read_metrics(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]  # dpdmd_jax.cli.EXIT_PREEMPTED: a scheduler requeues on it
    assert "run the same command again to resume" in err
    last = max(m["step"] for m in read_metrics(tmp_path))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [last] and "SIGTERM received" in out


def test_cli_errors_are_one_paragraph_without_traceback(tmp_path):
    bad = _main(tmp_path / "a", "--config.distill.anchor_k=99")
    assert bad.returncode == 2
    assert "distill.anchor_k=99 must lie in 1..teacher.steps=4" in bad.stderr and "Traceback" not in bad.stderr
    assert not os.path.exists(tmp_path / "a" / "config.json")  # stopped before the workdir was touched
    sd35 = subprocess.run([sys.executable, "-m", "dpdmd_jax.main", "--config=configs/sd35.py",
                           f"--workdir={tmp_path / 'b'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sd35.returncode == 2 and "model.source is empty" in sd35.stderr and "Traceback" not in sd35.stderr
    assert not os.path.exists(tmp_path / "b")


def test_corrupt_checkpoint_and_changed_config_are_reported(finished_run, tmp_path, capsys):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)  # the CLI's run, trained in this process
    capsys.readouterr()
    # A rerun of the finished run says so.
    run_train.train(smoke(num_rounds=2, **SHARDED_MESH), str(tmp_path), devices=jax.devices()[:SHARDED_DEVICES])
    assert f"{tmp_path} already finished at round 2 (num_rounds=2)" in capsys.readouterr().out
    changed = _main(tmp_path, "--config.num_rounds=2", "--config.distill.lambda_div=0.5")
    assert changed.returncode == 2 and "holds a run with a different config" in changed.stderr
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    for root, _, files in os.walk(state_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    corrupt = _main(tmp_path, "--config.num_rounds=2")
    assert corrupt.returncode == 2 and "could not restore checkpoint step 2" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr
