"""SD3 / SD3.5 prompt encoding, exactly as `StableDiffusion3Pipeline.encode_prompt`:

    CLIP-L and OpenCLIP-bigG, 77 tokens each -> penultimate hidden states (no final LayerNorm),
        concatenated on channels (768 + 1280 = 2048) and zero-padded to T5's width (4096);
    T5-XXL, `max_sequence_length` (256) tokens -> last hidden state;
    context = [CLIP (77) ; T5 (256)] on the sequence axis -> [B, 333, 4096];
    pooled  = [CLIP-L projected pooled ; bigG projected pooled] -> [B, 2048].

No attention masks anywhere (the pipeline passes none). Without T5 (`use_t5=False`, the pipeline's
`text_encoder_3=None`) its 256 positions are zeros. The unconditional conditioning is the embedding
of "" (the method's code, and the pipeline's default negative prompt).

The encoders run on device, each parameter sharded like the teacher's (`parallel.mesh` rules), and
every batch is tokenized on the host of the rows it holds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.core import SD3Cond
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.text import tokenizers as tok_lib
from dpdmd_jax.text.encoder import Component, TextEncoder, check_components, load_components
from dpdmd_jax.weights import loader

CLIP_MAX_LENGTH = 77  # the CLIP tokenizers' model_max_length in every SD3 pipeline


@flax.struct.dataclass
class SD3Tokens:
    """Token ids [..., 77], [..., 77], [..., max_sequence_length] (None without T5)."""

    clip_l: Any
    clip_g: Any
    t5: Any = None


def assemble(clip_l: Any, clip_g: Any, t5_states: jax.Array) -> SD3Cond:
    """The pipeline's concatenation, from the two CLIP outputs (`models.clip.CLIPTextOutput`) and
    T5's last hidden state [B, T, D]."""
    clip = jnp.concatenate([clip_l.penultimate, clip_g.penultimate], axis=-1)
    pad = t5_states.shape[-1] - clip.shape[-1]
    if pad < 0:  # torch's F.pad would silently crop the CLIP states here
        raise ValueError(f"T5 width {t5_states.shape[-1]} is smaller than the CLIP states' {clip.shape[-1]}")
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, pad)))
    context = jnp.concatenate([clip, t5_states.astype(clip.dtype)], axis=1)
    return SD3Cond(context=context, pooled=jnp.concatenate([clip_l.text_embeds, clip_g.text_embeds], axis=-1))


class SD3TextEncoder(TextEncoder):
    """Tokenizers + the three encoders of an SD3 pipeline, on a mesh."""

    def __init__(self, tokenizers: dict[str, Any], encoders: dict[str, nnx.Module], mesh: Mesh,
                 max_sequence_length: int = 256, joint_attention_dim: int = 4096):
        super().__init__(tokenizers, encoders, mesh)
        self.max_sequence_length = max_sequence_length
        self.use_t5 = "t5" in encoders
        self.width = encoders["t5"].cfg.d_model if self.use_t5 else joint_attention_dim

    def tokenize_each(self, prompts: Sequence[str]) -> dict[str, tok_lib.Tokenized]:
        each = {name: tok_lib.tokenize(self.tokenizers[name], prompts, CLIP_MAX_LENGTH)
                for name in ("clip_l", "clip_g")}
        if self.use_t5:
            each["t5"] = tok_lib.tokenize(self.tokenizers["t5"], prompts, self.max_sequence_length)
        return each

    def _tokens(self, each: dict[str, tok_lib.Tokenized]) -> SD3Tokens:
        return SD3Tokens(each["clip_l"].ids, each["clip_g"].ids, each["t5"].ids if "t5" in each else None)

    def _encode_batch(self, params: dict, tokens: SD3Tokens) -> SD3Cond:
        clip_l, clip_g = self.run(params, "clip_l", tokens.clip_l), self.run(params, "clip_g", tokens.clip_g)
        if self.use_t5:
            t5 = self.run(params, "t5", tokens.t5)
        else:
            t5 = jnp.zeros((tokens.clip_l.shape[0], self.max_sequence_length, self.width), clip_l.penultimate.dtype)
        return jax.tree.map(lambda x: x.astype(jnp.float32), assemble(clip_l, clip_g, t5))


# ---------------------------------------------------------------------------- loading

WITH_PROJECTION = ("CLIPTextModelWithProjection",)
COMPONENTS = (Component("clip_l", "text_encoder", "tokenizer", WITH_PROJECTION),
              Component("clip_g", "text_encoder_2", "tokenizer_2", WITH_PROJECTION),
              Component("t5", "text_encoder_3", "tokenizer_3", ("T5EncoderModel",), kind="t5"))


def _components(use_t5: bool) -> list[Component]:
    return [c for c in COMPONENTS if use_t5 or c.kind != "t5"]


def check_pipeline(root: str, use_t5: bool = True) -> list[str]:
    """Cheap checks (configs and tokenizers, no weights) of an SD3 pipeline's text side."""
    return check_components(root, _components(use_t5))


def load_sd3_text_encoder(root: str, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES, *, dtype: str = "bfloat16",
                          max_sequence_length: int = 256, use_t5: bool = True,
                          progress: bool = True) -> SD3TextEncoder:
    """The tokenizers and encoders of the pipeline at `root`, the encoders sharded on `mesh`."""
    tokenizers, encoders = load_components(root, _components(use_t5), mesh, rules, dtype=dtype, progress=progress)
    joint = 4096
    if not use_t5:  # T5's positions are zeros of the transformer's context width
        joint = loader.read_folder_config(os.path.join(root, "transformer"), ("SD3Transformer2DModel",),
                                          "transformer").get("joint_attention_dim", 4096)
    return SD3TextEncoder(tokenizers, encoders, mesh, max_sequence_length, joint)
