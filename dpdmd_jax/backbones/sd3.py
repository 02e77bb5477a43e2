"""The SD3 / SD3.5 MMDiT as a backbone: rectified flow, velocity prediction, `SD3Cond`.

`model.source` is a diffusers transformer folder (or the pipeline root holding `transformer/`),
"toy" (the shipped toy teacher) or "random" (a random `MMDiT` of `model.arch`, for tests).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax import backbones
from dpdmd_jax.diffusion.schedules import RectifiedFlow
from dpdmd_jax.models.mmdit import MMDiT, MMDiTConfig
from dpdmd_jax.parallel import mesh as mesh_lib

# CLIP's 77 tokens ++ T5's 256 (SD3's max_sequence_length), the pipeline's context length.
CLIP_LEN = 77


def exec_overrides(c: ml_collections.ConfigDict) -> dict[str, Any]:
    m = c.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                remat_policy=m.remat_policy, attention_impl=m.attention_impl)


@backbones.register("mmdit")
class SD3Backbone:
    schedule = RectifiedFlow()
    cond_type = backbones.SD3Cond

    def __init__(self, config: ml_collections.ConfigDict):
        self.c = config
        self.source = config.model.source

    @functools.cached_property
    def arch(self) -> MMDiTConfig:
        if self.source == "toy":
            from dpdmd_jax.toy.teacher import toy_config

            return toy_config()
        if self.source.startswith("random"):
            return MMDiTConfig(**dict(self.c.model.arch))
        from dpdmd_jax.weights.sd3 import read_config, resolve_folder

        return read_config(resolve_folder(self.source))

    @functools.cached_property
    def pipeline_root(self) -> str:
        """The local diffusers pipeline folder the text encoders and the VAE come from
        (`text.source`, else `model.source`; a hub id is fetched where the network allows)."""
        from dpdmd_jax.weights.pipeline import SD3_COMPONENTS, resolve_pipeline

        return resolve_pipeline(self.c.text.source or self.source, SD3_COMPONENTS)

    def check_source(self) -> list[str]:
        """Cheap checks of `model.source` (and of the pipeline's text side when the data are
        prompts), before anything is loaded."""
        from dpdmd_jax.text.sd3 import check_pipeline
        from dpdmd_jax.weights.safetensors_io import CheckpointError

        builtin = self.source == "toy" or self.source.startswith("random")
        if not builtin:
            try:
                self.arch  # noqa: B018  (reads config.json: the folder, or a hub snapshot of it)
            except CheckpointError as e:
                return [f"model.source={self.source!r}: {e}. Set --config.model.source to a diffusers SD3/SD3.5 "
                        "pipeline folder (or its transformer/ folder)."]
        if self.c.data.kind not in ("prompts", "diffusiondb"):
            return []
        if builtin and not self.c.text.source:
            return [f"data.kind={self.c.data.kind!r} needs the text encoders of a diffusers pipeline, and "
                    f"model.source={self.source!r} is not one: set --config.text.source to its folder."]
        try:
            return check_pipeline(self.pipeline_root, self.c.text.use_t5)
        except CheckpointError as e:
            return [f"text.source: {e}"]

    def load_text_encoder(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
        """CLIP-L, OpenCLIP-bigG and T5-XXL of the pipeline, sharded on `mesh` (`text.sd3`)."""
        from dpdmd_jax.text.sd3 import load_sd3_text_encoder

        t = self.c.text
        return load_sd3_text_encoder(self.pipeline_root, mesh, rules, dtype=t.dtype,
                                     max_sequence_length=t.max_sequence_length, use_t5=t.use_t5)

    def load_vae(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES, dtype: str = "float32"):
        from dpdmd_jax.weights.vae import load_vae

        return load_vae(os.path.join(self.pipeline_root, "vae"), dtype=dtype, mesh=mesh, rules=rules)

    def decode(self, vae, z: jax.Array) -> jax.Array:
        """Latents (as the transformer sees them) -> images NHWC in [-1, 1]."""
        from dpdmd_jax.models.vae import from_model_latent

        return vae.decode(from_model_latent(vae.cfg, z))

    def load(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES) -> MMDiT:
        overrides = exec_overrides(self.c)
        if self.source == "toy":
            from dpdmd_jax.toy.teacher import load_toy_teacher

            return load_toy_teacher(mesh=mesh, rules=rules, **overrides)
        if self.source.startswith("random"):
            model = MMDiT(MMDiTConfig(**dict(self.c.model.arch), **overrides), rngs=nnx.Rngs(self.c.seed))
            state = nnx.state(model)
            nnx.update(model, jax.device_put(state, mesh_lib.state_shardings(state, mesh, rules)))
            return model
        from dpdmd_jax.weights.sd3 import load_mmdit

        return load_mmdit(self.source, mesh=mesh, rules=rules, **overrides)

    def apply(self, model: MMDiT, z: jax.Array, level: jax.Array, cond: backbones.SD3Cond) -> jax.Array:
        return model(z, self.schedule.model_time(level), cond.context, cond.pooled)

    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.c.data.latent_size, self.arch.in_channels)

    def cond_spec(self, batch: int) -> backbones.SD3Cond:
        length = CLIP_LEN + self.c.text.max_sequence_length
        if self.source == "toy" or self.source.startswith("random"):
            from dpdmd_jax.toy.teacher import CONTEXT_LEN as length  # the toy "text encoder"'s tokens
        f32 = jax.numpy.float32
        return backbones.SD3Cond(
            context=jax.ShapeDtypeStruct((batch, length, self.arch.joint_attention_dim), f32),
            pooled=jax.ShapeDtypeStruct((batch, self.arch.pooled_projection_dim), f32),
        )
