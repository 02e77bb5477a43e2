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

The paper's baselines, each independent of lambda_div and skipped entirely at weight 0:
  regression (DMD v1): + regression.weight * d(x, sg(teacher's T-step guided sample from eps)), d the
     mean squared error on latents ("l2") or LPIPS between their VAE-decoded images ("lpips"); with a
     pair cache (regression.pairs), d(student's sample from each cached pair's noise, its cached
     teacher sample) instead, as DMD v1 precomputes its pairs (no teacher sampling in the round);
  GAN (DMD2): a classifier head on the fake score's features (`Backbone.features`) trains with the
     fake score in each critic update (+ gan.cls_weight * the classifier loss on real samples and
     the critic's student sample, both noised at a training level); the generator adds
     gan.weight * the non-saturating loss on x noised at a training level, fake and head frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dpdmd_jax.core import Adapted, Backbone, Cond, Frozen, Pairs, Params, RoundBatch, TrainState
from dpdmd_jax.diffusion import sampler
from dpdmd_jax.distill import losses
from dpdmd_jax.models import lora
from dpdmd_jax.models.gan_head import GanHead

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
        # The baselines' weights (0 = the term is not computed at all: the round is plain (DP-)DMD).
        self.regression_weight = float(config.regression.weight)
        self.gan_weight = float(config.gan.weight)
        # The GAN's classifier head trains with the fake score's optimizer settings, in a state of its own.
        self.tx_disc = make_optimizer(config.optim.fake) if self.gan else None
        self._head_graphdefs: dict[tuple[int, int, int], nnx.GraphDef] = {}  # features (h, w, D) -> head structure

    @property
    def gan(self) -> bool:
        """Whether the round trains DMD2's GAN (a classifier head in the state, its losses in both updates)."""
        return self.gan_weight > 0

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
        level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (z.shape[0],))
        return self.backbone.apply(self._model(params, buffers), z, level, cond)

    def features(self, params: Params | Adapted, buffers: Params, z: jax.Array, level, cond: Cond) -> jax.Array:
        """The network's features the GAN's head reads (`Backbone.features`), [B, h, w, D]."""
        level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (z.shape[0],))
        return self.backbone.features(self._model(params, buffers), z, level, cond)

    def _model(self, params: Params | Adapted, buffers: Params) -> nnx.Module:
        if isinstance(params, Adapted):
            return nnx.merge(params.graphdef, params.adapters, params.base, buffers, copy=True)
        return nnx.merge(self.graphdef, params, buffers, copy=True)

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

    def generator_loss(self, params, fake, frozen: Frozen, eps, cond: Cond, uncond: Cond, key, disc: Params = None,
                       pairs: Pairs | None = None):
        """The student's loss and its parts; `disc` is the GAN's head (gan.weight > 0 only), `pairs` the
        regression's cached pairs (regression.pairs only)."""
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
        aux = {"loss_dmd": loss_dmd, "loss_div": loss_div, "dmd_level": jnp.mean(level)}
        if self.regression_weight > 0:  # DMD v1: towards the teacher's sample from the same noise
            if pairs is None:  # online: the teacher samples from the student's own noise, this round
                x_reg, target = x, self.teacher_sample(frozen.teacher, frozen.buffers, eps, cond, uncond)
            else:  # DMD v1's precomputed pairs: the student's sample from each pair's noise, its own step
                x_reg, target = self.student_output(params, frozen.buffers, pairs.noise, pairs.cond,
                                                    jax.random.fold_in(k_sim, _PAIRS_KEY)), pairs.target
            aux["loss_reg"] = self.regression_distance(frozen, x_reg, target)
            loss = loss + self.regression_weight * aux["loss_reg"]
        if self.gan:  # DMD2: the classifier should call x real; fake score and head do not move
            logits = self.realism_logits(jax.lax.stop_gradient(fake), jax.lax.stop_gradient(disc), frozen.buffers, x,
                                         cond, jax.random.fold_in(key, _GAN_KEY))
            aux["loss_gan_gen"] = losses.gan_generator_loss(logits)
            loss = loss + self.gan_weight * aux["loss_gan_gen"]
        return loss, aux

    def student_output(self, params, buffers: Params, eps, cond: Cond, key) -> jax.Array:
        """The student's sample from `eps` with the generator's gradient path (`first_step`, then
        `remaining_steps` of dmd.simulation): what the DMD loss acts on, for other noises."""
        _, z1 = self.first_step(params, buffers, eps, cond, key)
        return self.remaining_steps(params, buffers, eps, z1, cond, key)

    def regression_distance(self, frozen: Frozen, x: jax.Array, target: jax.Array) -> jax.Array:
        """DMD v1's distance of the student's sample x to the teacher's (detached), averaged over the
        batch: "l2", the mean squared error on latents; "lpips", LPIPS between the two decoded by the
        VAE and resized (bilinear, no antialiasing, as the consistency-model and DMD codes feed it) to
        regression.image_size^2. The teacher's side is decoded without gradient: only x's decode is
        differentiated."""
        if self.c.regression.distance == "l2":
            return losses.regression_loss(x, target)
        p = frozen.perceptual
        if p is None:
            raise ValueError("regression.distance='lpips' needs the VAE and LPIPS in Frozen.perceptual "
                             "(run.setup.build loads them)")
        vae = nnx.merge(p.vae_graphdef, p.vae, copy=True)
        lpips = nnx.merge(p.lpips_graphdef, p.lpips, copy=True)
        ours = self._for_lpips(self.backbone.decode(vae, x))
        theirs = jax.lax.stop_gradient(self._for_lpips(self.backbone.decode(vae, jax.lax.stop_gradient(target))))
        return jnp.mean(lpips(ours, theirs).astype(jnp.float32))

    def _for_lpips(self, images: jax.Array) -> jax.Array:
        size = int(self.c.regression.image_size)
        if size:
            images = jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "bilinear",
                                      antialias=False)
        return images

    def critic_loss(self, fake, student, frozen: Frozen, eps, cond: Cond, key):
        """Denoising score matching of the fake score on fresh student samples (flow: flow matching,
        VP: the epsilon loss)."""
        return self._score_matching(self.weights("fake", fake, frozen), self.weights("student", student, frozen),
                                    frozen, eps, cond, key)[0]

    def _score_matching(self, fake, student, frozen: Frozen, eps, cond: Cond, key) -> tuple[jax.Array, jax.Array]:
        """(the fake score's loss, the student sample it was computed on); `fake` and `student` as `weights` gives."""
        k_level, k_noise = jax.random.split(key)
        x = self.sample(student, frozen.buffers, eps, cond, key)
        level = self.dmd_level(k_level, x.shape[0])
        noise = jax.random.normal(k_noise, x.shape, x.dtype)
        p = self.predict(fake, frozen.buffers, self.schedule.add_noise(x, noise, level), level, cond)
        return losses.regression_loss(p, self.schedule.critic_target(x, noise)), x

    # ------------------------------------------------------------------ the GAN (DMD2)

    def head_graphdef(self, features: tuple[int, int, int]) -> nnx.GraphDef:
        """The classifier head's structure for features of shape (h, w, D) (no parameters)."""
        features = tuple(int(n) for n in features)
        if features not in self._head_graphdefs:
            self._head_graphdefs[features] = nnx.split(nnx.eval_shape(lambda: self._head(features, nnx.Rngs(0))))[0]
        return self._head_graphdefs[features]

    def _head(self, features: tuple[int, int, int], rngs: nnx.Rngs) -> GanHead:
        m, (h, w, d) = self.c.model, features
        return GanHead((h, w), d, self.c.gan.head_width or d, rngs=rngs, dtype=jnp.dtype(m.dtype),
                       param_dtype=jnp.dtype(m.param_dtype))

    def feature_shape(self, teacher_params: Params, buffers: Params) -> tuple[int, int, int]:
        """(h, w, D) of the backbone's features (traced on one sample's shapes: nothing is computed)."""
        z = jax.ShapeDtypeStruct((1, *self.latent_shape), jnp.float32)
        shapes = jax.eval_shape(lambda p, b, z, cond: self.features(p, b, z, self.dmd_levels[0], cond),
                                teacher_params, buffers, z, self.backbone.cond_spec(1))
        return tuple(int(n) for n in shapes.shape[1:])

    def init_head(self, teacher_params: Params, buffers: Params, key: jax.Array) -> Params:
        """Fresh parameters of the classifier head, for the features of the teacher's architecture."""
        return nnx.split(self._head(self.feature_shape(teacher_params, buffers), nnx.Rngs(params=key)))[1]

    def realism_logits(self, fake, disc: Params, buffers: Params, x: jax.Array, cond: Cond, key) -> jax.Array:
        """The head's logits [B] ("real" when positive) on the fake score's features of x noised at a
        DMD training level (DMD2's classifier acts on noisy samples)."""
        k_level, k_noise = jax.random.split(key)
        level = self.dmd_level(k_level, x.shape[0])
        x_s = self.schedule.add_noise(x, jax.random.normal(k_noise, x.shape, x.dtype), level)
        h = self.features(fake, buffers, x_s, level, cond)
        return nnx.merge(self.head_graphdef(h.shape[1:]), disc, copy=True)(h)

    def critic_gan_loss(self, trainable: tuple[Params, Params], student, frozen: Frozen, eps, cond: Cond,
                        uncond: Cond, real: jax.Array | None, key) -> tuple[jax.Array, dict]:
        """The fake score's loss plus gan.cls_weight x the classifier loss, as a function of (fake, head):
        real samples (gan.real="data": `real`, the batch's; "teacher": the teacher's T-step samples
        from fresh noise, the data-free variant) against the student sample the score matching drew,
        both detached."""
        fake, disc = trainable
        fake = self.weights("fake", fake, frozen)
        loss_fake, x_fake = self._score_matching(fake, self.weights("student", student, frozen), frozen, eps, cond, key)
        k_gan = jax.random.fold_in(key, _GAN_KEY)
        if self.c.gan.real == "teacher":
            k_real, k_gan = jax.random.split(k_gan)
            real = self.teacher_sample(frozen.teacher, frozen.buffers, self._noise(k_real, _batch(cond)), cond, uncond)
        elif real is None:
            raise ValueError("gan.real='data' but the round's batch holds no real latents (RoundBatch.real): the "
                             "data source cannot give them; use gan.real='teacher'")
        k_r, k_f = jax.random.split(k_gan)
        logits_real = self.realism_logits(fake, disc, frozen.buffers, jax.lax.stop_gradient(real), cond, k_r)
        logits_fake = self.realism_logits(fake, disc, frozen.buffers, jax.lax.stop_gradient(x_fake), cond, k_f)
        loss_cls = losses.gan_classifier_loss(logits_real, logits_fake)
        return loss_fake + self.c.gan.cls_weight * loss_cls, {"loss_fake": loss_fake, "loss_gan_cls": loss_cls}

    # ------------------------------------------------------------------ updates

    def _noise(self, key, batch: int) -> jax.Array:
        return jax.random.normal(key, (batch, *self.latent_shape), jnp.float32)

    @staticmethod
    def _update(tx, grads, params, opt_state):
        """One optimizer update (skipped by apply_if_finite if the gradient is not finite)."""
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt, optax.tree.norm(grads)

    def critic_update(self, state: TrainState, frozen: Frozen, cond: Cond, key, uncond: Cond = None,
                      real: jax.Array | None = None) -> tuple[TrainState, dict]:
        """One fake-score update; with the GAN also one of its head (`uncond`: the teacher's guidance
        for gan.real="teacher"; `real`: this update's real latents for gan.real="data")."""
        k_eps, k_loss = jax.random.split(key)
        eps = self._noise(k_eps, _batch(cond))
        if not self.gan:
            loss, grads = jax.value_and_grad(self.critic_loss)(state.fake, state.student, frozen, eps, cond, k_loss)
            fake, opt, gnorm = self._update(self.tx_fake, grads, state.fake, state.opt_fake)
            return state.replace(fake=fake, opt_fake=opt), {"loss_fake": loss, "grad_norm_fake": gnorm}
        (_, aux), (g_fake, g_disc) = jax.value_and_grad(self.critic_gan_loss, has_aux=True)(
            (state.fake, state.disc), state.student, frozen, eps, cond, uncond, real, k_loss)
        fake, opt, gnorm = self._update(self.tx_fake, g_fake, state.fake, state.opt_fake)
        disc, opt_disc, gnorm_disc = self._update(self.tx_disc, g_disc, state.disc, state.opt_disc)
        state = state.replace(fake=fake, opt_fake=opt, disc=disc, opt_disc=opt_disc)
        return state, {**aux, "grad_norm_fake": gnorm, "grad_norm_disc": gnorm_disc}

    def generator_update(self, state: TrainState, frozen: Frozen, cond: Cond, uncond: Cond, key,
                         pairs: Pairs | None = None):
        k_eps, k_loss = jax.random.split(key)
        eps = self._noise(k_eps, _batch(cond))
        (loss, aux), grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
            state.student, state.fake, frozen, eps, cond, uncond, k_loss, state.disc if self.gan else None, pairs
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
            reals = None if batch.real is None or not self.gan else batch.real[:m]  # [M, B, H, W, C]

            def body(st, inp):
                cond, k, real = inp
                return self.critic_update(st, frozen, cond, k, batch.uncond, real)

            state, critic_metrics = jax.lax.scan(body, state, (critic_conds, keys, reals))
            metrics.update({k: jnp.mean(v) for k, v in critic_metrics.items()})
        state, gen_metrics = self.generator_update(state, frozen, _take(batch.cond, m), batch.uncond, k_gen,
                                                   batch.pairs if self.regression_weight > 0 else None)
        metrics.update(gen_metrics)
        return state.replace(step=state.step + 1), metrics


