"""The diversity targets of the DP-DMD step (`Distiller.diversity_target`) against the diffusers
schedulers the PyTorch pipelines use: K guided Euler steps of FlowMatchEulerDiscreteScheduler (flow,
the "line" target) and K guided DDIM steps of DDIMScheduler (VP, the x0 target), on the tiny test
backbones of tests/unit/test_distill.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.unit.test_distill import B, KEY, make, perturbed


def _guided(model_fn, z, t, cond, uncond, scale=3.5):
    p_c, p_u = np.asarray(model_fn(z, t, cond)), np.asarray(model_fn(z, t, uncond))
    return p_u + scale * (p_c - p_u)


@pytest.mark.parametrize("shift", [3.0, 0.375])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_flow_line_target_matches_diffusers_euler(k, shift):
    """(eps - z_tk) / (1 - t_k) with z_tk from a guided Euler loop on diffusers'
    FlowMatchEulerDiscreteScheduler (T = 4 steps at SD3's shift 3 and at the toy's 0.375; K = T gives
    t_k = 0; K = 1 gives the first velocity on any grid)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    d, params, fake, frozen, eps, cond, uncond, model = make("tiny_flow", {"distill.anchor_k": k,
                                                                           "teacher.shift": shift})
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(d.c.teacher.steps)
    apply = jax.jit(lambda z, t, c: d.backbone.apply(model, z, t / 1000.0, c))  # level = sigma = t / 1000
    z = torch.from_numpy(np.asarray(eps))
    for t in sched.timesteps[:k]:
        v = _guided(apply, jnp.asarray(z.numpy()), jnp.full((B,), float(t)), cond, uncond)
        z = sched.step(torch.from_numpy(v), t, z).prev_sample
    t_k = float(sched.sigmas[k])
    expected = (np.asarray(eps) - z.numpy()) / (1 - t_k)
    got = d.diversity_target(frozen, eps, cond, uncond)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_vp_x0_target_matches_diffusers_ddim(k):
    """The VP diversity target: K guided DDIM steps of diffusers' DDIMScheduler (SDXL settings,
    T = 4, "leading") from z_T = eps to z_tk, one more teacher evaluation, then
    x_target = (z_tk - sqrt(1 - abar_tk) eps_tea) / sqrt(abar_tk); and the student side of the
    loss is the first step's x0 (z_T - sqrt(1 - abar_T) eps_theta) / sqrt(abar_T) at T = 999."""
    from diffusers import DDIMScheduler

    d, params, fake, frozen, eps, cond, uncond, model = make("tiny_vp", {"distill.anchor_k": k})
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(d.c.teacher.steps)
    apply = jax.jit(lambda z, t, c: d.backbone.apply(model, z, t, c))
    z = torch.from_numpy(np.asarray(eps))
    for t in sched.timesteps[:k]:
        e = _guided(apply, jnp.asarray(z.numpy()), jnp.full((B,), float(t)), cond, uncond)
        z = sched.step(torch.from_numpy(e), t, z, eta=0.0).prev_sample
    t_k = int(sched.timesteps[k])
    z_tk = z.numpy().astype(np.float64)
    eps_tea = _guided(apply, jnp.asarray(z.numpy()), jnp.full((B,), float(t_k)), cond, uncond)
    a = float(sched.alphas_cumprod[t_k])
    x_target = (z_tk - np.sqrt(1 - a) * eps_tea) / np.sqrt(a)
    got = d.diversity_target(frozen, eps, cond, uncond)
    np.testing.assert_allclose(np.asarray(got), x_target, rtol=1e-4, atol=1e-4 * np.abs(x_target).max())
    # The student's side: loss_div = mean((x_theta - x_target)^2) with x_theta at timestep 999.
    student = perturbed(params)
    e_theta = np.asarray(d.predict(student, frozen.buffers, eps, 999.0, cond))
    a_T = float(sched.alphas_cumprod[999])
    x_theta = (np.asarray(eps, np.float64) - np.sqrt(1 - a_T) * e_theta) / np.sqrt(a_T)
    _, aux = d.generator_loss(student, fake, frozen, eps, cond, uncond, KEY)
    np.testing.assert_allclose(float(aux["loss_div"]), np.mean((x_theta - x_target) ** 2), rtol=1e-4)
