"""The shipped full-size configs' execution settings train: `configs/sd35.py` and `configs/sdxl.py`
scan their layers and rematerialise (`model.scan_layers=True`, `model.remat_policy`), and `:tiny`
keeps both (tests/unit/test_real_configs.py), so every end-to-end test of `:tiny`
(tests/integration/test_sd35_pipeline.py, tests/integration/test_sdxl_pipeline.py: train through
the CLI, checkpoint, grids, export) runs them.

A round traced with them once failed: `nnx.merge` inside the round's loops made Variables of an
outer trace level, which the scanned / rematerialised model's `nnx.scan` / `nnx.remat` refuse. Here
each family's round runs plain and with the shipped setting and gives the same losses (scan and
remat change how the round is computed, never what); the shipped setting trains and checkpoints
(and, on SD3, resumes); and every remat policy, with and without scan, runs the pattern that failed (the model
merged inside a `lax.scan`, under `grad` and `jit`) and gives the plain model's value and gradient.
A tiny round compiles in ~25 s here, the pattern in a few, hence the split."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sd35 as sd35_config
from configs import sdxl as sdxl_config
from dpdmd_jax import run_config
from dpdmd_jax.config import override
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import train as run_train
from dpdmd_jax.run import workdir as workdir_lib
from dpdmd_jax.models import mmdit, unet
from dpdmd_jax.tools.tiny_pipeline import make_tiny_pipeline


CONFIGS = {"sd3": sd35_config, "sdxl": sdxl_config}


PLAIN = (False, "none")


METRICS = ("loss", "loss_dmd", "loss_div", "loss_fake", "grad_norm_student", "grad_norm_fake")


@pytest.fixture(scope="module", params=["sd3", "sdxl"])
def family(request, tmp_path_factory):
    """(family, its :tiny config on a tiny random pipeline with random conditionings of its shapes:
    the text encoders are not what is tested here)."""
    root = str(tmp_path_factory.mktemp(request.param) / "pipe")
    make_tiny_pipeline(root, family=request.param)
    tiny = CONFIGS[request.param].get_config("tiny")
    # Two student steps, two teacher steps: every call of the round is there, half as many times (the
    # round's compile is what this file spends its time on).
    return request.param, override(tiny, {"model.source": root, "data.kind": "random", "evals": {},
                                          "teacher.steps": 2, "distill.anchor_k": 1,
                                          "student.sigmas": (1.0, 0.5), "student.timesteps": (999, 499)})


def _setup(c, scan: bool, remat: str):
    c = override(c.copy_and_resolve_references(), {"model.scan_layers": scan, "model.remat_policy": remat})
    return setup_lib.build(c, devices=jax.devices()[:1])  # sharded == one device: test_trainer_runs.py


def _loop_value_and_grad(setup, batch: int):
    d, frozen = setup.distiller, setup.frozen
    cond = jax.tree.map(lambda x: x[0], setup_lib.round_batch(setup, 0).cond)
    z = jax.random.normal(jax.random.key(0), (batch, *d.latent_shape))
    levels = jnp.asarray(d.student_grid[:2])

    def loss(params):
        def body(z, level):
            return z - 0.1 * d.predict(params, frozen.buffers, z, level, cond), None

        return jnp.mean(jax.lax.scan(body, z, levels)[0] ** 2)

    return jax.jit(jax.value_and_grad(loss))(frozen.teacher)


def test_shipped_setting_trains_resumes_and_gives_the_plain_rounds_losses(family, tmp_path, request):
    """The shipped setting through the trainer (one device): 2 rounds and a checkpoint, then (SD3) a
    resume to round 3 in a new build; its first round's losses are the plain round's. SDXL's run is
    the CLI's of `configs/sdxl.py:tiny` (`sdxl_tiny_run`, tests/conftest.py; its checkpoint, grids and
    export: tests/integration/test_sdxl_pipeline.py), compared with the plain round of its recorded
    config: SDXL's round is this file's largest compile, and that run compiles it already. The resume
    is the trainer's and Orbax's, which know no family."""
    name, c = family
    if name == "sdxl":
        workdir = str(request.getfixturevalue("sdxl_tiny_run") / "run")
        c, rounds = run_config.get_config(workdir), 2
    else:
        workdir, rounds, one_device = str(tmp_path / "run"), 3, jax.devices()[:1]
        run_train.train(override(c.copy_and_resolve_references(), {"num_rounds": 2}), workdir, one_device)
        assert workdir_lib.checkpoint_steps(workdir) == [2]
        run_train.train(override(c.copy_and_resolve_references(), {"num_rounds": rounds}), workdir, one_device)
    assert (c.model.scan_layers, c.model.remat_policy) == (True, "full")  # the shipped setting
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [m["step"] for m in logged] == list(range(1, rounds + 1))
    assert workdir_lib.checkpoint_steps(workdir)[-1] == rounds
    assert all(np.isfinite(m[k]) for m in logged for k in METRICS)

    plain_setup = _setup(c, *PLAIN)
    state, _ = setup_lib.init_train_state(plain_setup)
    batch = setup_lib.round_batch(plain_setup, 0)
    # One device: the round as jitted, with XLA options of its own. SDXL's plain round (every block
    # unrolled) compiles in 18 s with XLA:CPU's fusion emitters against 29 s with the LLVM emitters the
    # suite's smaller programs use (tests/conftest.py); the losses agree to 1e-7 either way.
    options = {"xla_cpu_use_fusion_emitters": True} if name == "sdxl" else {}
    round_fn = jax.jit(plain_setup.distiller.train_round).lower(state, plain_setup.frozen, batch).compile(
        compiler_options=options)
    _, metrics = round_fn(state, plain_setup.frozen, batch)
    plain = {k: float(v) for k, v in jax.device_get(metrics).items()}
    assert all(np.isfinite(plain[k]) and plain[k] != 0 for k in METRICS), plain
    for k in METRICS:
        np.testing.assert_allclose(logged[0][k], plain[k], rtol=2e-5, err_msg=f"{name}: {k}")


def test_every_remat_policy_and_scan_trace_inside_the_rounds_loops(family):
    """What the round does to the model, at the size of one call: `Distiller.predict` (which merges
    the model) inside a `lax.scan` body, differentiated and jitted, under every remat policy."""
    name, c = family
    assert set(mmdit.REMAT_POLICIES) == set(unet.REMAT_POLICIES)
    results = {}
    # Each policy once, scanned and not (the round test has the shipped scan + full remat).
    settings = [PLAIN, (True, "dots_no_batch"), (True, "dots"), (False, "full")]
    assert {p for _, p in settings} == set(mmdit.REMAT_POLICIES)
    for scan, remat in settings:
        value, grads = _loop_value_and_grad(_setup(c, scan, remat), c.batch_size)
        # One gradient entry that exists in both layouts: the first (non-scanned) projection's kernel.
        first = grads["pos_embed"]["proj_kernel"] if name == "sd3" else grads["conv_in"]["kernel"]
        results[(scan, remat)] = (float(value), np.asarray(first))
    value, grad = results[(False, "none")]
    for setting, (v, g) in results.items():
        np.testing.assert_allclose(v, value, rtol=2e-5, err_msg=f"{name} {setting}")
        np.testing.assert_allclose(g, grad, rtol=2e-4, atol=1e-7, err_msg=f"{name} {setting}")
