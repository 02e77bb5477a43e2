"""The DP-DMD train step as pure functions of plain pytrees (docs/DESIGN.md, "The method").

One *round* = `fake_updates_per_student` (M) critic updates, then one generator update, as the
public code's two-time-scale schedule. Everything here is jit-able with explicit shardings:
models enter as (static graphdef, param pytrees); `nnx.merge` happens inside. Only the
`Backbone` and `Schedule` interfaces are called, so the step is the same for every model family.

Generator update, from initial noise eps (the student's first level):
  1. teacher anchor: K guided ODE steps of the T-step teacher grid -> z_tk at level t_k (no grad);
  2. student step 1: prediction p_first at eps; loss_div against the target:
     "line" (flow): the velocity (eps - z_tk) / (1 - t_k) of the straight line through eps and z_tk;
     "denoise" (flow and VP): the teacher's x0 at z_tk, against the student's first-step x0;
  3. z_1 is detached: DMD gradients never reach the first step;
  4. steps 2..N ("rollout": with gradient through all of them; "backward": one random step with
     gradient, its input produced without) -> x; DMD loss at a random training level.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dpdmd_jax.core import Adapted, Backbone, Cond, Frozen, Params, RoundBatch, TrainState
from dpdmd_jax.diffusion import sampler
from dpdmd_jax.distill import losses
from dpdmd_jax.models import lora

# optax.apply_if_finite gives up and applies a non-finite update after this many in a row; the
# trainer stops much earlier (config.max_nonfinite), so in practice it never gives up.
_NEVER = 2**30


def make_optimizer(o: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW after global-norm clipping (public code: lr 1e-5, wd 0, clip 1.0; no warm-up); an
    update whose gradient is not finite is skipped (parameters and moments kept)."""
    return optax.apply_if_finite(
        optax.chain(
            optax.clip_by_global_norm(o.grad_clip),
            optax.adamw(o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
        ),
        max_consecutive_errors=_NEVER,
    )


def _take(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _batch(cond: Cond) -> int:
    return jax.tree.leaves(cond)[0].shape[0]


class Distiller:
    """Holds the static parts (graphdef, grids, optimizers) and exposes pure step functions."""

    def __init__(self, config: ml_collections.ConfigDict, backbone: Backbone, graphdef: nnx.GraphDef,
                 anchor_k: int | None = None, adapters: dict[str, tuple[nnx.GraphDef, Params] | None] | None = None):
        self.c = config
        self.backbone = backbone
        self.schedule = backbone.schedule
        self.graphdef = graphdef
        # LoRA: role -> (graphdef, abstract adapters) (`distill.adapters.adapted`); absent / None = the
        # role trains the whole network.
        self.adapters = {role: a for role, a in (adapters or {}).items() if a is not None}
        self.latent_shape = tuple(backbone.latent_shape())  # (H, W, C)
        self.teacher_grid = self.schedule.teacher_grid(config.teacher)
        # K: the config's, or for distill.anchor_k="auto" the one the run chose before building this
        # (`distill.anchor.resolve_k`); None leaves it open (the teacher pass that chooses it, readers).
        auto = config.distill.anchor_k == "auto"
        self.anchor_k = anchor_k if anchor_k is not None or auto else int(config.distill.anchor_k)
        self.student_grid = self.schedule.student_grid(config.student)
        self.dmd_levels = self.schedule.training_levels(config.dmd)
        if self.dmd_levels.size == 0:
            raise ValueError(f"no training level in the dmd range of {dict(config.dmd)}")
        self.tx_student = make_optimizer(config.optim.student)
        self.tx_fake = make_optimizer(config.optim.fake)

    # ------------------------------------------------------------------ model calls

    def weights(self, role: str, trainable: Params, frozen: Frozen) -> Params | Adapted:
        """What `predict` takes for `role` ("student", "fake") given its trained parameters: those
        parameters, or with LoRA the shared frozen base plus them (its adapters)."""
        if role not in self.adapters:
            return trainable
        return Adapted(self.adapters[role][0], jax.lax.stop_gradient(frozen.teacher), trainable)

    def predict(self, params: Params | Adapted, buffers: Params, z: jax.Array, level, cond: Cond) -> jax.Array:
        """The backbone's prediction (v or eps) at `level` (scalar or [B]) of a network's parameters
        (teacher, full student / fake) or of a base with adapters (`weights`)."""
        # copy=True: fresh Variables at this trace level. `params` may be leaves of a State unflattened at
        # an outer level (jit, grad), and the scanned / rematerialised model's nnx.scan / nnx.remat refuse
        # Variables of another trace level (the shipped configs' scan_layers=True and remat_policy).
        if isinstance(params, Adapted):
            model = nnx.merge(params.graphdef, params.adapters, params.base, buffers, copy=True)
        else:
            model = nnx.merge(self.graphdef, params, buffers, copy=True)
        level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (z.shape[0],))
        return self.backbone.apply(model, z, level, cond)

    def _predictor(self, params: Params, buffers: Params) -> sampler.Predict:
        return lambda z, level, cond: self.predict(params, buffers, z, level, cond)

    def guided_prediction(self, params, buffers, z, level, cond: Cond, uncond: Cond, scale: float) -> jax.Array:
        return sampler.guided_prediction(self._predictor(params, buffers), z, level, cond, uncond, scale)

    # ------------------------------------------------------------------ pieces

    def teacher_anchor(self, frozen: Frozen, eps: jax.Array, cond: Cond, uncond: Cond) -> tuple[jax.Array, jax.Array]:
        """z_tk after K guided ODE steps of the teacher grid from eps, and its level t_k."""
        k = self.anchor_k
        if k is None:
            raise ValueError("distill.anchor_k='auto' has not been resolved: build the Distiller with the K "
                             "`distill.anchor.resolve_k` chose (dpdmd_jax.distill.anchor)")
        teacher = self._predictor(jax.lax.stop_gradient(frozen.teacher), frozen.buffers)
        z_tk = sampler.sample(teacher, self.schedule, eps, self.teacher_grid[: k + 1], cond, uncond,
                              self.c.teacher.cfg_scale)
        return jax.lax.stop_gradient(z_tk), jnp.asarray(self.teacher_grid[k])

    def diversity_target(self, frozen: Frozen, eps, cond: Cond, uncond: Cond) -> jax.Array:
        """The first step's target: a velocity ("line") or the teacher's x0 at z_tk ("denoise")."""
        z_tk, t_k = self.teacher_anchor(frozen, eps, cond, uncond)
        if self.c.distill.target == "line":
            return losses.line_velocity_target(eps, z_tk, t_k)
        # One more teacher evaluation at the anchor: x_target = to_x0(z_tk, p_teacher, t_k)
        # (VP: (z_tk - sqrt(1 - abar_tk) eps_tea) / sqrt(abar_tk)).
        p = self.guided_prediction(frozen.teacher, frozen.buffers, z_tk, t_k, cond, uncond, self.c.teacher.cfg_scale)
        return jax.lax.stop_gradient(self.schedule.to_x0(z_tk, p, t_k))

    @property
    def detach_first_step(self) -> bool:
        """DP-DMD detaches z_1; plain DMD (lambda_div = 0) trains every step (override for ablations)."""
        flag = self.c.distill.get("stop_grad_first_step", None)
        return self.c.distill.lambda_div > 0 if flag is None else bool(flag)

    def first_step(self, params, buffers, eps, cond: Cond, key) -> tuple[jax.Array, jax.Array]:
        """(p_first, z_1); z_1 is detached for DP-DMD so DMD gradients never reach the first step."""
        s = self.student_grid
        p_first = self.predict(params, buffers, eps, s[0], cond)
        z1 = self.schedule.student_step(eps, p_first, s[0], s[1], jax.random.fold_in(key, 0))
        return p_first, jax.lax.stop_gradient(z1) if self.detach_first_step else z1

    def remaining_steps(self, params, buffers, eps, z1, cond: Cond, key) -> jax.Array:
        """The sample x the DMD loss acts on: student steps 2..N from z_1 ("rollout", gradient through
        all of them), or DMD2-style "backward": one random step j with gradient, its input made
        without (j in 2..N when the first step is detached, else 1..N starting from eps).

        Stochastic (VP) steps draw their noise from `key` folded with the step index, so step i
        re-noises identically in every code path."""
        s = self.student_grid
        n = len(s) - 1
        if self.c.dmd.simulation == "rollout":
            return self._rollout(params, buffers, z1, cond, s[1:], key, first_index=1)
        start, z_start = (1, z1) if self.detach_first_step else (0, eps)
        j = jax.random.randint(key, (), start, n)
        frozen_params = jax.lax.stop_gradient(params)
        grid = jnp.asarray(s)

        def body(i, z):
            p = self.predict(frozen_params, buffers, z, grid[i], cond)
            return self.schedule.student_step(z, p, grid[i], grid[i + 1], jax.random.fold_in(key, i))

        z_j = jax.lax.stop_gradient(jax.lax.fori_loop(start, j, body, z_start))
        return self.schedule.to_x0(z_j, self.predict(params, buffers, z_j, grid[j], cond), grid[j])

    def teacher_sample(self, params, buffers, eps, cond: Cond, uncond: Cond, observe=None):
        """The teacher's T-step guided ODE sample on its grid (what the anchor runs K steps of);
        with `observe`, also its per-step observations (`sampler.sample`)."""
        return sampler.sample(self._predictor(jax.lax.stop_gradient(params), buffers), self.schedule, eps,
                              self.teacher_grid, cond, uncond, self.c.teacher.cfg_scale, observe=observe)

    def sample(self, params, buffers, eps, cond: Cond, key) -> jax.Array:
        """The student's N-step sample (no gradient)."""
        return self._rollout(jax.lax.stop_gradient(params), buffers, eps, cond, self.student_grid, key)

    def _rollout(self, params, buffers, z, cond: Cond, grid, key, first_index: int = 0) -> jax.Array:
        """Student steps along `grid` (step i of the full grid folds i into `key`)."""
        return sampler.sample(self._predictor(params, buffers), self.schedule, z, grid, cond, student=True,
                              key=key, first_index=first_index)

    def dmd_level(self, key, batch: int) -> jax.Array:
        """One noise level per sample, uniform over the (restricted) training levels."""
        return jnp.asarray(self.dmd_levels)[jax.random.randint(key, (batch,), 0, self.dmd_levels.size)]

    def dmd_direction(self, fake, frozen: Frozen, x, cond: Cond, uncond: Cond, key) -> tuple[jax.Array, jax.Array]:
        """The normalised DMD gradient g at a noised copy of x (no gradient), and its level."""
        k_level, k_noise = jax.random.split(key)
        x = jax.lax.stop_gradient(x)
        level = self.dmd_level(k_level, x.shape[0])
        x_s = self.schedule.add_noise(x, jax.random.normal(k_noise, x.shape, x.dtype), level)
        p_real = self.guided_prediction(frozen.teacher, frozen.buffers, x_s, level, cond, uncond,
                                        self.c.dmd.real_cfg_scale)
        p_fake = self.predict(jax.lax.stop_gradient(fake), frozen.buffers, x_s, level, cond)
        to_x0 = self.schedule.to_x0
        return losses.dmd_gradient(x_s, to_x0(x_s, p_real, level), to_x0(x_s, p_fake, level)), level

    # ------------------------------------------------------------------ losses

    def generator_loss(self, params, fake, frozen: Frozen, eps, cond: Cond, uncond: Cond, key):
        params, fake = self.weights("student", params, frozen), self.weights("fake", fake, frozen)
        k_sim, k_dmd = jax.random.split(key)
        p_first, z1 = self.first_step(params, frozen.buffers, eps, cond, k_sim)
        if self.c.distill.lambda_div == 0:  # plain DMD: no teacher anchor to pay for
            loss_div = jnp.zeros((), jnp.float32)
        elif self.c.distill.target == "line":
            loss_div = losses.diversity_loss(p_first, self.diversity_target(frozen, eps, cond, uncond))
        else:
            x0_first = self.schedule.to_x0(eps, p_first, self.student_grid[0])
            loss_div = losses.diversity_loss(x0_first, self.diversity_target(frozen, eps, cond, uncond))
        x = self.remaining_steps(params, frozen.buffers, eps, z1, cond, k_sim)
        g, level = self.dmd_direction(fake, frozen, x, cond, uncond, k_dmd)
        loss_dmd = losses.dmd_loss(x, g)
        loss = loss_dmd + self.c.distill.lambda_div * loss_div
        return loss, {"loss_dmd": loss_dmd, "loss_div": loss_div, "dmd_level": jnp.mean(level)}

    def critic_loss(self, fake, student, frozen: Frozen, eps, cond: Cond, key):
        """Denoising score matching of the fake score on fresh student samples (flow: flow matching,
        VP: the epsilon loss)."""
        fake, student = self.weights("fake", fake, frozen), self.weights("student", student, frozen)
        k_level, k_noise = jax.random.split(key)
        x = self.sample(student, frozen.buffers, eps, cond, key)
        level = self.dmd_level(k_level, x.shape[0])
        noise = jax.random.normal(k_noise, x.shape, x.dtype)
        p = self.predict(fake, frozen.buffers, self.schedule.add_noise(x, noise, level), level, cond)
        return losses.regression_loss(p, self.schedule.critic_target(x, noise))

    # ------------------------------------------------------------------ updates

    def _noise(self, key, batch: int) -> jax.Array:
        return jax.random.normal(key, (batch, *self.latent_shape), jnp.float32)

    @staticmethod
    def _update(tx, grads, params, opt_state):
        """One optimizer update (skipped by apply_if_finite if the gradient is not finite)."""
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt, optax.tree.norm(grads)

    def critic_update(self, state: TrainState, frozen: Frozen, cond: Cond, key) -> tuple[TrainState, dict]:
        k_eps, k_loss = jax.random.split(key)
        eps = self._noise(k_eps, _batch(cond))
        loss, grads = jax.value_and_grad(self.critic_loss)(state.fake, state.student, frozen, eps, cond, k_loss)
        fake, opt, gnorm = self._update(self.tx_fake, grads, state.fake, state.opt_fake)
        return state.replace(fake=fake, opt_fake=opt), {"loss_fake": loss, "grad_norm_fake": gnorm}

    def generator_update(self, state: TrainState, frozen: Frozen, cond: Cond, uncond: Cond, key):
        k_eps, k_loss = jax.random.split(key)
        eps = self._noise(k_eps, _batch(cond))
        (loss, aux), grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
            state.student, state.fake, frozen, eps, cond, uncond, k_loss
        )
        student, opt, gnorm = self._update(self.tx_student, grads, state.student, state.opt_student)
        state = state.replace(student=student, opt_student=opt)
        return state, {"loss": loss, "grad_norm_student": gnorm, "finite": opt.last_finite, **aux}

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


# Folded into the seed's key for the adapters' initial A (rounds fold in their index, far below this).
_ADAPTER_SEED = 0x4C6F5241


def init_state(distiller: Distiller, teacher_params: Params, seed: int) -> TrainState:
    """Student and fake score both start as the teacher: copies of it in `model.param_dtype` (fresh
    buffers: state is donated), or with LoRA fresh adapters (B = 0) over it."""
    dtype = jnp.dtype(distiller.c.model.param_dtype)
    key = jax.random.fold_in(jax.random.key(seed), _ADAPTER_SEED)

    def start(role: str, index: int) -> Params:
        if role in distiller.adapters:
            return lora.init_adapters(distiller.adapters[role][1], jax.random.fold_in(key, index))
        return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), teacher_params)

    student, fake = start("student", 0), start("fake", 1)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        student=student,
        fake=fake,
        opt_student=distiller.tx_student.init(student),
        opt_fake=distiller.tx_fake.init(fake),
    )


StepFn = Callable[[TrainState, Frozen, RoundBatch], tuple[TrainState, dict]]
