"""The DP-DMD train step as pure functions of plain pytrees (DESIGN.md section 2).

One *round* = `fake_updates_per_student` (M) critic updates, then one generator update, as the
public code's two-time-scale schedule. Everything here is jit-able with explicit shardings:
models enter as (static graphdef, param pytrees); `nnx.merge` happens inside.

Generator update, from initial noise eps (sigma = 1):
  1. teacher anchor: K guided Euler steps of the T-step teacher grid -> z_tk at t_k (no grad);
  2. student step 1: v_first = v_theta(eps, sigma_0); loss_div against the line target
     (eps - z_tk) / (1 - t_k) (or, target="denoise", the teacher's x0 at z_tk in x0 space);
  3. z_1 is detached: DMD gradients never reach the first step;
  4. steps 2..N ("rollout": with gradient through all of them; "backward": one random step with
     gradient, its input produced without) -> x; DMD loss at a random sigma of the training grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dpdmd_jax.diffusion import flow
from dpdmd_jax.distill import losses

Params = Any


@flax.struct.dataclass
class Cond:
    """Backbone conditioning (SD3: context [B, L, 4096], pooled [B, 2048])."""

    context: jax.Array
    pooled: jax.Array


@flax.struct.dataclass
class Frozen:
    """What no update touches: teacher parameters and the non-trainable buffers all models share."""

    teacher: Params
    buffers: Params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # completed rounds (generator updates)
    rng: jax.Array
    student: Params
    fake: Params
    opt_student: Any
    opt_fake: Any
    nonfinite: jax.Array  # consecutive rounds whose generator update was skipped (non-finite)
    skipped: jax.Array  # total skipped updates (generator + critic)


@flax.struct.dataclass
class RoundBatch:
    """Inputs of one round: conditionings for the M critic updates and the generator update
    ([M + 1, B, ...], last = generator), and the unconditional embedding ([B, ...])."""

    cond: Cond
    uncond: Cond


def make_optimizer(o: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW after global-norm clipping (public code: lr 1e-5, wd 0, clip 1.0; no warm-up)."""
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    )


