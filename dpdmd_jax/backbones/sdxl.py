"""The SDXL UNet as a backbone: VP epsilon prediction (scaled-linear betas), `SDXLCond`.

`model.source` is a diffusers StableDiffusionXLPipeline folder (or its `unet/` folder), or "toy"
(the shipped epsilon toy teacher, `toy.teacher.TOY_UNET_ARCH`, with the toy's class prompts). The text
side is CLIP-L + OpenCLIP-bigG (`text.sdxl`), with time ids for the run's image size
(`data.latent_size` x the VAE factor 8); the unconditional branch is zeros, as the pipeline builds
it when `force_zeros_for_empty_prompt` is set.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax import core
from dpdmd_jax.backbones.pipeline import PRESET, PipelineBackbone, WeightSource, preset_source
from dpdmd_jax.diffusion.schedules import VPEpsilon
from dpdmd_jax.models import clip
from dpdmd_jax.models.unet import PRESETS, UNet2DConditionModel, UNetConfig
from dpdmd_jax.weights.loader import abstract_model
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.text.sdxl import check_pipeline, load_sdxl_text_encoder
from dpdmd_jax.toy.teacher import CONTEXT_LEN as TOY_CONTEXT_LEN
from dpdmd_jax.toy.teacher import TEACHER_DIRS, toy_unet_config
from dpdmd_jax.weights.pipeline import SDXL_COMPONENTS
from dpdmd_jax.weights.unet import key_map, load_unet, read_config, resolve_folder

CLIP_LEN = 77
VAE_FACTOR = 8  # SDXL's VAE: 4 blocks, 3 downsamplings


def exec_overrides(c: ml_collections.ConfigDict) -> dict[str, Any]:
    m = c.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat_policy=m.remat_policy)


def weight_source(c: ml_collections.ConfigDict) -> WeightSource:
    """`model.source`: "toy" (the shipped epsilon toy teacher), "preset:NAME" (an architecture of
    `models.unet.PRESETS`, random weights) or a diffusers folder."""
    source, kw = c.model.source, exec_overrides(c)
    if source.startswith(PRESET):
        return preset_source(c, UNet2DConditionModel, UNetConfig, PRESETS, kw)
    if source == "toy":
        return WeightSource(True, toy_unet_config, lambda mesh, rules: load_unet(
            TEACHER_DIRS["unet"], mesh=mesh, rules=rules, progress=False, **kw), TOY_CONTEXT_LEN)
    return WeightSource(False, lambda: read_config(resolve_folder(source)),
                        lambda mesh, rules: load_unet(source, mesh=mesh, rules=rules, **kw))


class SDXLBackbone(PipelineBackbone):
    schedule = VPEpsilon()
    cond_type = core.SDXLCond
    components = tuple(SDXL_COMPONENTS)
    family = "SDXL"
    weight_source = staticmethod(weight_source)
    model_class = UNet2DConditionModel
    presets = PRESETS
    default_preset = "sdxl-base"
    key_map = staticmethod(key_map)
    # The transformer blocks' attention (self and cross) and feed-forwards.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

    def exec_overrides(self) -> dict[str, Any]:
        return exec_overrides(self.c)

    def abstract_text_encoders(self) -> dict[str, nnx.Module]:
        """CLIP-L (hidden states only) and OpenCLIP-bigG with its projection."""
        dt = dict(dtype=self.c.text.dtype, param_dtype=self.c.text.dtype)
        text = lambda name, **kw: abstract_model(
            lambda r: clip.CLIPTextModel(clip.CLIPTextConfig(**{**clip.PRESETS[name], **dt, **kw}), rngs=r))
        return {"CLIP-L": text("clip-l", with_projection=False), "OpenCLIP-bigG": text("clip-bigg")}

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(s) * VAE_FACTOR for s in self.c.data.latent_size)

    def text_check(self, root: str) -> list[str]:
        return check_pipeline(root)

    def load_text_encoder(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
        return load_sdxl_text_encoder(self.pipeline_root, mesh, rules, image_size=self.image_size,
                                      dtype=self.c.text.dtype)

    def apply(self, model, z: jax.Array, level: jax.Array, cond: core.SDXLCond) -> jax.Array:
        return model(z, self.schedule.model_time(level), cond.context, cond.text_embeds, cond.time_ids)

    def features(self, model, z: jax.Array, level: jax.Array, cond: core.SDXLCond) -> jax.Array:
        """The UNet's mid block output (DMD2's classifier features), [B, H / f, W / f, C_mid]."""
        return model.features(z, self.schedule.model_time(level), cond.context, cond.text_embeds, cond.time_ids)

    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.c.data.latent_size, self.arch.in_channels)

    def cond_spec(self, batch: int) -> core.SDXLCond:
        a = self.arch
        pooled = a.projection_class_embeddings_input_dim - 6 * a.addition_time_embed_dim
        f32 = jnp.float32
        length = self.weights.context_len or CLIP_LEN
        return core.SDXLCond(context=jax.ShapeDtypeStruct((batch, length, a.cross_attention_dim), f32),
                             text_embeds=jax.ShapeDtypeStruct((batch, pooled), f32),
                             time_ids=jax.ShapeDtypeStruct((batch, 6), f32))
