"""The shipped toy teachers (flow MMDiT, epsilon UNet) sample the toy distribution (54 images each,
the toy metrics); sample_toy is the Euler / DDIM / student sampler with CFG it claims to be; the
teachers' training entry point trains and exports both families, a second run through the command
line refuses to overwrite the export, and an export that dies half-way leaves the previous one
intact. (The architectures: tests/unit/test_toy_teacher.py.)"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpdmd_jax.diffusion import flow
from dpdmd_jax.toy import data, metrics, teacher
from tests.helpers import REPO, optimized_jit
from tests.unit.test_toy_teacher import _load_config


# The epsilon teacher's evaluation CFG and shape-accuracy floor (its RESULTS.md).
UNET_CFG = 3.5


def _draw(model, sampler, noise, *args) -> np.ndarray:
    """`sampler(model, noise, *args)` as one LLVM-optimised program (54 images x 30 steps: it runs far
    longer than it compiles), the model's weights as its argument."""
    graphdef, state = nnx.split(model)
    draw = optimized_jit(lambda state, noise: sampler(nnx.merge(graphdef, state), noise, *args))
    return np.asarray(draw(state, noise))


@pytest.fixture(scope="module")
def toy_teacher():
    return teacher.load_toy_teacher()


def test_shipped_teacher_samples_the_toy_distribution(toy_teacher):
    # 6 classes x 9 seeds, the 30-step shift-3 teacher grid, CFG 3.5 (docs/DESIGN.md's teacher).
    ids = teacher.eval_class_ids(seeds=9, repeats=1)
    noise = jax.random.normal(jax.random.key(123), (ids.size, 16, 16, 3))
    images = _draw(toy_teacher, teacher.sample_flow, noise, ids, flow.flow_match_sigmas(30, 3.0), 3.5)
    m = metrics.toy_metrics(images, ids, R=9)
    # Thresholds from the measured teacher with margin (RESULTS.md, CFG 3.5, over this 54-sample
    # draw, three other 54-sample draws and the 216-sample table: colour 1.00, shape 0.89-0.98,
    # valid 0.96-1.00, spreads 1.45-1.81 / 0.49-0.58 px, Frechet 1.25-1.78 px^2, saturation
    # 0.009); a random or broken model scores valid 0, Frechet ~20, and the previous teacher
    # (2800 steps, round blobs for both shapes) scores shape 0.5.
    assert m["colour_acc"] >= 0.95, m
    assert m["shape_acc"] >= 0.75, m
    assert m["valid"] >= 0.85, m
    data_std = data.layout_stats()[1]
    for i, k in enumerate(("spread_cx", "spread_cy", "spread_size")):
        assert m[k] > 0.5 * data_std[i], (k, m)
    assert m["frechet_layout"] < 3.0, m
    assert m["saturation"] < 0.05, m


