"""DP-DMD losses as pure functions of model outputs (no model in here).

Arrays are NHWC latents with the batch first. Every target is wrapped in stop_gradient:
targets are directions or regression labels, never something to differentiate.
Losses are reduced in float32 whatever the activations' dtype: a bf16 mean over a
1024^2 latent would drop most of its small terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpdmd_jax.diffusion.flow import per_sample

ArrayLike = jax.typing.ArrayLike
_sg = jax.lax.stop_gradient


def _f32(x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dmd_gradient(x_s: ArrayLike, x0_real: ArrayLike, x0_fake: ArrayLike) -> jax.Array:
    """DMD direction g = (p_real - p_fake) / mean_{H,W,C}|p_real|, float32, no gradient.

    p_real = x_s - x0_real and p_fake = x_s - x0_fake (so the numerator is x0_fake - x0_real);
    the per-sample normaliser makes the step size independent of the noise level drawn.
    Descending the DMD loss moves x along -g, i.e. towards the real (teacher) x0. NaN/inf
    from a zero normaliser are mapped like torch.nan_to_num (nan -> 0, inf -> finite max).
    """
    x_s, x0_real, x0_fake = (_sg(_f32(a)) for a in (x_s, x0_real, x0_fake))
    p_real = x_s - x0_real
    p_fake = x_s - x0_fake
    axes = tuple(range(1, p_real.ndim))
    norm = jnp.mean(jnp.abs(p_real), axis=axes, keepdims=True)
    return jnp.nan_to_num((p_real - p_fake) / norm)


def dmd_loss(x: ArrayLike, g: ArrayLike) -> jax.Array:
    """0.5 * mean((x - stop_gradient(x - g))**2), float32; d loss / d x = g / x.size exactly.

    Written as the equivalent surrogate 0.5*mean(g^2) + sum(sg(g / x.size) * (x - sg(x))):
    same value (the second term is exactly 0) and same gradient, but without the rounding of
    x - (x - g), so the gradient reaching the generator is exactly g / x.size.
    """
    x = _f32(x)
    g = _sg(_f32(g))
    return 0.5 * jnp.mean(g**2) + jnp.sum(_sg(g / x.size) * (x - _sg(x)))


def line_velocity_target(eps: ArrayLike, z_tk: ArrayLike, t_k: ArrayLike) -> jax.Array:
    """Velocity of the straight line through eps (sigma 1) and the teacher anchor z_tk (sigma t_k).

    (eps - z_tk) / (1 - t_k); t_k scalar or [B], always < 1 (K >= 1 teacher steps). Float32.
    """
    eps, z_tk = _f32(eps), _f32(z_tk)
    t = per_sample(t_k, eps.ndim).astype(eps.dtype)
    return (eps - z_tk) / (1.0 - t)


def regression_loss(pred: ArrayLike, target: ArrayLike) -> jax.Array:
    """mean((pred - stop_gradient(target))**2) in float32.

    The diversity loss (velocity target for the "line" target, x0 target for "denoise" and VP
    students) and the fake score's loss (target `Schedule.critic_target`: noise - x for flow
    matching, the noise for the epsilon loss) are both this regression.
    """
    return jnp.mean((_f32(pred) - _sg(_f32(target))) ** 2)


diversity_loss = regression_loss


# ---------------------------------------------------------------------------- the baselines' terms
# DMD v1's regression to the teacher's sample from the same noise is `regression_loss` (L2 on
# latents; DMD v1 measures it with LPIPS in image space). DMD2's GAN: a classifier head on the fake
# score's features gives one logit per sample, "real" when positive (logit = log D / (1 - D)).


def gan_generator_loss(logits_fake: ArrayLike) -> jax.Array:
    """The generator's non-saturating loss mean(softplus(-logits)) = mean(-log sigmoid(logits)),
    float32 (DMD2's `gen_cls_loss`): it falls as the classifier calls the student's samples real
    (logits up), with a gradient that does not vanish while they are confidently called fake."""
    return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


def gan_classifier_loss(logits_real: ArrayLike, logits_fake: ArrayLike) -> jax.Array:
    """The classifier's loss, binary cross-entropy with real = 1 and fake = 0, float32 (DMD2's
    `guidance_cls_loss`): mean(softplus(logits_fake)) = -mean log(1 - sigmoid) on the fakes, plus
    mean(softplus(-logits_real)) = -mean log sigmoid on the reals; it falls as real logits rise
    and fake logits fall."""
    return jnp.mean(jax.nn.softplus(_f32(logits_fake))) + jnp.mean(jax.nn.softplus(-_f32(logits_real)))
