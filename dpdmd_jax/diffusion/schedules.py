"""One shape for every noise schedule: rectified flow (SD3) and VP epsilon (SDXL).

The distillation engine speaks only `Schedule`. A *level* is the schedule's own noise
coordinate, a float32 scalar or [B] vector: sigma in [0, 1] for flow, the integer timestep
0..999 for VP, with `CLEAN` (flow: 0, VP: -1) meaning "no noise left". Grids are host-side
numpy arrays of levels that end at `CLEAN`; they are static under jit. The maths lives in
`flow.py` / `vp.py`; this module only gives it one interface.

Roles of the config sections (each schedule reads the fields that are its own):
  teacher   -> `teacher_grid(c.teacher)`     flow: steps, shift | VP: steps (DDIM "leading")
  student   -> `student_grid(c.student)`     flow: sigmas       | VP: timesteps
  dmd       -> `training_levels(c.dmd)`      flow: shift, sigma_min/max | VP: timestep_min/max
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from dpdmd_jax.core import Schedule  # noqa: F401  (the interface; its home is core)
from dpdmd_jax.diffusion import flow, vp

ArrayLike = jax.typing.ArrayLike


def _per_sample(key: jax.Array) -> bool:
    """A batch of keys: typed keys of shape [B], or raw uint32 keys of shape [B, 2]."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim > (0 if typed else 1)


def fold_in(key: jax.Array, i: ArrayLike) -> jax.Array:
    """`jax.random.fold_in` for one key or for one key per sample ([B] keys)."""
    return jax.vmap(jax.random.fold_in, (0, None))(key, i) if _per_sample(key) else jax.random.fold_in(key, i)


def normal_like(key: jax.Array, x: ArrayLike) -> jax.Array:
    """N(0, 1) noise of x's shape and dtype: from one key for the whole batch, or from one key per
    sample ([B] keys), so that each sample's noise depends on its own key alone, whatever batch it
    is drawn in (the sampling script's guarantee: same (prompt, seed), same image)."""
    x = jnp.asarray(x)
    if not _per_sample(key):
        return jax.random.normal(key, x.shape, x.dtype)
    return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(key)


@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
    """z = (1 - sigma) x + sigma eps, v = eps - x (SD3 / SD3.5)."""

    name: str = "flow"
    prediction: str = "v"
    clean: float = 0.0
    targets: tuple[str, ...] = ("line", "denoise")

    def model_time(self, level):
        return flow.timestep_from_sigma(level)

    def add_noise(self, x, noise, level):
        return flow.add_noise(x, noise, level)

    def to_x0(self, z, prediction, level):
        return flow.x0_from_v(z, prediction, level)

    def teacher_step(self, z, prediction, level, next_level):
        return flow.euler_step(z, prediction, level, next_level)

    def student_step(self, z, prediction, level, next_level, key=None):
        del key  # Euler is deterministic
        return flow.euler_step(z, prediction, level, next_level)

    def critic_target(self, x, noise):
        return jnp.asarray(noise) - jnp.asarray(x)

    def teacher_grid(self, teacher):
        return flow.flow_match_sigmas(teacher.steps, teacher.shift)

    def student_grid(self, student):
        return np.asarray(list(student.sigmas) + [self.clean], np.float32)

    def training_levels(self, dmd):
        grid = flow.training_sigmas(dmd.shift)
        return grid[(grid >= dmd.sigma_min) & (grid <= dmd.sigma_max)]

    def problems(self, c):
        p = []
        s = list(c.student.sigmas)
        if len(s) < 2 or any(not 0 < x <= 1 for x in s) or any(a <= b for a, b in zip(s, s[1:])):
            p.append(f"student.sigmas={s} must hold >= 2 strictly decreasing values in (0, 1] (0 is appended); "
                     "DP-DMD needs a first step and at least one DMD step.")
        if not 0.0 <= c.dmd.sigma_min < c.dmd.sigma_max <= 1.0:
            p.append(f"dmd.sigma_min={c.dmd.sigma_min}, dmd.sigma_max={c.dmd.sigma_max} must satisfy "
                     "0 <= sigma_min < sigma_max <= 1.")
        return p


@dataclasses.dataclass(frozen=True)
class VPEpsilon:
    """z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, epsilon prediction, scaled-linear betas (SD / SDXL).

    Level t is an integer timestep stored as float32; `clean` = -1 maps to abar = 1, so the last
    student step returns its x0 exactly and the last teacher DDIM step lands on x0 (diffusers'
    SDXL DDIM config uses abar_0 = 0.99915 there instead: `set_alpha_to_one=False`).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    name: str = "vp"
    prediction: str = "eps"
    clean: float = -1.0
    targets: tuple[str, ...] = ("denoise",)  # the x0 target; no straight path to draw a line on

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return vp.scaled_linear_alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end)

    def abar(self, level: ArrayLike) -> jax.Array:
        t = jnp.asarray(level, jnp.float32)
        table = jnp.asarray(self.alphas_cumprod)
        return jnp.where(t < 0, jnp.float32(1.0), table[jnp.clip(t, 0, self.num_train_timesteps - 1).astype(jnp.int32)])

    def model_time(self, level):
        return jnp.asarray(level, jnp.float32)

    def add_noise(self, x, noise, level):
        return vp.add_noise(x, noise, self.abar(level))

    def to_x0(self, z, prediction, level):
        return vp.x0_from_eps(z, prediction, self.abar(level))

    def teacher_step(self, z, prediction, level, next_level):
        return vp.ddim_step(z, prediction, self.abar(level), self.abar(next_level))

    def student_step(self, z, prediction, level, next_level, key):
        # DMD2's 4-step SDXL student: predict x0, re-noise it to the next timestep with fresh noise.
        x0 = self.to_x0(z, prediction, level)
        noise = normal_like(key, x0)  # one key, or one per sample
        return vp.add_noise(x0, noise, self.abar(next_level))  # abar(clean) = 1: exactly x0

    def critic_target(self, x, noise):
        del x
        return jnp.asarray(noise)

    def teacher_grid(self, teacher):
        return np.append(vp.ddim_timesteps(teacher.steps, self.num_train_timesteps), -1).astype(np.float32)

    def student_grid(self, student):
        return np.asarray(list(student.timesteps) + [self.clean], np.float32)

    def training_levels(self, dmd):
        return np.arange(dmd.timestep_min, dmd.timestep_max + 1, dtype=np.float32)

    def problems(self, c):
        p = []
        t, n = list(c.student.timesteps), self.num_train_timesteps
        in_range = all(isinstance(x, int) and 0 <= x < n for x in t)
        if len(t) < 2 or not in_range or any(a <= b for a, b in zip(t, t[1:])):
            p.append(f"student.timesteps={t} must hold >= 2 strictly decreasing integers in 0..{n - 1} "
                     "(DMD2's 4-step SDXL student: (999, 749, 499, 249)).")
        if not 0 <= c.dmd.timestep_min < c.dmd.timestep_max < n:
            p.append(f"dmd.timestep_min={c.dmd.timestep_min}, dmd.timestep_max={c.dmd.timestep_max} must satisfy "
                     f"0 <= timestep_min < timestep_max < {n} (DMD2: 20, 980).")
        return p


SCHEDULES = {"flow": RectifiedFlow, "vp": VPEpsilon}
