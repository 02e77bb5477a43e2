"""Method tests: they fail if the DP-DMD step is not exactly the method of DESIGN.md section 2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import toy as toy_config
from dpdmd_jax.config import override
from dpdmd_jax.diffusion import flow
from dpdmd_jax.distill import losses
from dpdmd_jax.distill.step import Cond, Distiller, Frozen
from dpdmd_jax.models.mmdit import MMDiT, MMDiTConfig


def make(overrides=None, seed=0):
    c = override(toy_config.get_config("smoke"), overrides or {})
    model = MMDiT(MMDiTConfig(**dict(c.model.arch)), rngs=nnx.Rngs(seed))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    d = Distiller(c, graphdef, (8, 8, 3))
    rng = np.random.default_rng(seed)
    b = 4
    cond = Cond(jnp.asarray(rng.standard_normal((b, 4, 32)), jnp.float32),
                jnp.asarray(rng.standard_normal((b, 32)), jnp.float32))
    uncond = Cond(jnp.zeros((b, 4, 32)), jnp.zeros((b, 32)))
    eps = jnp.asarray(rng.standard_normal((b, 8, 8, 3)), jnp.float32)
    # A fake score that differs from the teacher, so the DMD direction is not zero.
    fake = jax.tree.map(lambda p: p + 0.02 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    return d, params, fake, Frozen(teacher=params, buffers=buffers), eps, cond, uncond, model


def perturbed(params, scale=0.02, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


KEY = jax.random.key(3)


def tree_allclose(a, b, rtol, atol):
    """Leaf-wise allclose; `atol` is relative to each leaf's largest |value| (fp32 sums of many
    terms leave absolute errors of that order on near-cancelling entries)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=atol * max(np.abs(y).max(), 1e-30))


@pytest.mark.parametrize("simulation", ["rollout", "backward"])
def test_dmd_gradient_never_reaches_first_step(simulation):
    """With the diversity weight at zero but the detach on, the loss has exactly zero gradient
    with respect to the initial noise: eps only reaches the DMD term through z_1."""
    d, params, fake, frozen, eps, cond, uncond, _ = make(
        {"dmd.simulation": simulation, "distill.lambda_div": 0.0, "distill.stop_grad_first_step": True})
    student = perturbed(params)
    grad_eps = jax.jit(jax.grad(lambda e: d.generator_loss(student, fake, frozen, e, cond, uncond, KEY)[0]))(eps)
    assert np.all(np.asarray(grad_eps) == 0.0)
    # Control: the same DMD term does depend on z_1 when z_1 is fed in directly (not a vacuous zero).
    _, z1 = d.first_step(student, frozen.buffers, eps, cond)

    def dmd_from(z):
        x = d.remaining_steps(student, frozen.buffers, eps, z, cond, jax.random.split(KEY)[0])
        g, _ = d.dmd_direction(fake, frozen, x, cond, uncond, jax.random.split(KEY)[1])
        return losses.dmd_loss(x, g)

    if simulation == "rollout":
        assert np.abs(np.asarray(jax.jit(jax.grad(dmd_from))(z1))).max() > 0


def test_diversity_term_moves_only_the_first_step():
    """The gradient of loss_div equals the gradient of a first-step loss written by hand (first
    student call vs the line target); the DMD part is unaffected by lambda_div."""
    lam = 0.7
    d, params, fake, frozen, eps, cond, uncond, _ = make({"distill.lambda_div": lam})
    student = perturbed(params)

    def parts(p):
        loss, aux = d.generator_loss(p, fake, frozen, eps, cond, uncond, KEY)
        return jnp.stack([loss, aux["loss_dmd"], aux["loss_div"]])

    jac = jax.jit(jax.jacrev(parts))(student)  # one compile: gradients of all three parts
    g_total, g_dmd, g_div_ours = (jax.tree.map(lambda g, i=i: g[i], jac) for i in range(3))
    z_tk, t_k = d.teacher_anchor(frozen, eps, cond, uncond)
    target = (eps - z_tk) / (1 - t_k)

    def first_step_loss(p):
        v = d.velocity(p, frozen.buffers, eps, 1.0, cond)  # sigma_0 = 1 on the default grid
        return jnp.mean((v - target) ** 2)

    g_div = jax.jit(jax.grad(first_step_loss))(student)
    tree_allclose(g_div_ours, g_div, rtol=1e-4, atol=1e-5)
    tree_allclose(g_total, jax.tree.map(lambda a, b: a + lam * b, g_dmd, g_div), rtol=1e-4, atol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_div)) > 0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_dmd)) > 0


def test_dmd_direction_matches_hand_computation():
    """g at x_s equals (p_real - p_fake) / mean|p_real| with p = x_s - x0 built by hand from the
    guided teacher and the fake model, at the sigma and noise drawn from the same key."""
    d, params, fake, frozen, eps, cond, uncond, _ = make()
    x = eps * 0.3
    g, sigma = d.dmd_direction(fake, frozen, x, cond, uncond, KEY)
    k_sigma, k_noise = jax.random.split(KEY)
    s = np.asarray(d.dmd_sigmas)[np.asarray(jax.random.randint(k_sigma, (4,), 0, d.dmd_sigmas.size))]
    np.testing.assert_array_equal(np.asarray(sigma), s)
    x_s = (1 - s[:, None, None, None]) * x + s[:, None, None, None] * jax.random.normal(k_noise, x.shape)
    v_c = d.velocity(params, frozen.buffers, x_s, s, cond)
    v_u = d.velocity(params, frozen.buffers, x_s, s, uncond)
    v_real = v_u + 3.5 * (v_c - v_u)
    v_fake = d.velocity(fake, frozen.buffers, x_s, s, cond)
    p_real = s[:, None, None, None] * np.asarray(v_real)  # x_s - x0 = sigma * v
    p_fake = s[:, None, None, None] * np.asarray(v_fake)
    expected = (p_real - p_fake) / np.abs(p_real).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=2e-4, atol=1e-6)
    # And the student's DMD update direction is exactly g / x.size.
    grad_x = jax.grad(lambda xx: losses.dmd_loss(xx, g))(x)
    np.testing.assert_allclose(np.asarray(grad_x), np.asarray(g) / x.size, rtol=1e-6)  # 1 ulp: x.size=768


