"""Interrupted runs resume exactly, in this process: a run with DMD2's GAN (its head and the head's
optimizer in the checkpoint) and a LoRA run (checkpoints of adapters only) log exactly the rounds of
an uninterrupted run; sampling restores the student alone, and a resume restores onto the state's
shapes without building a fresh state. (Kills, signals and several processes: test_trainer_runs.py,
test_sample_cli.py, test_slurm.py.)"""

from __future__ import annotations

import shutil

import jax
import numpy as np

from dpdmd_jax.config import override
from dpdmd_jax.run import sample as run_sample
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import train as run_train
from dpdmd_jax.run import workdir as workdir_lib
from tests.helpers import read_metrics
from tests.unit.test_baselines import gan_config
from tests.unit.test_lora import _flat, lora_smoke
from tests.unit.test_sample import config


def test_gan_resume_is_exact(tmp_path):
    """Stopped after round 1 and resumed from its checkpoint (head and its optimizer included), the run
    logs exactly the rounds of the uninterrupted one."""
    c = lambda n: gan_config(num_rounds=n, checkpoint_every=1)
    one = jax.devices()[:1]
    run_train.train(c(2), str(tmp_path / "ref"), one)
    run_train.train(c(1), str(tmp_path / "resumed"), one)
    run_train.train(c(2), str(tmp_path / "resumed"), one)  # continues from round 1's checkpoint
    metrics = read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in metrics] == [1, 2] and "loss_gan_cls" in metrics[1]
    assert metrics == read_metrics(tmp_path / "ref")


def test_lora_resume_is_exact_and_checkpoints_hold_only_adapters(tmp_path):
    c = lambda n: lora_smoke(num_rounds=n, checkpoint_every=1, backbone="tiny_flow", **{"data.kind": "random"})
    one = jax.devices()[:1]
    run_train.train(c(2), str(tmp_path / "ref"), one)
    run_train.train(c(1), str(tmp_path / "resumed"), one)
    run_train.train(c(2), str(tmp_path / "resumed"), one)  # continues from round 1's checkpoint
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "ref")
    mngr = workdir_lib.checkpoint_manager(str(tmp_path / "ref"), c(2))
    run = setup_lib.build(c(2), jax.devices()[:1])
    student = workdir_lib.restore_student(mngr, 2, setup_lib.abstract_student(run))
    paths = list(_flat(student))
    assert paths and all(p[-2] == "lora" for p in paths)


def test_the_student_is_restored_alone_and_a_resume_builds_no_fresh_state(run_dir, tmp_path, monkeypatch):
    """Sampling (and export) read only the checkpoint's student: the same arrays, on the same
    shardings, as a full restore's, with no train state built (the fake score and both optimizers'
    moments are four more copies of the model). A resume restores onto the state's shapes, never
    beside a freshly initialised state."""
    run = setup_lib.build(config())
    like, shardings = setup_lib.train_state_shapes(run)
    full = workdir_lib.restore(workdir_lib.checkpoint_manager(run_dir, run.config), 2, like, shardings)

    def no_state(*a, **k):
        raise AssertionError("no train state may be initialised here")

    monkeypatch.setattr(setup_lib, "init_train_state", no_state)
    student, source = run_sample.load_student(run, run_dir, None)
    assert source.endswith("checkpoints/2")
    for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(full.student), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)

    shutil.copytree(run_dir, tmp_path / "run")
    summary = run_train.train(override(config(), {"num_rounds": 3}), str(tmp_path / "run"))  # resumes at 2
    assert summary is not None and workdir_lib.checkpoint_steps(str(tmp_path / "run"))[-1] == 3
