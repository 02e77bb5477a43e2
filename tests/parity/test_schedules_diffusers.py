"""Schedules and samplers against the diffusers schedulers the PyTorch pipelines use."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from dpdmd_jax.diffusion import flow, vp

RNG = np.random.default_rng(0)


def _randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _flow_sched(shift, n=None):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if n is not None:
        sched.set_timesteps(n)
    return sched


# ----------------------------------------------------------------------------- flow


@pytest.mark.parametrize("shift", [1.0, 1.7, 3.0, 5.0])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 28, 30, 50])
def test_flow_match_sigmas_equal_diffusers(shift, num_steps):
    ours = flow.flow_match_sigmas(num_steps, shift)
    ref = _flow_sched(shift, num_steps).sigmas.numpy()
    assert ours.dtype == np.float32 and ours.shape == (num_steps + 1,)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_sigmas_equal_diffusers_1000_step_grid(shift):
    ours = flow.training_sigmas(shift)
    ref = _flow_sched(shift, 1000).sigmas.numpy()
    assert ours.shape == (1000,) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref[:1000])  # randint(0, 1000) never draws the final 0
    assert ours.min() > 0.0 and ours[0] == 1.0


def test_euler_step_matches_diffusers_step():
    sched = _flow_sched(3.0, 4)
    z = _randn(2, 4, 8, 8)
    z_ours = jnp.asarray(z)
    for i, t in enumerate(sched.timesteps):
        v = _randn(2, 4, 8, 8)
        z = sched.step(torch.from_numpy(v), t, torch.from_numpy(z)).prev_sample.numpy()
        z_ours = flow.euler_step(z_ours, v, sched.sigmas[i].item(), sched.sigmas[i + 1].item())
        np.testing.assert_allclose(np.asarray(z_ours), z, rtol=0, atol=1e-6)


def test_add_noise_matches_diffusers_scale_noise_and_x0_round_trip():
    sched = _flow_sched(3.0, 30)
    x, eps = _randn(2, 4, 8, 8), _randn(2, 4, 8, 8)
    t, sigma = sched.timesteps[7:8], sched.sigmas[7].item()
    ref = sched.scale_noise(torch.from_numpy(x), t, torch.from_numpy(eps)).numpy()
    z = flow.add_noise(x, eps, sigma)
    np.testing.assert_allclose(np.asarray(z), ref, atol=1e-6)
    # With the exact velocity eps - x, x0_from_v recovers x.
    np.testing.assert_allclose(np.asarray(flow.x0_from_v(z, eps - x, sigma)), x, atol=1e-6)


def test_timestep_from_sigma():
    np.testing.assert_allclose(np.asarray(flow.timestep_from_sigma(jnp.array([1.0, 0.25]))), [1000.0, 250.0])
    sched = _flow_sched(3.0, 4)  # the pipeline's timesteps are 1000 * sigma too
    np.testing.assert_allclose(
        np.asarray(flow.timestep_from_sigma(sched.sigmas[:-1].numpy())), sched.timesteps.numpy(), rtol=1e-6
    )


# ----------------------------------------------------------------------------- vp


@pytest.mark.parametrize(
    "n, start, end", [(1000, 0.00085, 0.012), (1000, 0.0001, 0.02), (999, 0.001, 0.03), (500, 0.00085, 0.012)]
)
def test_scaled_linear_alphas_cumprod_equal_diffusers(n, start, end):
    ours = vp.scaled_linear_alphas_cumprod(n, start, end)
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(num_train_timesteps=n, beta_schedule="scaled_linear", beta_start=start, beta_end=end)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("num_steps", [1, 3, 4, 7, 25, 50])
def test_ddim_timesteps_equal_diffusers_leading(num_steps):
    sched = DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(num_steps)
    np.testing.assert_array_equal(vp.ddim_timesteps(num_steps), sched.timesteps.numpy())
    if num_steps == 4:
        np.testing.assert_array_equal(vp.ddim_timesteps(4), [751, 501, 251, 1])


def test_ddim_step_matches_diffusers_step():
    n = 10
    sched = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    sched.set_timesteps(n)
    abar = vp.scaled_linear_alphas_cumprod()
    ts = vp.ddim_timesteps(n)
    z = _randn(2, 4, 8, 8)
    for t in ts:  # compare step by step from the same input (errors would compound otherwise)
        prev = t - 1000 // n
        a_t, a_prev = abar[t], abar[prev] if prev >= 0 else abar[0]  # set_alpha_to_one=False
        eps = _randn(2, 4, 8, 8)
        z_ours = np.asarray(vp.ddim_step(z, eps, a_t, a_prev))
        z = sched.step(torch.from_numpy(eps), int(t), torch.from_numpy(z)).prev_sample.numpy()
        np.testing.assert_allclose(z_ours, z, rtol=2e-6, atol=2e-6)


def test_vp_add_noise_matches_diffusers_and_round_trips():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = vp.scaled_linear_alphas_cumprod()
    x, eps = _randn(3, 4, 4, 2), _randn(3, 4, 4, 2)
    t = np.array([20, 500, 980])
    ref = sched.add_noise(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(eps).permute(0, 3, 1, 2), torch.from_numpy(t)
    ).permute(0, 2, 3, 1).numpy()
    z = vp.add_noise(x, eps, abar[t])  # per-sample abar, NHWC
    np.testing.assert_allclose(np.asarray(z), ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vp.x0_from_eps(z, eps, abar[t])), x, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vp.eps_from_x0(z, x, abar[t])), eps, atol=1e-5)
    # DDIM to abar_prev = abar_t is the identity; to abar_prev = 1 it returns x0.
    np.testing.assert_allclose(np.asarray(vp.ddim_step(z, eps, abar[t], abar[t])), np.asarray(z), atol=1e-5)
    np.testing.assert_allclose(np.asarray(vp.ddim_step(z, eps, abar[t], 1.0)), x, atol=1e-5)