def test_real_equals_fake_gives_no_dmd_gradient():
    d, params, fake, frozen, eps, cond, uncond, _ = make({"dmd.real_cfg_scale": 1.0, "distill.lambda_div": 0.0})
    student = perturbed(params)
    grads = jax.jit(jax.grad(lambda p: d.generator_loss(p, params, frozen, eps, cond, uncond, KEY)[0]))(student)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("simulation", ["rollout", "backward"])
def test_lambda_zero_is_plain_dmd(simulation):
    """lambda_div = 0: the loss and its gradient equal a plain-DMD computation written out here
    (all N student steps trained, no diversity term, no detach)."""
    d, params, fake, frozen, eps, cond, uncond, _ = make({"distill.lambda_div": 0.0, "dmd.simulation": simulation})
    student = perturbed(params)
    k_sim, k_dmd = jax.random.split(KEY)
    s = d.student_sigmas

    j = int(jax.random.randint(k_sim, (), 0, len(s) - 1))

    @jax.jit
    def plain_dmd(p):
        if simulation == "rollout":
            z = eps
            for i in range(len(s) - 1):
                z = z + (s[i + 1] - s[i]) * d.velocity(p, frozen.buffers, z, s[i], cond)
            x = z
        else:  # one step j in 1..N with gradient, its input made without
            z = eps
            for i in range(j):
                z = z + (s[i + 1] - s[i]) * d.velocity(jax.lax.stop_gradient(p), frozen.buffers, z, s[i], cond)
            x = z - s[j] * d.velocity(p, frozen.buffers, z, s[j], cond)
        g, _ = d.dmd_direction(fake, frozen, x, cond, uncond, k_dmd)
        return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - g)) ** 2)

    loss, aux = d.generator_loss(student, fake, frozen, eps, cond, uncond, KEY)
    np.testing.assert_allclose(float(loss), float(plain_dmd(student)), rtol=1e-5)
    assert float(loss) == float(aux["loss_dmd"])
    g_ours = jax.jit(jax.grad(lambda p: d.generator_loss(p, fake, frozen, eps, cond, uncond, KEY)[0]))(student)
    g_ref = jax.jit(jax.grad(plain_dmd))(student)
    tree_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    # Plain DMD trains the first step too: its gradient w.r.t. the noise is not zero.
    grad_eps = jax.jit(jax.grad(lambda e: d.generator_loss(student, fake, frozen, e, cond, uncond, KEY)[0]))(eps)
    assert np.abs(np.asarray(grad_eps)).max() > 0 if simulation == "rollout" else True


@pytest.mark.parametrize("k", [1, 3, 4])
def test_teacher_target_matches_independent_computation(k):
    """(eps - z_tk) / (1 - t_k) with z_tk from a hand-written guided Euler loop on diffusers'
    FlowMatchEulerDiscreteScheduler (30... here T=4 steps, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    d, params, fake, frozen, eps, cond, uncond, model = make({"distill.anchor_k": k})
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(d.c.teacher.steps)
    sig = sched.sigmas.numpy()
    z = np.asarray(eps)
    for i in range(k):
        t = np.full((4,), 1000 * sig[i], np.float32)
        v_c = np.asarray(model(jnp.asarray(z), t, cond.context, cond.pooled))
        v_u = np.asarray(model(jnp.asarray(z), t, uncond.context, uncond.pooled))
        z = z + (sig[i + 1] - sig[i]) * (v_u + 3.5 * (v_c - v_u))
    t_k = sig[k]
    expected = (np.asarray(eps) - z) / (1 - t_k) if t_k < 1 else None
    got = d.diversity_target(frozen, eps, cond, uncond)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def test_denoise_target_is_teacher_x0_at_anchor():
    d, params, fake, frozen, eps, cond, uncond, _ = make({"distill.target": "denoise", "distill.anchor_k": 2})
    z_tk, t_k = d.teacher_anchor(frozen, eps, cond, uncond)
    v = d.guided_velocity(params, frozen.buffers, z_tk, t_k, cond, uncond, 3.5)
    np.testing.assert_allclose(np.asarray(d.diversity_target(frozen, eps, cond, uncond)),
                               np.asarray(z_tk - t_k * v), rtol=1e-5, atol=1e-6)


def test_critic_loss_is_flow_matching_on_student_samples():
    d, params, fake, frozen, eps, cond, uncond, _ = make()
    student = perturbed(params)
    loss = d.critic_loss(fake, student, frozen, eps, cond, KEY)
    x = d.sample(student, frozen.buffers, eps, cond)
    k_sigma, k_noise = jax.random.split(KEY)
    sigma = d.dmd_sigma(k_sigma, 4)
    n = jax.random.normal(k_noise, x.shape)
    v = d.velocity(fake, frozen.buffers, flow.add_noise(x, n, sigma), sigma, cond)
    np.testing.assert_allclose(float(loss), float(jnp.mean((v - (n - x)) ** 2)), rtol=1e-6)
    # The critic update never changes the student (its samples are made without gradient).
    grads = jax.jit(jax.grad(lambda st: d.critic_loss(fake, st, frozen, eps, cond, KEY)))(student)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