def _take(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _select(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class Distiller:
    """Holds the static parts (graphdef, grids, optimizers) and exposes pure step functions."""

    def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, latent_shape: tuple[int, ...]):
        self.c = config
        self.graphdef = graphdef
        self.latent_shape = tuple(latent_shape)  # (H, W, C)
        self.teacher_sigmas = flow.flow_match_sigmas(config.teacher.steps, config.teacher.shift)
        self.student_sigmas = np.asarray(list(config.student.sigmas) + [0.0], np.float32)
        grid = flow.training_sigmas(config.dmd.shift)
        self.dmd_sigmas = grid[(grid >= config.dmd.sigma_min) & (grid <= config.dmd.sigma_max)]
        if self.dmd_sigmas.size == 0:
            raise ValueError(f"no training sigma in [{config.dmd.sigma_min}, {config.dmd.sigma_max}]")
        self.tx_student = make_optimizer(config.optim.student)
        self.tx_fake = make_optimizer(config.optim.fake)

    # ------------------------------------------------------------------ model calls

    def velocity(self, params: Params, buffers: Params, z: jax.Array, sigma, cond: Cond) -> jax.Array:
        model = nnx.merge(self.graphdef, params, buffers)
        t = flow.timestep_from_sigma(jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (z.shape[0],)))
        return model(z, t, cond.context, cond.pooled)

    def guided_velocity(self, params, buffers, z, sigma, cond: Cond, uncond: Cond, scale: float) -> jax.Array:
        """CFG with cond and uncond in one batch of 2B (scale 1: the conditional velocity alone)."""
        if isinstance(scale, (int, float)) and scale == 1.0:
            return self.velocity(params, buffers, z, sigma, cond)
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (z.shape[0],))
        v = self.velocity(params, buffers, jnp.concatenate([z, z]), jnp.concatenate([sigma, sigma]), both)
        v_cond, v_uncond = jnp.split(v, 2)
        return losses.cfg(v_cond, v_uncond, scale).astype(z.dtype)

    # ------------------------------------------------------------------ pieces

    def teacher_anchor(self, frozen: Frozen, eps: jax.Array, cond: Cond, uncond: Cond) -> tuple[jax.Array, jax.Array]:
        """z_tk after K guided Euler steps of the teacher grid from eps, and t_k (0 when K = T)."""
        k = self.c.distill.anchor_k
        sig = jnp.asarray(self.teacher_sigmas)
        teacher = jax.lax.stop_gradient(frozen.teacher)

        def body(i, z):
            v = self.guided_velocity(teacher, frozen.buffers, z, sig[i], cond, uncond, self.c.teacher.cfg_scale)
            return flow.euler_step(z, v, sig[i], sig[i + 1])

        z_tk = jax.lax.fori_loop(0, k, body, eps)
        return jax.lax.stop_gradient(z_tk), sig[k]

    def diversity_target(self, frozen: Frozen, eps, cond: Cond, uncond: Cond) -> jax.Array:
        """The first step's target: a velocity ("line") or an x0 ("denoise")."""
        z_tk, t_k = self.teacher_anchor(frozen, eps, cond, uncond)
        if self.c.distill.target == "line":
            return losses.line_velocity_target(eps, z_tk, t_k)
        v = self.guided_velocity(frozen.teacher, frozen.buffers, z_tk, t_k, cond, uncond, self.c.teacher.cfg_scale)
        return jax.lax.stop_gradient(flow.x0_from_v(z_tk, v, t_k))

    @property
    def detach_first_step(self) -> bool:
        """DP-DMD detaches z_1; plain DMD (lambda_div = 0) trains every step (override for ablations)."""
        flag = self.c.distill.get("stop_grad_first_step", None)
        return self.c.distill.lambda_div > 0 if flag is None else bool(flag)

    def first_step(self, params, buffers, eps, cond: Cond) -> tuple[jax.Array, jax.Array]:
        """(v_first, z_1); z_1 is detached for DP-DMD so DMD gradients never reach the first step."""
        s = self.student_sigmas
        v_first = self.velocity(params, buffers, eps, s[0], cond)
        z1 = flow.euler_step(eps, v_first, s[0], s[1])
        return v_first, jax.lax.stop_gradient(z1) if self.detach_first_step else z1

    def remaining_steps(self, params, buffers, eps, z1, cond: Cond, key) -> jax.Array:
        """The sample x the DMD loss acts on: student steps 2..N from z_1 ("rollout", gradient through
        all of them), or DMD2-style "backward": one random step j with gradient, its input made
        without (j in 2..N when the first step is detached, else 1..N starting from eps)."""
        s = self.student_sigmas
        n = len(s) - 1
        if self.c.dmd.simulation == "rollout":
            return self._euler(params, buffers, z1, cond, s[1:])
        start, z_start = (1, z1) if self.detach_first_step else (0, eps)
        j = jax.random.randint(key, (), start, n)
        frozen_params = jax.lax.stop_gradient(params)
        sig = jnp.asarray(s)

        def body(i, z):
            v = self.velocity(frozen_params, buffers, z, sig[i], cond)
            return flow.euler_step(z, v, sig[i], sig[i + 1])

        z_j = jax.lax.stop_gradient(jax.lax.fori_loop(start, j, body, z_start))
        return flow.x0_from_v(z_j, self.velocity(params, buffers, z_j, sig[j], cond), sig[j])

    def sample(self, params, buffers, eps, cond: Cond) -> jax.Array:
        """The student's N-step sample (no gradient)."""
        return self._euler(jax.lax.stop_gradient(params), buffers, eps, cond, self.student_sigmas)

    def _euler(self, params, buffers, z, cond: Cond, sigmas: np.ndarray) -> jax.Array:
        """Euler steps along `sigmas`, as a scan (one traced model call, differentiable)."""

        def body(z, pair):
            sigma, sigma_next = pair
            return flow.euler_step(z, self.velocity(params, buffers, z, sigma, cond), sigma, sigma_next), None

        pairs = (jnp.asarray(sigmas[:-1]), jnp.asarray(sigmas[1:]))
        return jax.lax.scan(body, z, pairs)[0]

    def dmd_sigma(self, key, batch: int) -> jax.Array:
        """One noise level per sample, uniform over the (restricted) shifted training grid."""
        return jnp.asarray(self.dmd_sigmas)[jax.random.randint(key, (batch,), 0, self.dmd_sigmas.size)]

    def dmd_direction(self, fake, frozen: Frozen, x, cond: Cond, uncond: Cond, key) -> tuple[jax.Array, jax.Array]:
        """The normalised DMD gradient g at a noised copy of x (no gradient), and its sigma."""
        k_sigma, k_noise = jax.random.split(key)
        x = jax.lax.stop_gradient(x)
        sigma = self.dmd_sigma(k_sigma, x.shape[0])
        x_s = flow.add_noise(x, jax.random.normal(k_noise, x.shape, x.dtype), sigma)
        scale = self.c.dmd.real_cfg_scale
        v_real = self.guided_velocity(frozen.teacher, frozen.buffers, x_s, sigma, cond, uncond, scale)
        v_fake = self.velocity(jax.lax.stop_gradient(fake), frozen.buffers, x_s, sigma, cond)
        g = losses.dmd_gradient(x_s, flow.x0_from_v(x_s, v_real, sigma), flow.x0_from_v(x_s, v_fake, sigma))
        return g, sigma

    # ------------------------------------------------------------------ losses

    def generator_loss(self, params, fake, frozen: Frozen, eps, cond: Cond, uncond: Cond, key):
        k_sim, k_dmd = jax.random.split(key)
        v_first, z1 = self.first_step(params, frozen.buffers, eps, cond)
        if self.c.distill.lambda_div == 0:  # plain DMD: no teacher anchor to pay for
            loss_div = jnp.zeros((), jnp.float32)
        elif self.c.distill.target == "line":
            loss_div = losses.diversity_loss(v_first, self.diversity_target(frozen, eps, cond, uncond))
        else:
            x0_first = flow.x0_from_v(eps, v_first, self.student_sigmas[0])
            loss_div = losses.diversity_loss(x0_first, self.diversity_target(frozen, eps, cond, uncond))
        x = self.remaining_steps(params, frozen.buffers, eps, z1, cond, k_sim)
        g, sigma = self.dmd_direction(fake, frozen, x, cond, uncond, k_dmd)
        loss_dmd = losses.dmd_loss(x, g)
        loss = loss_dmd + self.c.distill.lambda_div * loss_div
        return loss, {"loss_dmd": loss_dmd, "loss_div": loss_div, "dmd_sigma": jnp.mean(sigma)}

    def critic_loss(self, fake, student, frozen: Frozen, eps, cond: Cond, key):
        """Flow matching of the fake score on fresh student samples."""
        k_sigma, k_noise = jax.random.split(key)
        x = self.sample(student, frozen.buffers, eps, cond)
        sigma = self.dmd_sigma(k_sigma, x.shape[0])
        noise = jax.random.normal(k_noise, x.shape, x.dtype)
        v = self.velocity(fake, frozen.buffers, flow.add_noise(x, noise, sigma), sigma, cond)
        return losses.flow_matching_loss(v, noise, x)

    # ------------------------------------------------------------------ updates

    def _noise(self, key, batch: int) -> jax.Array:
        return jax.random.normal(key, (batch, *self.latent_shape), jnp.float32)

    @staticmethod
    def _apply_if_finite(tx, loss, grads, params, opt_state):
        """One optimizer update, skipped (params and moments kept) if the loss or gradient is not
        finite. Returns (params, opt_state, ok, grad_norm)."""
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return _select(ok, new_params, params), _select(ok, new_opt, opt_state), ok, gnorm

    def critic_update(self, state: TrainState, frozen: Frozen, cond: Cond, key) -> tuple[TrainState, dict]:
        k_eps, k_loss = jax.random.split(key)
        eps = self._noise(k_eps, cond.context.shape[0])
        loss, grads = jax.value_and_grad(self.critic_loss)(state.fake, state.student, frozen, eps, cond, k_loss)
        fake, opt, ok, gnorm = self._apply_if_finite(self.tx_fake, loss, grads, state.fake, state.opt_fake)
        state = state.replace(fake=fake, opt_fake=opt, skipped=state.skipped + (~ok).astype(jnp.int32))
        return state, {"loss_fake": loss, "grad_norm_fake": gnorm}

    def generator_update(self, state: TrainState, frozen: Frozen, cond: Cond, uncond: Cond, key):
        k_eps, k_loss = jax.random.split(key)
        eps = self._noise(k_eps, cond.context.shape[0])
        (loss, aux), grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
            state.student, state.fake, frozen, eps, cond, uncond, k_loss
        )
        student, opt, ok, gnorm = self._apply_if_finite(
            self.tx_student, loss, grads, state.student, state.opt_student
        )
        state = state.replace(
            student=student, opt_student=opt,
            nonfinite=jnp.where(ok, 0, state.nonfinite + 1), skipped=state.skipped + (~ok).astype(jnp.int32),
        )
        return state, {"loss": loss, "grad_norm_student": gnorm, "finite": ok, **aux}

    def train_round(self, state: TrainState, frozen: Frozen, batch: RoundBatch) -> tuple[TrainState, dict]:
        """M critic updates (scanned), then one generator update. Keys derive from (rng, step), so a
        resumed run draws exactly the noise an uninterrupted run would."""
        m = self.c.distill.fake_updates_per_student
        key = jax.random.fold_in(state.rng, state.step)
        k_critic, k_gen = jax.random.split(key)
        metrics = {}
        if m > 0:
            critic_conds = jax.tree.map(lambda x: x[:m], batch.cond)
            keys = jax.random.split(k_critic, m)

            def body(st, inp):
                cond, k = inp
                return self.critic_update(st, frozen, cond, k)

            state, critic_metrics = jax.lax.scan(body, state, (critic_conds, keys))
            metrics.update({k: jnp.mean(v) for k, v in critic_metrics.items()})
        state, gen_metrics = self.generator_update(state, frozen, _take(batch.cond, m), batch.uncond, k_gen)
        metrics.update(gen_metrics)
        return state.replace(step=state.step + 1), metrics


def init_state(distiller: Distiller, teacher_params: Params, seed: int) -> TrainState:
    """Student and fake score both start as copies of the teacher (fresh buffers: state is donated)."""
    copy = lambda p: jax.tree.map(jnp.copy, p)
    student, fake = copy(teacher_params), copy(teacher_params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        student=student,
        fake=fake,
        opt_student=distiller.tx_student.init(student),
        opt_fake=distiller.tx_fake.init(fake),
        nonfinite=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


StepFn = Callable[[TrainState, Frozen, RoundBatch], tuple[TrainState, dict]]
