"""The SD3 / SD3.5 MMDiT as a backbone: rectified flow, velocity prediction, `SD3Cond`.

`model.source` is a diffusers StableDiffusion3Pipeline folder (or its `transformer/` folder), "toy"
(the shipped toy teacher) or "random" (a random `MMDiT` of `model.arch`, for tests).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax import core
from dpdmd_jax.backbones.pipeline import PRESET, PipelineBackbone, WeightSource, preset_source, random_model
from dpdmd_jax.diffusion.schedules import RectifiedFlow
from dpdmd_jax.models import clip, t5
from dpdmd_jax.models.mmdit import PRESETS, MMDiT, MMDiTConfig
from dpdmd_jax.weights.loader import abstract_model
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.text.sd3 import check_pipeline, load_sd3_text_encoder
from dpdmd_jax.toy.teacher import CONTEXT_LEN as TOY_CONTEXT_LEN
from dpdmd_jax.toy.teacher import load_toy_teacher, toy_config
from dpdmd_jax.weights.pipeline import SD3_COMPONENTS
from dpdmd_jax.weights.sd3 import key_map, load_mmdit, read_config, resolve_folder

# CLIP's 77 tokens ++ T5's 256 (SD3's max_sequence_length), the pipeline's context length.
CLIP_LEN = 77


def exec_overrides(c: ml_collections.ConfigDict) -> dict[str, Any]:
    m = c.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                remat_policy=m.remat_policy, attention_impl=m.attention_impl)


def weight_source(c: ml_collections.ConfigDict) -> WeightSource:
    """`model.source`: "toy" (the shipped toy teacher), "random" (a random MMDiT of `model.arch`, for
    tests; the toy's text encoder shapes), "preset:NAME" (an architecture of `models.mmdit.PRESETS`,
    random weights) or a diffusers folder."""
    overrides, source = exec_overrides(c), c.model.source
    if source.startswith(PRESET):
        return preset_source(c, MMDiT, MMDiTConfig, PRESETS, overrides)
    if source == "toy":
        return WeightSource(True, toy_config, lambda mesh, rules: load_toy_teacher(mesh=mesh, rules=rules, **overrides),
                            TOY_CONTEXT_LEN)
    if source.startswith("random"):
        build = lambda rngs: MMDiT(MMDiTConfig(**dict(c.model.arch), **overrides), rngs=rngs)
        return WeightSource(True, lambda: MMDiTConfig(**dict(c.model.arch)),
                            lambda mesh, rules: random_model(build, c.seed, mesh, rules), TOY_CONTEXT_LEN)
    return WeightSource(False, lambda: read_config(resolve_folder(source)),
                        lambda mesh, rules: load_mmdit(source, mesh=mesh, rules=rules, **overrides))


class SD3Backbone(PipelineBackbone):
    schedule = RectifiedFlow()
    cond_type = core.SD3Cond
    components = SD3_COMPONENTS
    family = "SD3/SD3.5"
    weight_source = staticmethod(weight_source)
    model_class = MMDiT
    presets = PRESETS
    default_preset = "sd3.5-medium"
    key_map = staticmethod(key_map)
    # The joint blocks' attention (both streams) and feed-forwards: where diffusers' SD3 LoRA
    # scripts put adapters (attention), plus the MLPs a distilled student also changes.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    def exec_overrides(self) -> dict[str, Any]:
        return exec_overrides(self.c)

    def abstract_text_encoders(self) -> dict[str, nnx.Module]:
        """CLIP-L and OpenCLIP-bigG (with projections) and, with `text.use_t5`, T5-XXL."""
        dt = dict(dtype=self.c.text.dtype, param_dtype=self.c.text.dtype)
        text = lambda name: abstract_model(lambda r: clip.CLIPTextModel(clip.CLIPTextConfig(**clip.PRESETS[name], **dt),
                                                                        rngs=r))
        models = {"CLIP-L": text("clip-l"), "OpenCLIP-bigG": text("clip-bigg")}
        if self.c.text.use_t5:
            models["T5-XXL"] = abstract_model(lambda r: t5.T5Encoder(t5.T5Config(**t5.PRESETS["t5-v1_1-xxl"], **dt),
                                                                     rngs=r))
        return models

    def text_check(self, root: str) -> list[str]:
        return check_pipeline(root, self.c.text.use_t5)

    def load_text_encoder(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
        """CLIP-L, OpenCLIP-bigG and T5-XXL of the pipeline, sharded on `mesh` (`text.sd3`)."""
        t = self.c.text
        return load_sd3_text_encoder(self.pipeline_root, mesh, rules, dtype=t.dtype,
                                     max_sequence_length=t.max_sequence_length, use_t5=t.use_t5)

    def apply(self, model: MMDiT, z: jax.Array, level: jax.Array, cond: core.SD3Cond) -> jax.Array:
        return model(z, self.schedule.model_time(level), cond.context, cond.pooled)

    def features(self, model: MMDiT, z: jax.Array, level: jax.Array, cond: core.SD3Cond) -> jax.Array:
        """The image tokens after joint block `gan.block` on the patch grid, [B, H / p, W / p, inner_dim]."""
        return model.features(z, self.schedule.model_time(level), cond.context, cond.pooled, block=self.c.gan.block)

    def check_source(self) -> list[str]:
        """The pipeline's checks, and `gan.block` against the architecture's depth (its config only)."""
        problems = super().check_source()
        if self.c.gan.weight > 0 and not problems:
            n = self.arch.num_layers
            if not -n <= self.c.gan.block < n:
                problems.append(f"gan.block={self.c.gan.block} is not a joint block of this {n}-layer MMDiT: choose "
                                f"one in -{n}..{n - 1} (-1 = the last; its image tokens feed the GAN's head).")
        return problems

    def latent_shape(self) -> tuple[int, int, int]:
        return (*self.c.data.latent_size, self.arch.in_channels)

    def cond_spec(self, batch: int) -> core.SD3Cond:
        length = self.weights.context_len or CLIP_LEN + self.c.text.max_sequence_length
        f32 = jax.numpy.float32
        return core.SD3Cond(
            context=jax.ShapeDtypeStruct((batch, length, self.arch.joint_attention_dim), f32),
            pooled=jax.ShapeDtypeStruct((batch, self.arch.pooled_projection_dim), f32),
        )
