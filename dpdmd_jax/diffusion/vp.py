"""Variance-preserving (epsilon-prediction) diffusion, the SDXL convention.

    z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,   abar_t = prod_{s<=t} (1 - beta_s).

The schedule is host-side numpy and equals diffusers' `DDPMScheduler` / `DDIMScheduler`
`alphas_cumprod` bit for bit. Per-sample maths is jax.numpy on NHWC latents; abar may be a
scalar or a per-sample [B] vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpdmd_jax.diffusion.flow import per_sample

ArrayLike = jax.typing.ArrayLike


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    # torch.linspace(float32) fills the first half as start + step*i and the second half as
    # end - step*(n-1-i), each with a fused multiply-add (one rounding); np.linspace differs
    # by an ulp on ~30% of entries. float64 holds each product and sum exactly here, so one
    # cast to float32 reproduces the fused rounding.
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(n - 1))
    i = np.arange(n)
    lin = np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i))
    return lin.astype(np.float32)


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """abar_t for the "scaled_linear" betas of SD / SDXL, float32, shape [num_train_timesteps].

    betas = linspace(sqrt(beta_start), sqrt(beta_end), N)**2 in float32; equals diffusers
    `DDPMScheduler(beta_schedule="scaled_linear", ...).alphas_cumprod` exactly.
    """
    betas = _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    alphas = np.float32(1.0) - betas
    # torch's CPU cumprod accumulates float32 in float64 (the schedulers are built on CPU).
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def ddim_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1
) -> np.ndarray:
    """"leading" DDIM timesteps (SDXL default), descending int64, e.g. 4 steps -> [751, 501, 251, 1].

    Equals diffusers `DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    .set_timesteps(num_steps).timesteps`.
    """
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps, dtype=np.int64) * ratio)[::-1].copy() + steps_offset


def _prep(z: ArrayLike, abar: ArrayLike) -> tuple[jax.Array, jax.Array, jnp.dtype]:
    z = jnp.asarray(z)
    ct = jnp.promote_types(z.dtype, jnp.float32)  # schedulers step in float32
    return z, per_sample(abar, z.ndim).astype(ct), ct


def add_noise(x: ArrayLike, noise: ArrayLike, abar: ArrayLike) -> jax.Array:
    """Forward process sqrt(abar) x + sqrt(1 - abar) noise."""
    x, a, ct = _prep(x, abar)
    out = jnp.sqrt(a) * x.astype(ct) + jnp.sqrt(1.0 - a) * jnp.asarray(noise).astype(ct)
    return out.astype(x.dtype)


def x0_from_eps(z: ArrayLike, eps: ArrayLike, abar: ArrayLike) -> jax.Array:
    """Clean-sample prediction (z - sqrt(1 - abar) eps) / sqrt(abar)."""
    z, a, ct = _prep(z, abar)
    out = (z.astype(ct) - jnp.sqrt(1.0 - a) * jnp.asarray(eps).astype(ct)) / jnp.sqrt(a)
    return out.astype(z.dtype)


def eps_from_x0(z: ArrayLike, x0: ArrayLike, abar: ArrayLike) -> jax.Array:
    """Noise implied by a clean-sample prediction: (z - sqrt(abar) x0) / sqrt(1 - abar)."""
    z, a, ct = _prep(z, abar)
    out = (z.astype(ct) - jnp.sqrt(a) * jnp.asarray(x0).astype(ct)) / jnp.sqrt(1.0 - a)
    return out.astype(z.dtype)


def ddim_step(z: ArrayLike, eps: ArrayLike, abar_t: ArrayLike, abar_prev: ArrayLike) -> jax.Array:
    """Deterministic DDIM (eta = 0): predict x0, re-noise it to abar_prev with the same eps."""
    z, a_t, ct = _prep(z, abar_t)
    a_prev = per_sample(abar_prev, z.ndim).astype(ct)
    eps = jnp.asarray(eps).astype(ct)
    x0 = (z.astype(ct) - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    return (jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps).astype(z.dtype)
