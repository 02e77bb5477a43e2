"""Whole diffusers pipelines onto a mesh: every component, each in its own dtype.

    from dpdmd_jax.pipelines import load_sd3_pipeline
    pipe = load_sd3_pipeline("/ckpts/stable-diffusion-3.5-medium", make_mesh(fsdp=-1))
    cond = pipe.text.encode(["a photo of a cat"])      # SD3Cond, as encode_prompt
    images = pipe.vae.decode(from_model_latent(pipe.vae.cfg, latents))

`path` is a local `StableDiffusion3Pipeline` folder, or a hub id where the network allows (only
the components asked for are fetched). All components are checked before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jax.sharding import Mesh

from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.text.sd3 import check_pipeline, load_sd3_text_encoder
from dpdmd_jax.weights.pipeline import SD3_COMPONENTS, component_problems, resolve_pipeline
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.sd3 import load_mmdit
from dpdmd_jax.weights.vae import load_vae


@dataclasses.dataclass
class SD3Pipeline:
    transformer: Any  # models.mmdit.MMDiT
    text: Any  # text.sd3.SD3TextEncoder
    vae: Any  # models.vae.AutoencoderKL
    root: str


def load_sd3_pipeline(path: str | os.PathLike, mesh: Mesh, rules=DEFAULT_RULES, *,
                      transformer_dtype: str = "bfloat16", transformer_param_dtype: str | None = None,
                      text_dtype: str = "bfloat16", vae_dtype: str = "float32", use_t5: bool = True,
                      max_sequence_length: int = 256, progress: bool = True, **transformer_overrides: Any,
                      ) -> SD3Pipeline:
    """Transformer, CLIP-L / bigG / T5-XXL and VAE of an SD3 / SD3.5 pipeline, each parameter
    placed on its sharding on `mesh`. Defaults: bf16 transformer and encoders, fp32 VAE (decoding
    in fp16/bf16 loses detail, and the SDXL VAE overflows fp16). `transformer_overrides` are the
    MMDiT's execution knobs (scan_layers, remat_policy, attention_impl)."""

    components = [c for c in SD3_COMPONENTS if use_t5 or not c.endswith("_3")]
    root = resolve_pipeline(path, components)
    problems = component_problems(root, ["transformer", "vae"]) or check_pipeline(root, use_t5)
    if problems:
        raise CheckpointError("\n  - ".join([f"{root} is not a complete SD3 pipeline:", *problems]))
    transformer = load_mmdit(os.path.join(root, "transformer"), dtype=transformer_dtype,
                             param_dtype=transformer_param_dtype, mesh=mesh, rules=rules, progress=progress,
                             **transformer_overrides)
    text = load_sd3_text_encoder(root, mesh, rules, dtype=text_dtype, max_sequence_length=max_sequence_length,
                                 use_t5=use_t5, progress=progress)
    vae = load_vae(os.path.join(root, "vae"), dtype=vae_dtype, mesh=mesh, rules=rules, progress=progress)
    return SD3Pipeline(transformer, text, vae, root)
