"""The toy teacher: a small SD3.5-style MMDiT trained by flow matching on `dpdmd_jax.toy.data`.

A trained copy ships in `TEACHER_DIR` (a diffusers `SD3Transformer2DModel` folder), so toy
distillation starts at once; `python -m dpdmd_jax.toy.train_teacher` re-trains it.

`sample_flow` samples any toy model (teacher or 4-step student) with the project's one sampler:
Euler steps over an explicit sigma grid, with classifier-free guidance whose unconditional branch
is the NULL_CLASS embedding (all zeros), the same constant the teacher saw under CFG dropout.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpdmd_jax.backbones import SD3Cond
from dpdmd_jax.diffusion import flow, sampler
from dpdmd_jax.diffusion.schedules import RectifiedFlow
from dpdmd_jax.models.mmdit import MMDiT, MMDiTConfig
from dpdmd_jax.toy import data, metrics

FLOW = RectifiedFlow()
CONTEXT_LEN = 4  # tokens of the toy "text encoder" (data.class_embedding)

# A small SD3.5-Medium lookalike: patch 2 on the 16x16x3 latent (8x8 = 64 image tokens + 4
# context tokens), MMDiT-X dual attention in layer 0 and qk RMSNorm, so toy runs exercise
# the same branches as SD3.5-M; the last layer is context_pre_only as in every SD3.
TOY_ARCH: dict[str, Any] = dict(
    sample_size=16,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=4,
    num_attention_heads=4,
    attention_head_dim=16,
    caption_projection_dim=64,  # = heads * head_dim
    joint_attention_dim=32,
    pooled_projection_dim=32,
    pos_embed_max_size=8,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)

TEACHER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "teacher")
TRAIN_COMMAND = (
    "python -m dpdmd_jax.toy.train_teacher --config=configs/toy_teacher.py --workdir=runs/toy_teacher"
)

# Evaluation protocol of the toy teacher (docs/DESIGN.md: 30-step teacher on the shift-3 grid).
EVAL_STEPS = 30
EVAL_SHIFT = 3.0


def toy_config(**overrides: Any) -> MMDiTConfig:
    """`MMDiTConfig` of the toy teacher; `overrides` replace TOY_ARCH entries or execution knobs."""
    return MMDiTConfig(**{**TOY_ARCH, **overrides})


def toy_conditioning(
    class_ids: np.ndarray | Sequence[int],
    context_dim: int = TOY_ARCH["joint_attention_dim"],
    pooled_dim: int = TOY_ARCH["pooled_projection_dim"],
) -> tuple[jax.Array, jax.Array]:
    """Class ids (NULL_CLASS = -1 for the unconditional branch) -> (context [B, 4, 32], pooled [B, 32])."""
    context, pooled = data.class_embedding(np.asarray(class_ids), context_dim, pooled_dim, CONTEXT_LEN)
    return jnp.asarray(context), jnp.asarray(pooled)


def load_toy_teacher(path: str | os.PathLike | None = None, **overrides: Any) -> MMDiT:
    """The shipped toy teacher (or the teacher folder at `path`) as an `MMDiT`.

    `overrides` go to `load_mmdit` (dtype, mesh, scan_layers, remat_policy, ...).
    """
    from dpdmd_jax.weights.sd3 import WEIGHTS_NAME, load_mmdit

    folder = os.fspath(path) if path is not None else TEACHER_DIR
    if not (os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(folder, WEIGHTS_NAME))):
        raise FileNotFoundError(
            f"no toy teacher at {folder} (expected config.json and {WEIGHTS_NAME}). Train one with\n"
            f"  {TRAIN_COMMAND}\n(RESULTS.md in {TEACHER_DIR} gives the shipped teacher's longer schedule, "
            f"about 1.5 h on 2 CPU cores) and copy runs/toy_teacher/teacher/* into {TEACHER_DIR}, "
            "or pass --config.export_dir to write it there directly."
        )
    overrides.setdefault("progress", False)
    return load_mmdit(folder, **overrides)


def _sample_impl(graphdef, state, noise, context, pooled, sigmas, cfg_scale, guided):
    model = nnx.merge(graphdef, state)
    predict = lambda z, level, c: model(z, FLOW.model_time(level), c.context, c.pooled)
    cond = SD3Cond(context, pooled)
    # NULL_CLASS embeds to exact zeros (data.class_embedding), so no lookup is needed here.
    uncond = jax.tree.map(jnp.zeros_like, cond) if guided else None
    return sampler.sample(predict, FLOW, noise, sigmas, cond, uncond, cfg_scale)


# The grid and the guidance scale are traced (one compile per batch shape and grid length);
# whether guidance runs at all changes the graph and is static.
_sample_jit = jax.jit(_sample_impl, static_argnames=("graphdef", "guided"))


def sample_flow(
    model: MMDiT,
    noise: jax.Array | np.ndarray,
    class_ids: np.ndarray | Sequence[int],
    sigmas: np.ndarray | Sequence[float],
    cfg_scale: float = 1.0,
) -> jax.Array:
    """Euler sampling from `noise` [B, 16, 16, 3] (at sigmas[0]) along `sigmas` (ending at 0
    for clean samples), class-conditioned, with CFG `cfg_scale` (1 = conditional only).

    The project's one sampler (`diffusion.sampler.sample`) with the toy's conditioning. Pure:
    the model's state is read, never changed; jitted (compiled once per batch shape, grid length
    and guided/unguided). Works for the teacher (30-step grid) and students (4-step grid) alike.
    """
    graphdef, state = nnx.split(model)
    context, pooled = toy_conditioning(class_ids, model.cfg.joint_attention_dim, model.cfg.pooled_projection_dim)
    sigmas = jnp.asarray(np.asarray(sigmas, np.float32))
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D grid of >= 2 values, got shape {sigmas.shape}")
    guided = float(cfg_scale) != 1.0
    return _sample_jit(
        graphdef, state, jnp.asarray(noise, jnp.float32), context, pooled, sigmas,
        jnp.float32(cfg_scale), guided=guided,
    )


def eval_class_ids(seeds: int = 9, repeats: int = 4) -> np.ndarray:
    """Prompts laid out as toy_metrics expects: (6 classes x `repeats`) prompts x `seeds`
    consecutive samples each."""
    prompts = np.tile(np.arange(data.NUM_CLASSES), repeats)
    return np.repeat(prompts, seeds).astype(np.int32)


def evaluate_sampler(
    model: MMDiT,
    cfg_scales: Sequence[float] = (1.0, 3.5),
    *,
    sigmas: np.ndarray | None = None,
    seeds: int = 9,
    repeats: int = 4,
    seed: int = 0,
) -> dict[float, dict[str, float]]:
    """toy_metrics of `model` sampled on `sigmas` (default: the 30-step shift-3 teacher grid) at
    each CFG scale, from the same noise for every scale. Returns {cfg_scale: metrics}."""
    if sigmas is None:
        sigmas = flow.flow_match_sigmas(EVAL_STEPS, EVAL_SHIFT)
    ids = eval_class_ids(seeds, repeats)
    noise = jax.random.normal(jax.random.key(seed), (ids.size, data.IMAGE_SIZE, data.IMAGE_SIZE, 3), jnp.float32)
    out = {}
    for w in cfg_scales:
        images = np.asarray(sample_flow(model, noise, ids, sigmas, w))
        out[float(w)] = metrics.toy_metrics(images, ids, seeds)
    return out


def data_metrics(seeds: int = 9, repeats: int = 4, seed: int = 0) -> dict[str, float]:
    """toy_metrics of real data samples in the same prompts x seeds layout (the reference row)."""
    ids = eval_class_ids(seeds, repeats)
    return metrics.toy_metrics(data.sample_batch(seed, ids.size, ids)["images"], ids, seeds)
