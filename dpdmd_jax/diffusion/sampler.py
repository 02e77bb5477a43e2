"""The one guided sampler: the trainer's anchor and grids, the toy evaluation and (later) the
sampling script all step through here.

`predict(z, level, cond) -> prediction` is any backbone call (v or eps, per the schedule).
Classifier-free guidance runs cond and uncond as one batch of 2B, as the diffusers pipelines do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpdmd_jax.diffusion.schedules import Schedule, fold_in

Predict = Callable[[jax.Array, jax.Array, Any], jax.Array]
# (z, prediction, level, z_next, next_level) -> any pytree, stacked over the steps by `sample`.
Observe = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], Any]


def cfg(cond: jax.typing.ArrayLike, uncond: jax.typing.ArrayLike, scale: jax.typing.ArrayLike) -> jax.Array:
    """Classifier-free guidance: uncond + scale * (cond - uncond) (scale 1 -> cond)."""
    cond, uncond = jnp.asarray(cond), jnp.asarray(uncond)
    return uncond + scale * (cond - uncond)


def is_unguided(scale: Any) -> bool:
    """A Python scale of exactly 1 needs no unconditional half (a traced scale always runs it)."""
    return isinstance(scale, (int, float)) and scale == 1.0


def guided_prediction(predict: Predict, z: jax.Array, level, cond: Any, uncond: Any, scale) -> jax.Array:
    """CFG prediction; `uncond=None` or a Python scale of 1 gives the conditional prediction alone."""
    level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (z.shape[0],))
    if uncond is None or is_unguided(scale):
        return predict(z, level, cond)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)
    p = predict(jnp.concatenate([z, z]), jnp.concatenate([level, level]), both)
    p_cond, p_uncond = jnp.split(p, 2)
    return cfg(p_cond, p_uncond, scale).astype(z.dtype)


def sample(
    predict: Predict,
    schedule: Schedule,
    z: jax.Array,
    grid: np.ndarray | jax.Array,
    cond: Any,
    uncond: Any = None,
    cfg_scale: Any = 1.0,
    *,
    student: bool = False,
    key: jax.Array | None = None,
    first_index: int = 0,
    observe: Observe | None = None,
) -> jax.Array | tuple[jax.Array, Any]:
    """Steps `z` (at grid[0]) along `grid` as a scan (one traced model call, differentiable).

    student=False: the schedule's deterministic teacher (ODE) step; student=True: the student's
    step, which for VP re-noises with fresh noise from `key` folded with the step index (counted
    from `first_index`, for a grid that continues a longer one); `key` is one key, or one per
    sample ([B]) so that each sample's noise is independent of the batch it runs in.

    `observe(z, prediction, level, z_next, next_level)`, if given, is evaluated at every step and
    its outputs are returned stacked over steps as `(z_final, observed)`: per-step statistics of a
    trajectory (the automatic anchor choice) without keeping the trajectory itself in memory.
    """
    grid = jnp.asarray(grid, jnp.float32)
    steps = grid.shape[0] - 1
    if student and key is None:
        key = jax.random.key(0)  # unused by deterministic (flow) students

    def body(z, inp):
        i, level, next_level = inp
        p = guided_prediction(predict, z, level, cond, uncond, cfg_scale)
        if student:
            z_next = schedule.student_step(z, p, level, next_level, fold_in(key, i))
        else:
            z_next = schedule.teacher_step(z, p, level, next_level)
        return z_next, None if observe is None else observe(z, p, level, z_next, next_level)

    z, observed = jax.lax.scan(body, z, (first_index + jnp.arange(steps), grid[:-1], grid[1:]))
    return z if observe is None else (z, observed)


def image_key(root_seed: Any, p: Any, s: Any) -> jax.Array:
    """The key of sample-folder image (prompt index p, seed s) under a root seed (traced ints work,
    under vmap): its noise, and a VP student's per-step noise, derive from it alone, so an image does
    not depend on its batch, the device count or the order images are made in."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(root_seed), p), s)


def image_noise(root_seed: Any, p: jax.Array, s: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
    """The initial noises [B, *latent_shape] of images (p[b], s[b]) (`image_key`)."""
    keys = jax.vmap(lambda p, s: image_key(root_seed, p, s))(p, s)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), latent_shape))(keys)
