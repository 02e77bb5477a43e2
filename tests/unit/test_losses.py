"""DP-DMD losses: hand-computed values, exact gradients, and no gradient into targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpdmd_jax.diffusion import sampler
from dpdmd_jax.diffusion.schedules import RectifiedFlow, VPEpsilon
from dpdmd_jax.distill import losses

RNG = np.random.default_rng(0)


def _randn(*shape):
    return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


def test_cfg_algebra():
    cond, uncond = _randn(2, 3, 3, 4), _randn(2, 3, 3, 4)
    np.testing.assert_allclose(sampler.cfg(cond, uncond, 1.0), cond, atol=1e-6)
    np.testing.assert_array_equal(sampler.cfg(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(sampler.cfg(jnp.float32(2.0), jnp.float32(1.0), 3.5), 4.5)


def _hand_example():
    # B=2, H=W=1, C=2.
    x_s = jnp.float32([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    x0_real = jnp.float32([[[[0.0, 0.0]]], [[[1.0, -3.0]]]])
    x0_fake = jnp.float32([[[[0.5, 1.0]]], [[[2.0, -1.0]]]])
    # sample 0: p_real = [1, 2], p_fake = [0.5, 1], mean|p_real| = 1.5 -> g = [0.5, 1] / 1.5
    # sample 1: p_real = [-1, 3], p_fake = [-2, 1], mean|p_real| = 2  -> g = [1, 2] / 2
    g = np.float32([[[[1 / 3, 2 / 3]]], [[[0.5, 1.0]]]])
    return x_s, x0_real, x0_fake, g


def test_dmd_gradient_hand_computed_per_sample_normaliser():
    x_s, x0_real, x0_fake, want = _hand_example()
    g = losses.dmd_gradient(x_s, x0_real, x0_fake)
    assert g.shape == x_s.shape and g.dtype == jnp.float32
    np.testing.assert_allclose(g, want, rtol=1e-6)
    # A batch-global normaliser (mean 1.75) would give different numbers.
    assert not np.allclose(g, np.float32([[[[0.5, 1.0]]], [[[1.0, 2.0]]]]) / 1.75)
    # -g (the descent direction on x) points from the fake x0 to the real x0.
    norm = np.float32([1.5, 2.0]).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(-g * norm, x0_real - x0_fake, rtol=1e-6)


def test_dmd_gradient_nan_to_num_when_normaliser_is_zero():
    x_s, x0_real, x0_fake, want = _hand_example()
    x0_real = x0_real.at[1].set(x_s[1])  # sample 1: p_real = 0, so mean|p_real| = 0
    # p_fake = 0 too: 0/0 = nan -> 0.
    g = losses.dmd_gradient(x_s, x0_real, x_s)
    np.testing.assert_array_equal(g[1], 0.0)
    # p_real - p_fake = x0_fake - x0_real = [2, -1]: [+inf, -inf] -> [+max, -max] float32.
    g = losses.dmd_gradient(x_s, x0_real, x0_fake)
    big = np.finfo(np.float32).max
    np.testing.assert_array_equal(g[1], [[[big, -big]]])
    np.testing.assert_allclose(g[0], want[0], rtol=1e-6)  # other samples unaffected


def test_dmd_gradient_is_stop_gradient():
    x_s, x0_real, x0_fake, _ = _hand_example()
    for i in range(3):
        def f(a, i=i):
            args = [x_s, x0_real, x0_fake]
            args[i] = a
            return jnp.sum(losses.dmd_gradient(*args) ** 2)

        np.testing.assert_array_equal(jax.grad(f)([x_s, x0_real, x0_fake][i]), 0.0)


def test_dmd_loss_value_and_exact_gradient():
    x, g = _randn(2, 4, 4, 3), _randn(2, 4, 4, 3)  # size 96: not a power of two
    loss, (gx, gg) = jax.jit(jax.value_and_grad(losses.dmd_loss, argnums=(0, 1)))(x, g)
    np.testing.assert_array_equal(gx, g / x.size)
    np.testing.assert_array_equal(gg, 0.0)  # no gradient into the target direction
    np.testing.assert_allclose(loss, 0.5 * jnp.mean(g**2), rtol=1e-7)

    # Same value and gradient as the reference formulation 0.5 * mean((x - sg(x - g))^2).
    def ref(x, g):
        return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - g)) ** 2)

    np.testing.assert_allclose(losses.dmd_loss(x, g), ref(x, g), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(losses.dmd_loss)(x, g), jax.grad(ref)(x, g), rtol=1e-5, atol=1e-9)


def test_dmd_loss_is_float32_for_bf16_samples():
    x, g = _randn(2, 4, 4, 3).astype(jnp.bfloat16), _randn(2, 4, 4, 3)
    loss = losses.dmd_loss(x, g)
    assert loss.dtype == jnp.float32
    gx = jax.grad(losses.dmd_loss)(x, g)
    assert gx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(gx, (g / x.size).astype(jnp.bfloat16))


def test_line_velocity_target():
    x, eps = _randn(2, 3, 3, 4), _randn(2, 3, 3, 4)
    # If the anchor lies on the straight path from x to eps, the target is that path's velocity.
    t_k = jnp.float32([0.6022, 0.0089])
    z_tk = (1 - t_k)[:, None, None, None] * x + t_k[:, None, None, None] * eps
    np.testing.assert_allclose(losses.line_velocity_target(eps, z_tk, t_k), eps - x, atol=1e-5)
    # t_k = 0 (K = T): the anchor is the teacher's final sample.
    np.testing.assert_array_equal(losses.line_velocity_target(eps, x, 0.0), eps - x)
    # Hand value: (3 - 1) / (1 - 0.5) = 4.
    np.testing.assert_allclose(losses.line_velocity_target(jnp.float32(3.0), jnp.float32(1.0), 0.5), 4.0)


def test_diversity_loss_value_and_gradients():
    pred, target = _randn(2, 3, 3, 4), _randn(2, 3, 3, 4)
    loss, (gp, gt) = jax.value_and_grad(losses.diversity_loss, argnums=(0, 1))(pred, target)
    np.testing.assert_allclose(loss, np.mean((np.asarray(pred) - np.asarray(target)) ** 2), rtol=1e-6)
    np.testing.assert_allclose(gp, 2 * (pred - target) / pred.size, rtol=1e-6)
    np.testing.assert_array_equal(gt, 0.0)
    assert losses.diversity_loss(pred.astype(jnp.bfloat16), target).dtype == jnp.float32


@pytest.mark.parametrize("schedule", [RectifiedFlow(), VPEpsilon()], ids=["flow", "vp"])
def test_critic_loss_is_the_schedules_score_matching(schedule):
    """Flow: mean((v - (noise - x))^2), flow matching; VP: mean((eps_hat - noise)^2), the epsilon loss."""
    p, noise, x = _randn(2, 3, 3, 4), _randn(2, 3, 3, 4), _randn(2, 3, 3, 4)
    loss_fn = lambda p, n, x: losses.regression_loss(p, schedule.critic_target(x, n))
    loss, (gp, gn, gx) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(p, noise, x)
    target = np.asarray(noise) - np.asarray(x) if schedule.name == "flow" else np.asarray(noise)
    np.testing.assert_allclose(loss, np.mean((np.asarray(p) - target) ** 2), rtol=1e-6)
    np.testing.assert_allclose(gp, 2 * (p - target) / p.size, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(gn, 0.0)
    np.testing.assert_array_equal(gx, 0.0)
    # The exact prediction has zero loss.
    assert loss_fn(jnp.asarray(target), noise, x) == 0.0
