"""Rectified flow in the SD3 convention.

    z_t = (1 - sigma) x + sigma eps,    v = eps - x,    network timestep = 1000 * sigma.

Sigma grids are host-side numpy (static under jit) and reproduce diffusers'
`FlowMatchEulerDiscreteScheduler` bit for bit, so a student trained here samples on exactly
the grid the PyTorch SD3 pipeline uses. The per-sample maths is jax.numpy; latents are NHWC
with the batch first, and sigma may be a scalar or a per-sample [B] vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.typing.ArrayLike


def flow_match_sigmas(
    num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000
) -> np.ndarray:
    """Sampling grid of `num_steps` shifted sigmas plus a final 0 (length num_steps + 1).

    Equals diffusers `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=shift)
    .set_timesteps(num_steps); .sigmas` exactly (float32). 4 steps at shift 3 give
    [1.0, 0.8577, 0.6022, 0.0089, 0.0].
    """
    n = num_train_timesteps
    # The scheduler's constructor shifts its 1000-point training grid in float32 and keeps the
    # end points as sigma_max / sigma_min ...
    shift32, one = np.float32(shift), np.float32(1.0)
    train_end = np.float32(1.0) / np.float32(n)  # timesteps 1..n over n, last = 1/n
    sigma_min = shift32 * train_end / (one + np.float32(shift - 1.0) * train_end)
    sigma_max = shift32 * one / (one + np.float32(shift - 1.0) * one)
    # ... and set_timesteps spaces the new grid between those *already shifted* end points and
    # then shifts again (float64 numpy), so the last sigma is shift(shift(1/n)) ~ 0.0089 for
    # shift 3 rather than shift(1/n) ~ 0.003. That double shift is reproduced on purpose: it is
    # the grid the SD3 pipeline and the DP-DMD reference code actually use.
    sigmas = np.linspace(float(sigma_max) * n, float(sigma_min) * n, num_steps) / n
    sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def training_sigmas(shift: float = 3.0, num_train_timesteps: int = 1000) -> np.ndarray:
    """The `num_train_timesteps` sigmas of `set_timesteps(num_train_timesteps)` (terminal 0 dropped).

    The DP-DMD reference draws the DMD noise level as `sched.sigmas[randint(0, 1000)]`, i.e.
    uniformly from exactly these values (the appended 0 is never drawn).
    """
    return flow_match_sigmas(num_train_timesteps, shift, num_train_timesteps)[:-1]


def per_sample(s: ArrayLike, ndim: int) -> jax.Array:
    """Reshape a scalar or [B] schedule value so it broadcasts over trailing (H, W, C) axes."""
    s = jnp.asarray(s)
    return s.reshape(s.shape + (1,) * (ndim - s.ndim))


def _compute_dtype(dtype) -> jnp.dtype:
    # Schedulers step in float32: upcast bf16/fp16, keep float64 if x64 is on.
    return jnp.promote_types(dtype, jnp.float32)


def add_noise(x: ArrayLike, noise: ArrayLike, sigma: ArrayLike) -> jax.Array:
    """Forward process z_sigma = (1 - sigma) x + sigma noise."""
    x, noise = jnp.asarray(x), jnp.asarray(noise)
    ct = _compute_dtype(x.dtype)
    s = per_sample(sigma, x.ndim).astype(ct)
    return ((1.0 - s) * x.astype(ct) + s * noise.astype(ct)).astype(x.dtype)


def x0_from_v(z: ArrayLike, v: ArrayLike, sigma: ArrayLike) -> jax.Array:
    """Clean-sample prediction x0 = z - sigma v (exact for a straight path)."""
    z, v = jnp.asarray(z), jnp.asarray(v)
    ct = _compute_dtype(z.dtype)
    s = per_sample(sigma, z.ndim).astype(ct)
    return (z.astype(ct) - s * v.astype(ct)).astype(z.dtype)


def euler_step(z: ArrayLike, v: ArrayLike, sigma: ArrayLike, sigma_next: ArrayLike) -> jax.Array:
    """One Euler step z + (sigma_next - sigma) v, as FlowMatchEulerDiscreteScheduler.step."""
    z, v = jnp.asarray(z), jnp.asarray(v)
    ct = _compute_dtype(z.dtype)
    dt = per_sample(sigma_next, z.ndim).astype(ct) - per_sample(sigma, z.ndim).astype(ct)
    return (z.astype(ct) + dt * v.astype(ct)).astype(z.dtype)


def timestep_from_sigma(sigma: ArrayLike, num_train_timesteps: int = 1000) -> jax.Array:
    """Network conditioning timestep 1000 * sigma (a float, not rounded), float32."""
    return jnp.asarray(sigma, jnp.float32) * jnp.float32(num_train_timesteps)
