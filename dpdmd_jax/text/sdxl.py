"""SDXL prompt encoding, exactly as `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids`:

    CLIP-L (CLIPTextModel) and OpenCLIP-bigG (with projection), 77 tokens each -> penultimate hidden
        states (no final LayerNorm), concatenated on channels -> context [B, 77, 2048];
    text_embeds = bigG's projected pooled output [B, 1280];
    time_ids = (original_h, original_w, crop_top, crop_left, target_h, target_w) [B, 6], by default
        (H, W, 0, 0, H, W) of the generated image.

The unconditional branch is zeros when the pipeline's `force_zeros_for_empty_prompt` is set (SDXL
base; it has the same time_ids), else the encoding of "".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.core import SDXLCond
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.text import tokenizers as tok_lib
from dpdmd_jax.text.encoder import Component, TextEncoder, check_components, load_components

COMPONENTS = (Component("clip_l", "text_encoder", "tokenizer", ("CLIPTextModel",)),
              Component("clip_g", "text_encoder_2", "tokenizer_2", ("CLIPTextModelWithProjection",)))


@flax.struct.dataclass
class SDXLTokens:
    clip_l: Any
    clip_g: Any


def time_ids(image_size: tuple[int, int], crop: tuple[int, int] = (0, 0),
             original_size: tuple[int, int] | None = None) -> np.ndarray:
    """`_get_add_time_ids`: original size ++ crop top-left ++ target size, [6] float32."""
    return np.array([*(original_size or image_size), *crop, *image_size], np.float32)


class SDXLTextEncoder(TextEncoder):
    """Tokenizers + both CLIP encoders of an SDXL pipeline, on a mesh."""

    def __init__(self, tokenizers: dict[str, Any], encoders: dict[str, nnx.Module], mesh: Mesh,
                 image_size: tuple[int, int], force_zeros_for_empty_prompt: bool = True):
        super().__init__(tokenizers, encoders, mesh)
        self.time_ids = time_ids(tuple(image_size))
        self.force_zeros = force_zeros_for_empty_prompt

    def tokenize_each(self, prompts: Sequence[str]) -> dict[str, tok_lib.Tokenized]:
        # The pipeline pads to tokenizer.model_max_length (77 for both).
        return {name: tok_lib.tokenize(self.tokenizers[name], prompts, self.tokenizers[name].model_max_length)
                for name in ("clip_l", "clip_g")}

    def _tokens(self, each: dict[str, tok_lib.Tokenized]) -> SDXLTokens:
        return SDXLTokens(each["clip_l"].ids, each["clip_g"].ids)

    def _encode_batch(self, params: dict, tokens: SDXLTokens) -> SDXLCond:
        clip_l, clip_g = self.run(params, "clip_l", tokens.clip_l), self.run(params, "clip_g", tokens.clip_g)
        context = jnp.concatenate([clip_l.penultimate, clip_g.penultimate], axis=-1)
        ids = jnp.broadcast_to(jnp.asarray(self.time_ids), (context.shape[0], 6))
        return jax.tree.map(lambda x: x.astype(jnp.float32), SDXLCond(context, clip_g.text_embeds, ids))

    def empty(self) -> SDXLCond:
        if not self.force_zeros:
            return super().empty()
        if self._empty is None:
            spec = jax.eval_shape(self._encode_batch, self.params, self.tokenize([""])[0])
            zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), spec)
            zeros = zeros.replace(time_ids=np.broadcast_to(self.time_ids, (1, 6)))
            self._empty = jax.device_put(zeros, mesh_lib.replicated(self.mesh))
        return self._empty


def check_pipeline(root: str) -> list[str]:
    """Cheap checks (configs and tokenizers, no weights) of an SDXL pipeline's text side."""
    return check_components(root, COMPONENTS)


def load_sdxl_text_encoder(root: str, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES, *, image_size: tuple[int, int],
                           dtype: str = "bfloat16", progress: bool = True) -> SDXLTextEncoder:
    """Both CLIP encoders and tokenizers of the SDXL pipeline at `root`, sharded on `mesh`;
    `image_size` (H, W) in pixels sets the time ids."""
    tokenizers, encoders = load_components(root, COMPONENTS, mesh, rules, dtype=dtype, progress=progress)
    index = os.path.join(root, "model_index.json")
    force_zeros = True  # the pipeline's default
    if os.path.isfile(index):
        with open(index) as f:
            force_zeros = json.load(f).get("force_zeros_for_empty_prompt", True)
    return SDXLTextEncoder(tokenizers, encoders, mesh, image_size, force_zeros)