def test_sample_flow_cfg1_is_the_conditional_euler_sampler(toy_teacher):
    ids = np.array([0, 4, 5])
    noise = jax.random.normal(jax.random.key(7), (3, 16, 16, 3))
    sigmas = np.array([1.0, 0.6, 0.0], np.float32)
    context, pooled = data.class_embedding(ids, 32, 32, context_len=4)
    graphdef, state = nnx.split(toy_teacher)
    # The model call itself, jitted (eager dispatch compiles every op separately: far slower).
    model = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    z = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):  # z <- z + (s_next - s) v(z, 1000 s | class)
        v = model(state, z, jnp.full((3,), 1000.0 * s), jnp.asarray(context), jnp.asarray(pooled))
        z = z + (s_next - s) * v
    got = teacher.sample_flow(toy_teacher, noise, ids, sigmas, cfg_scale=1.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(z), atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(z - noise).mean()) > 0.1  # the model really moved the sample

    # One guided step: v_u + w (v_c - v_u) with the uncond branch = NULL_CLASS (all-zero) embedding.
    null_ctx, null_pooled = data.class_embedding(np.full(3, data.NULL_CLASS), 32, 32, context_len=4)
    assert not null_ctx.any() and not null_pooled.any()
    t = jnp.full((3,), 1000.0)
    v_c = model(state, noise, t, jnp.asarray(context), jnp.asarray(pooled))
    v_u = model(state, noise, t, jnp.asarray(null_ctx), jnp.asarray(null_pooled))
    want = noise + (0.6 - 1.0) * (v_u + 3.5 * (v_c - v_u))
    got = teacher.sample_flow(toy_teacher, noise, ids, sigmas[:2], cfg_scale=3.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def unet_teacher():
    return teacher.load_toy_teacher(family="unet")


def test_shipped_unet_teacher_samples_the_toy_distribution(unet_teacher):
    # 6 classes x 9 seeds, the 30-step leading DDIM grid, CFG UNET_CFG (RESULTS.md of teacher_unet).
    ids = teacher.eval_class_ids(seeds=9, repeats=1)
    noise = jax.random.normal(jax.random.key(123), (ids.size, 16, 16, 3))
    images = _draw(unet_teacher, teacher.sample_toy, noise, ids, teacher.teacher_grid("unet"), UNET_CFG)
    m = metrics.toy_metrics(images, ids, R=9)
    # Thresholds from the measured teacher with margin (teacher_unet/RESULTS.md, CFG 3.5, over this
    # 54-sample draw, three other 54-sample draws and the 216-sample table: colour 1.00, shape
    # 0.96-0.98, valid 1.00, spreads 1.66-1.96 / 0.42-0.49 px, Frechet 0.66-0.89 px^2,
    # saturation 0.008-0.009); a random or broken model scores valid 0 and Frechet ~20 (the 3-step
    # smoke export: valid 0, Frechet 24.5).
    assert m["colour_acc"] >= 0.95, m
    assert m["shape_acc"] >= 0.85, m
    assert m["valid"] >= 0.95, m
    data_std = data.layout_stats()[1]
    for i, k in enumerate(("spread_cx", "spread_cy", "spread_size")):
        assert m[k] > 0.5 * data_std[i], (k, m)
    assert m["frechet_layout"] < 2.0, m
    assert m["saturation"] < 0.05, m


def test_sample_toy_vp_is_guided_ddim_and_the_student_renoises(unet_teacher):
    """Teacher mode: DDIM on eps_u + w (eps_c - eps_u), the uncond branch zero embeddings with the
    same time ids; student mode: x0 then re-noise with noise from fold_in(key, step)."""
    ids = np.array([0, 4, 5])
    noise = jax.random.normal(jax.random.key(7), (3, 16, 16, 3))
    cond = teacher.model_cond(unet_teacher, ids)
    null = teacher.model_cond(unet_teacher, np.full(3, data.NULL_CLASS))
    assert not np.asarray(null.context).any() and not np.asarray(null.text_embeds).any()
    np.testing.assert_array_equal(np.asarray(null.time_ids), np.tile(teacher.TOY_TIME_IDS, (3, 1)))
    graphdef, state = nnx.split(unet_teacher)
    model = jax.jit(lambda state, z, t, c: nnx.merge(graphdef, state)(z, t, c.context, c.text_embeds, c.time_ids))
    abar = teacher.VP.alphas_cumprod
    grid = np.array([958.0, 500.0, -1.0], np.float32)

    def x0_of(z, eps, t):
        a = abar[int(t)]
        return (z - np.sqrt(1 - a) * eps) / np.sqrt(a)

    z, w = np.asarray(noise), 3.5
    for t, t_next in zip(grid[:-1], grid[1:]):  # DDIM (eta 0); abar(-1) = 1 lands on x0
        tt = jnp.full((3,), t)
        e_c, e_u = np.asarray(model(state, z, tt, cond)), np.asarray(model(state, z, tt, null))
        eps = e_u + w * (e_c - e_u)
        a_next = 1.0 if t_next < 0 else abar[int(t_next)]
        z = np.sqrt(a_next) * x0_of(z, eps, t) + np.sqrt(1 - a_next) * eps
    got = teacher.sample_toy(unet_teacher, noise, ids, grid, cfg_scale=w)
    np.testing.assert_allclose(np.asarray(got), z, atol=1e-4, rtol=1e-4)

    key = jax.random.key(3)
    z = np.asarray(noise)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):  # conditional only, re-noised
        x0 = x0_of(z, np.asarray(model(state, z, jnp.full((3,), t), cond)), t)
        a_next = 1.0 if t_next < 0 else abar[int(t_next)]
        fresh = np.asarray(jax.random.normal(jax.random.fold_in(key, i), z.shape))
        z = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * fresh
    got = teacher.sample_toy(unet_teacher, noise, ids, grid, student=True, key=key)
    np.testing.assert_allclose(np.asarray(got), z, atol=1e-4, rtol=1e-4)


def _snapshot(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_train_entry_point_smoke(tmp_path, monkeypatch):
    from dpdmd_jax.toy import train_teacher
    from dpdmd_jax.weights import sd3

    config = _load_config("smoke")
    workdir = tmp_path / "run"
    summary = train_teacher.train_and_export(config, str(workdir))
    export = workdir / "teacher"
    assert summary["export_dir"] == str(export) and summary["steps"] == config.num_steps
    assert np.isfinite(summary["final_loss"])
    assert set(summary["eval"]) == {f"{w:g}" for w in config.eval.cfg_scales}
    assert sorted(os.listdir(export)) == ["config.json", sd3.WEIGHTS_NAME]
    model = sd3.load_mmdit(export, progress=False)
    assert model.cfg.num_layers == config.model.num_layers == 2
    assert model.cfg.dual_attention_layers == (0,) and model.cfg.qk_norm == "rms_norm"
    before = _snapshot(export)

    # A second run through the command line refuses (before training) to overwrite the export.
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "dpdmd_jax.toy.train_teacher", "--config=configs/toy_teacher.py:smoke",
         f"--workdir={workdir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "already holds an export" in proc.stderr and "overwrite=True" in proc.stderr
    assert _snapshot(export) == before
    train_teacher.check_export_dir(str(export), overwrite=True)  # allowed when asked

    # An export that dies half-way leaves the previous one intact and no temporary folders.
    def failing_save(model, out_dir, **kw):
        with open(os.path.join(out_dir, sd3.WEIGHTS_NAME), "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sd3, "save_mmdit", failing_save)
    with pytest.raises(KeyboardInterrupt):
        train_teacher.export_atomically(model, str(export))
    assert _snapshot(export) == before
    assert sorted(os.listdir(workdir)) == ["config.json", "metrics.jsonl", "summary.json", "teacher"]


def test_train_entry_point_trains_and_exports_the_unet_teacher(tmp_path):
    from dpdmd_jax.toy import train_teacher
    from dpdmd_jax.weights import unet

    config = _load_config("unet,smoke")
    summary = train_teacher.train_and_export(config, str(tmp_path / "run"))
    assert np.isfinite(summary["final_loss"]) and summary["steps"] == config.num_steps
    model = unet.load_unet(tmp_path / "run" / "teacher", progress=False)
    assert model.cfg.to_diffusers() == teacher.toy_unet_config(transformer_layers_per_block=(1, 1)).to_diffusers()
    config.sigma_sampling = "logit_normal"  # a flow noise-level rule for the VP teacher: refused up front
    with pytest.raises(ValueError, match="does not fit family='unet'"):
        train_teacher.train_and_export(config, str(tmp_path / "other"))
