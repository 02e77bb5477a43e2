"""Method tests: they fail if the DP-DMD step is not exactly the method of docs/DESIGN.md.

Each runs on both schedules, through the two tiny test backbones: `tiny_flow` (rectified flow,
velocity prediction, the "line" target) and `tiny_vp` (VP epsilon prediction, the x0 target).
The hand-written references below use the schedules' formulas directly (not `Schedule`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import toy as toy_config
from dpdmd_jax import backbones
from dpdmd_jax.config import override
from dpdmd_jax.run.preflight import validate
from dpdmd_jax.diffusion import vp
from dpdmd_jax.distill import losses
from dpdmd_jax.core import Frozen
from dpdmd_jax.distill.step import Distiller
from dpdmd_jax.parallel.mesh import make_mesh

BACKBONES = ["tiny_flow", "tiny_vp"]
ABAR = vp.scaled_linear_alphas_cumprod().astype(np.float64)
KEY = jax.random.key(3)
B = 4


def config(backbone, overrides=None):
    c = toy_config.get_config("smoke")
    c = override(c, {"backbone": backbone, "model.source": "random", "data.kind": "random"})
    if backbone == "tiny_vp":
        c.distill.target = "denoise"  # the x0 target: the only one a VP schedule has
    c = override(c, overrides or {})
    validate(c)
    return c


def make(backbone="tiny_flow", overrides=None, seed=0):
    c = config(backbone, overrides)
    bb = backbones.get(c)
    model = bb.load(make_mesh(devices=jax.devices()[:1]))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    d = Distiller(c, bb, graphdef)
    rng = np.random.default_rng(seed)
    cond = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), bb.cond_spec(B))
    uncond = backbones.uncond_zeros(bb, B)
    eps = jnp.asarray(rng.standard_normal((B, *d.latent_shape)), jnp.float32)
    # A fake score that differs from the teacher, so the DMD direction is not zero.
    fake = perturbed(params, seed=seed + 10)
    return d, params, fake, Frozen(teacher=params, buffers=buffers), eps, cond, uncond, model


def perturbed(params, scale=0.05, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def tree_allclose(a, b, rtol, atol):
    """Leaf-wise allclose; `atol` is relative to each leaf's largest |value| (fp32 sums of many
    terms leave absolute errors of that order on near-cancelling entries)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=atol * max(np.abs(y).max(), 1e-30))


def bcast(level):
    return np.asarray(level, np.float64).reshape(-1, 1, 1, 1)


def x0_by_hand(backbone, z, prediction, level):
    """x0 = z - sigma v (flow); (z - sqrt(1 - abar_t) eps) / sqrt(abar_t) (VP, abar(-1) = 1)."""
    z, p = np.asarray(z, np.float64), np.asarray(prediction, np.float64)
    if backbone == "tiny_flow":
        return z - bcast(level) * p
    t = np.broadcast_to(np.asarray(level), (z.shape[0],)).astype(int)
    a = bcast(np.where(t < 0, 1.0, ABAR[np.clip(t, 0, 999)]))
    return (z - np.sqrt(1 - a) * p) / np.sqrt(a)


def abar_of(t):
    return 1.0 if t < 0 else float(ABAR[int(t)])


def student_step_by_hand(backbone, z, p, s, s_next, key):
    """Flow: Euler. VP: x0, re-noised to s_next with fresh noise (DMD2's student)."""
    if backbone == "tiny_flow":
        return z + (s_next - s) * p
    a_t, a_n = abar_of(s), abar_of(s_next)
    x0 = (z - np.sqrt(1 - a_t) * p) / np.sqrt(a_t)
    return np.sqrt(a_n) * x0 + np.sqrt(1 - a_n) * jax.random.normal(key, z.shape)