# Folded into the seed's key for the adapters' initial A (rounds fold in their index, far below this).
_ADAPTER_SEED = 0x4C6F5241
# Folded into the seed's key for the GAN head's initial parameters.
_HEAD_SEED = 0x47414E48
# Folded into the generator's simulation key for the cached pairs' student samples (VP students' noise).
_PAIRS_KEY = 0x50414952
# Folded into a loss's key for the GAN's noise levels and noises: the keys the other terms split stay
# as they are, so turning the GAN on changes no other draw.
_GAN_KEY = 0x47414E


def init_state(distiller: Distiller, teacher_params: Params, seed: int, buffers: Params | None = None) -> TrainState:
    """Student and fake score both start as the teacher: copies of it in `model.param_dtype` (fresh
    buffers: state is donated), or with LoRA fresh adapters (B = 0) over it. With the GAN, a fresh
    classifier head too, sized by the features of the teacher with its `buffers` (shapes suffice)."""
    dtype = jnp.dtype(distiller.c.model.param_dtype)
    key = jax.random.fold_in(jax.random.key(seed), _ADAPTER_SEED)

    def start(role: str, index: int) -> Params:
        if role in distiller.adapters:
            return lora.init_adapters(distiller.adapters[role][1], jax.random.fold_in(key, index))
        return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), teacher_params)

    student, fake = start("student", 0), start("fake", 1)
    disc = opt_disc = None
    if distiller.gan:
        if buffers is None:
            raise ValueError("init_state with the GAN needs the teacher's buffers (the head is sized by its features)")
        disc = distiller.init_head(teacher_params, buffers, jax.random.fold_in(jax.random.key(seed), _HEAD_SEED))
        opt_disc = distiller.tx_disc.init(disc)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        student=student,
        fake=fake,
        opt_student=distiller.tx_student.init(student),
        opt_fake=distiller.tx_fake.init(fake),
        disc=disc,
        opt_disc=opt_disc,
    )


StepFn = Callable[[TrainState, Frozen, RoundBatch], tuple[TrainState, dict]]
