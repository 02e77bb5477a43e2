"""The SDXL UNet as a backbone: VP epsilon prediction (scaled-linear betas), `SDXLCond`.

`model.source` is a diffusers StableDiffusionXLPipeline folder (or its `unet/` folder), or "toy"
(the shipped epsilon toy teacher, `toy.teacher.TOY_UNET_ARCH`, with the toy's class prompts). The text
side is CLIP-L + OpenCLIP-bigG (`text.sdxl`), with time ids for the run's image size
(`data.latent_size` x the VAE factor 8); the unconditional branch is zeros, as the pipeline builds
it when `force_zeros_for_empty_prompt` is set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dpdmd_jax import core
from dpdmd_jax.backbones.pipeline import PipelineBackbone
from dpdmd_jax.diffusion.schedules import VPEpsilon
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.weights.pipeline import SDXL_COMPONENTS

CLIP_LEN = 77
VAE_FACTOR = 8  # SDXL's VAE: 4 blocks, 3 downsamplings


class SDXLBackbone(PipelineBackbone):
    schedule = VPEpsilon()
    cond_type = core.SDXLCond
    components = tuple(SDXL_COMPONENTS)
    family = "SDXL"

    def builtin_source(self) -> bool:
        return self.source == "toy"

    @functools.cached_property
    def arch(self):
        if self.source == "toy":
            from dpdmd_jax.toy.teacher import toy_unet_config

            return toy_unet_config()
        from dpdmd_jax.weights.unet import read_config, resolve_folder

        return read_config(resolve_folder(self.source))

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(s) * VAE_FACTOR for s in self.c.data.latent_size)

    def text_check(self, root: str) -> list[str]:
        from dpdmd_jax.text.sdxl import check_pipeline

        return check_pipeline(root)

    def load_text_encoder(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
        from dpdmd_jax.text.sdxl import load_sdxl_text_encoder

        return load_sdxl_text_encoder(self.pipeline_root, mesh, rules, image_size=self.image_size,
                                      dtype=self.c.text.dtype)

    def load(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
        from dpdmd_jax.weights.unet import load_unet

        m = self.c.model
        if self.source == "toy":
            from dpdmd_jax.toy.teacher import TEACHER_DIRS

            return load_unet(TEACHER_DIRS["unet"], dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, rules=rules,
                             scan_layers=m.scan_layers, remat_policy=m.remat_policy, progress=False)
        return load_unet(self.source, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, rules=rules,
                         scan_layers=m.scan_layers, remat_policy=m.remat_policy)

    def apply(self, model, z: jax.Array, level: jax.Array, cond: core.SDXLCond) -> jax.Array:
        return model(z, self.schedule.model_time(level), cond.context, cond.text_embeds, cond.time_ids)

    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.c.data.latent_size, self.arch.in_channels)

    def cond_spec(self, batch: int) -> core.SDXLCond:
        a = self.arch
        pooled = a.projection_class_embeddings_input_dim - 6 * a.addition_time_embed_dim
        f32 = jnp.float32
        length = CLIP_LEN
        if self.source == "toy":
            from dpdmd_jax.toy.teacher import CONTEXT_LEN as length  # the toy "text encoder"'s tokens
        return core.SDXLCond(context=jax.ShapeDtypeStruct((batch, length, a.cross_attention_dim), f32),
                                  text_embeds=jax.ShapeDtypeStruct((batch, pooled), f32),
                                  time_ids=jax.ShapeDtypeStruct((batch, 6), f32))