@pytest.mark.parametrize("simulation", ["rollout", "backward"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_dmd_gradient_never_reaches_first_step(backbone, simulation):
    """With the diversity weight at zero but the detach on, the loss has exactly zero gradient
    with respect to the initial noise: eps only reaches the DMD term through z_1."""
    d, params, fake, frozen, eps, cond, uncond, _ = make(
        backbone, {"dmd.simulation": simulation, "distill.lambda_div": 0.0, "distill.stop_grad_first_step": True})
    student = perturbed(params)
    grad_eps = jax.jit(jax.grad(lambda e: d.generator_loss(student, fake, frozen, e, cond, uncond, KEY)[0]))(eps)
    assert np.all(np.asarray(grad_eps) == 0.0)
    # Control: the same DMD term does depend on z_1 when z_1 is fed in directly (not a vacuous zero).
    k_sim, k_dmd = jax.random.split(KEY)
    _, z1 = d.first_step(student, frozen.buffers, eps, cond, k_sim)

    def dmd_from(z):
        x = d.remaining_steps(student, frozen.buffers, eps, z, cond, k_sim)
        g, _ = d.dmd_direction(fake, frozen, x, cond, uncond, k_dmd)
        return losses.dmd_loss(x, g)

    if simulation == "rollout":
        assert np.abs(np.asarray(jax.jit(jax.grad(dmd_from))(z1))).max() > 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_diversity_term_moves_only_the_first_step(backbone):
    """The gradient of loss_div equals the gradient of a first-step loss written by hand (the first
    student call vs its target: the line velocity for flow, the teacher's x0 for VP); the DMD part
    is unaffected by lambda_div."""
    lam = 0.7
    d, params, fake, frozen, eps, cond, uncond, _ = make(backbone, {"distill.lambda_div": lam})
    student = perturbed(params)

    def parts(p):
        loss, aux = d.generator_loss(p, fake, frozen, eps, cond, uncond, KEY)
        return jnp.stack([loss, aux["loss_dmd"], aux["loss_div"]])

    jac = jax.jit(jax.jacrev(parts))(student)  # one compile: gradients of all three parts
    g_total, g_dmd, g_div_ours = (jax.tree.map(lambda g, i=i: g[i], jac) for i in range(3))
    target = d.diversity_target(frozen, eps, cond, uncond)
    s0 = float(d.student_grid[0])
    a0 = abar_of(s0)

    def first_step_loss(p):
        pred = d.predict(p, frozen.buffers, eps, s0, cond)
        if backbone == "tiny_vp":  # x_theta = (z_T - sqrt(1 - abar_T) eps_theta) / sqrt(abar_T)
            pred = (eps - np.sqrt(1 - a0) * pred) / np.sqrt(a0)
        return jnp.mean((pred - target) ** 2)

    g_div = jax.jit(jax.grad(first_step_loss))(student)
    tree_allclose(g_div_ours, g_div, rtol=1e-4, atol=1e-5)
    tree_allclose(g_total, jax.tree.map(lambda a, b: a + lam * b, g_dmd, g_div), rtol=1e-4, atol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_div)) > 0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_dmd)) > 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_dmd_direction_matches_hand_computation(backbone):
    """g at x_s equals (p_real - p_fake) / mean|p_real| with p = x_s - x0 built by hand from the
    guided teacher and the fake model, at the level and noise drawn from the same key."""
    d, params, fake, frozen, eps, cond, uncond, _ = make(backbone)
    x = eps * 0.3
    g, level = d.dmd_direction(fake, frozen, x, cond, uncond, KEY)
    k_level, k_noise = jax.random.split(KEY)
    s = np.asarray(d.dmd_levels)[np.asarray(jax.random.randint(k_level, (B,), 0, d.dmd_levels.size))]
    np.testing.assert_array_equal(np.asarray(level), s)
    n = np.asarray(jax.random.normal(k_noise, x.shape), np.float64)
    if backbone == "tiny_flow":
        x_s = (1 - bcast(s)) * np.asarray(x) + bcast(s) * n
    else:
        a = bcast(ABAR[s.astype(int)])
        x_s = np.sqrt(a) * np.asarray(x) + np.sqrt(1 - a) * n
    x_s32 = jnp.asarray(x_s, jnp.float32)
    p_c = d.predict(params, frozen.buffers, x_s32, s, cond)
    p_u = d.predict(params, frozen.buffers, x_s32, s, uncond)
    p_real = x_s - x0_by_hand(backbone, x_s, np.asarray(p_u) + 3.5 * (np.asarray(p_c) - np.asarray(p_u)), s)
    p_fake = x_s - x0_by_hand(backbone, x_s, d.predict(fake, frozen.buffers, x_s32, s, cond), s)
    expected = (p_real - p_fake) / np.abs(p_real).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max())
    # And the student's DMD update direction is exactly g / x.size.
    grad_x = jax.grad(lambda xx: losses.dmd_loss(xx, g))(x)
    np.testing.assert_allclose(np.asarray(grad_x), np.asarray(g) / x.size, rtol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_real_equals_fake_gives_no_dmd_gradient(backbone):
    d, params, fake, frozen, eps, cond, uncond, _ = make(backbone, {"dmd.real_cfg_scale": 1.0,
                                                                    "distill.lambda_div": 0.0})
    student = perturbed(params)
    grads = jax.jit(jax.grad(lambda p: d.generator_loss(p, params, frozen, eps, cond, uncond, KEY)[0]))(student)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("simulation", ["rollout", "backward"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_lambda_zero_is_plain_dmd(backbone, simulation):
    """lambda_div = 0: the loss and its gradient equal a plain-DMD computation written out here
    (all N student steps trained, no diversity term, no detach)."""
    d, params, fake, frozen, eps, cond, uncond, _ = make(backbone, {"distill.lambda_div": 0.0,
                                                                    "dmd.simulation": simulation})
    student = perturbed(params)
    k_sim, k_dmd = jax.random.split(KEY)
    s = [float(v) for v in d.student_grid]
    j = int(jax.random.randint(k_sim, (), 0, len(s) - 1))
    step = lambda z, p, i: student_step_by_hand(backbone, z, p, s[i], s[i + 1], jax.random.fold_in(k_sim, i))

    @jax.jit
    def plain_dmd(p):
        z = eps
        if simulation == "rollout":
            for i in range(len(s) - 1):
                z = step(z, d.predict(p, frozen.buffers, z, s[i], cond), i)
            x = z
        else:  # one step j in 1..N with gradient, its input made without; its output is the x0 prediction
            for i in range(j):
                z = step(z, d.predict(jax.lax.stop_gradient(p), frozen.buffers, z, s[i], cond), i)
            pred = d.predict(p, frozen.buffers, z, s[j], cond)
            x = z - s[j] * pred if backbone == "tiny_flow" else (
                (z - np.sqrt(1 - abar_of(s[j])) * pred) / np.sqrt(abar_of(s[j])))
        g, _ = d.dmd_direction(fake, frozen, x, cond, uncond, k_dmd)
        return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - g)) ** 2)

    loss, aux = d.generator_loss(student, fake, frozen, eps, cond, uncond, KEY)
    np.testing.assert_allclose(float(loss), float(plain_dmd(student)), rtol=1e-5)
    assert float(loss) == float(aux["loss_dmd"])
    g_ours = jax.jit(jax.grad(lambda p: d.generator_loss(p, fake, frozen, eps, cond, uncond, KEY)[0]))(student)
    g_ref = jax.jit(jax.grad(plain_dmd))(student)
    tree_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    if simulation == "rollout":  # plain DMD trains the first step too: the noise reaches the loss
        grad_eps = jax.jit(jax.grad(lambda e: d.generator_loss(student, fake, frozen, e, cond, uncond, KEY)[0]))(eps)
        assert np.abs(np.asarray(grad_eps)).max() > 0


