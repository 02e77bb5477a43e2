"""Two tiny test backbones, one per schedule, registered as any user backbone would be.

`tiny_flow` (rectified flow, SD3-shaped conditioning) and `tiny_vp` (VP epsilon, SDXL-shaped
conditioning) share `models.tiny.TinyDenoiser`; `model.source` must be "random" (weights from
`config.seed`). They make the method tests run on both schedules in seconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from dpdmd_jax import core
from dpdmd_jax.diffusion.schedules import RectifiedFlow, VPEpsilon
from dpdmd_jax.models.tiny import TinyDenoiser
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.backbones.pipeline import random_model
from dpdmd_jax.weights.loader import abstract_model

CHANNELS, CONTEXT_LEN, CONTEXT_DIM, POOLED_DIM, TIME_IDS = 3, 4, 16, 8, 6


class _Tiny:
    cond_dim: int

    def __init__(self, config: ml_collections.ConfigDict):
        self.c = config

    def check_source(self) -> list[str]:
        if self.c.model.source != "random":
            return [f"model.source={self.c.model.source!r}: the {self.c.backbone} test backbone only builds "
                    "random weights; set --config.model.source=random."]
        return []

    def load(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES) -> TinyDenoiser:
        return random_model(lambda rngs: TinyDenoiser(CHANNELS, self.cond_dim, rngs=rngs), self.c.seed, mesh, rules)

    def abstract_teacher(self) -> TinyDenoiser:
        return abstract_model(lambda rngs: TinyDenoiser(CHANNELS, self.cond_dim, rngs=rngs), self.c.seed)

    def abstract_text_encoders(self) -> dict:
        return {}  # conditionings are random: no text encoder

    def apply(self, model, z, level, cond):
        return model(z, self.schedule.model_time(level), self.cond_vector(cond))

    def features(self, model, z, level, cond):
        """The denoiser's hidden features before its output convolution, [B, H, W, width]."""
        return model.hidden(z, self.schedule.model_time(level), self.cond_vector(cond))

    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.c.data.latent_size, CHANNELS)

    def has_vae(self) -> bool:
        return False  # latents are the images


class TinyFlow(_Tiny):
    schedule = RectifiedFlow()
    cond_type = core.SD3Cond
    cond_dim = CONTEXT_DIM + POOLED_DIM

    def cond_vector(self, cond: core.SD3Cond) -> jax.Array:
        return jnp.concatenate([cond.context.mean(axis=1), cond.pooled], axis=-1)

    def cond_spec(self, batch: int) -> core.SD3Cond:
        return core.SD3Cond(jax.ShapeDtypeStruct((batch, CONTEXT_LEN, CONTEXT_DIM), jnp.float32),
                                 jax.ShapeDtypeStruct((batch, POOLED_DIM), jnp.float32))


class TinyVP(_Tiny):
    schedule = VPEpsilon()
    cond_type = core.SDXLCond
    cond_dim = CONTEXT_DIM + POOLED_DIM + TIME_IDS

    def cond_vector(self, cond: core.SDXLCond) -> jax.Array:
        return jnp.concatenate([cond.context.mean(axis=1), cond.text_embeds, cond.time_ids / 1024.0], axis=-1)

    def cond_spec(self, batch: int) -> core.SDXLCond:
        return core.SDXLCond(jax.ShapeDtypeStruct((batch, CONTEXT_LEN, CONTEXT_DIM), jnp.float32),
                                  jax.ShapeDtypeStruct((batch, POOLED_DIM), jnp.float32),
                                  jax.ShapeDtypeStruct((batch, TIME_IDS), jnp.float32))
