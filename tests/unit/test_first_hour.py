"""A new user's first hour, the parts that run in this process: a start that fails later leaves the
workdir as it found it, the waiting notice repeats until its block ends, sample and export check
--out before loading. (The `python -m dpdmd_jax.main` command line: tests/integration/
test_first_hour_cli.py.)"""

from __future__ import annotations

import os
import re
import time

import pytest

from configs import toy as toy_config
from dpdmd_jax.run import preflight
from dpdmd_jax.config import override
from dpdmd_jax.run import train as run_train
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import workdir as workdir_lib
from dpdmd_jax.parallel import multihost


def test_a_start_that_fails_later_leaves_the_workdir_as_it_was(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("out of memory while compiling")

    monkeypatch.setattr(setup_lib, "init_train_state", fail)
    c = override(toy_config.get_config("smoke"), {"num_rounds": 2})
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train.train(c, str(fresh))
    assert not os.path.exists(fresh)  # the folder this start created is gone

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train.train(c, str(existing))
    assert sorted(os.listdir(existing)) == ["notes.txt"]  # config.json went, the user's file stayed
    # A corrected command (another config) is not refused as "a different config".
    assert preflight.run_problems(override(c, {"distill.lambda_div": 0.5}), str(existing)) == []


def test_waiting_notice_repeats_until_the_block_ends(capsys):
    with multihost.waiting_notice("waiting for peers", every_s=0.05):
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "waiting for peers ..." and len(err) >= 3
    assert all(re.fullmatch(r"waiting for peers: still waiting after \d+ s", line) for line in err[1:])
    time.sleep(0.2)
    assert capsys.readouterr().err == ""  # stopped with the block


def test_sample_and_export_check_out_before_loading(tmp_path, monkeypatch):
    from dpdmd_jax.run import export as run_export
    from dpdmd_jax.run import sample as run_sample
    from dpdmd_jax.sampling import folder as sampling_folder
    from dpdmd_jax.weights import export as weights_export

    monkeypatch.setattr(setup_lib, "build", lambda *a, **k: pytest.fail("built before --out was checked"))
    afile = tmp_path / "afile"
    afile.write_text("")
    c = toy_config.get_config("smoke")
    with pytest.raises(sampling_folder.SampleError, match=f"--out={afile / 'x'} cannot be created: {afile} is a file"):
        run_sample.sample(c, str(afile / "x"), sampler="teacher")
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir_lib.check_workdir_config(str(workdir), c)  # a run's record, as the trainer writes it
    with pytest.raises(weights_export.ExportError, match=f"--out={afile / 'x'} cannot be created: {afile} is a file"):
        run_export.export_student(c, str(workdir), str(afile / "x"))


def test_processes_join_a_distributed_job_when_a_launcher_started_several(monkeypatch):
    """SLURM / MPI task counts, a multislice coordinator, or a TPU VM (whose workers all run the same
    command) make `initialize_from_flags` call jax.distributed.initialize(); one plain process does not."""
    for v in (*multihost._PROCESS_COUNT_ENV, *multihost._COORDINATOR_ENV):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(multihost, "on_tpu_vm", lambda: False)
    assert not multihost.launched_by_cluster()
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: nothing to join
    assert not multihost.launched_by_cluster()
    for env in ({"SLURM_NTASKS": "2"}, {"OMPI_COMM_WORLD_SIZE": "4"}, {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert multihost.launched_by_cluster(), env
    monkeypatch.setattr(multihost, "on_tpu_vm", lambda: True)
    assert multihost.launched_by_cluster()
    monkeypatch.undo()
    assert multihost.on_tpu_vm() is False  # JAX's own detector, on this CPU host (libtpu installed, no chips)