def test_flow_denoise_target_is_teacher_x0_at_anchor():
    d, params, fake, frozen, eps, cond, uncond, _ = make("tiny_flow", {"distill.target": "denoise",
                                                                       "distill.anchor_k": 2})
    z_tk, t_k = d.teacher_anchor(frozen, eps, cond, uncond)
    v = d.guided_prediction(params, frozen.buffers, z_tk, t_k, cond, uncond, 3.5)
    np.testing.assert_allclose(np.asarray(d.diversity_target(frozen, eps, cond, uncond)),
                               np.asarray(z_tk - t_k * v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_critic_loss_is_score_matching_on_student_samples(backbone):
    """Flow matching (target noise - x) for flow, the epsilon loss (target noise) for VP, on the
    student's N-step samples; the critic update never changes the student."""
    d, params, fake, frozen, eps, cond, uncond, _ = make(backbone)
    student = perturbed(params)
    loss = d.critic_loss(fake, student, frozen, eps, cond, KEY)
    x = np.asarray(d.sample(student, frozen.buffers, eps, cond, KEY), np.float64)
    k_level, k_noise = jax.random.split(KEY)
    level = np.asarray(d.dmd_level(k_level, B))
    n = np.asarray(jax.random.normal(k_noise, x.shape), np.float64)
    if backbone == "tiny_flow":
        x_s, target = (1 - bcast(level)) * x + bcast(level) * n, n - x
    else:
        a = bcast(ABAR[level.astype(int)])
        x_s, target = np.sqrt(a) * x + np.sqrt(1 - a) * n, n
    p = np.asarray(d.predict(fake, frozen.buffers, jnp.asarray(x_s, jnp.float32), level, cond))
    np.testing.assert_allclose(float(loss), np.mean((p - target) ** 2), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda st: d.critic_loss(fake, st, frozen, eps, cond, KEY)))(student)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_vp_student_samples_by_hand():
    """The VP student's 4 steps: x0 from eps at 999, 749, 499, 249, re-noised to the next timestep
    with noise from the key folded with the step index; the last step returns its x0."""
    d, params, fake, frozen, eps, cond, uncond, _ = make("tiny_vp")
    assert list(d.student_grid) == [999, 749, 499, 249, -1]
    z = np.asarray(eps, np.float64)
    for i in range(4):
        s, s_next = float(d.student_grid[i]), float(d.student_grid[i + 1])
        e = np.asarray(d.predict(params, frozen.buffers, jnp.asarray(z, jnp.float32), s, cond))
        z = student_step_by_hand("tiny_vp", z, e, s, s_next, jax.random.fold_in(KEY, i))
    got = d.sample(params, frozen.buffers, eps, cond, KEY)
    np.testing.assert_allclose(np.asarray(got), z, rtol=1e-4, atol=1e-4 * np.abs(z).max())
