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
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpdmd_jax.backbones import SD3Cond
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.multihost import SyncedJit
from dpdmd_jax.text import tokenizers as tok_lib
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.pipeline import component_problems
from dpdmd_jax.weights.safetensors_io import CheckpointError

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


class SD3TextEncoder:
    """Tokenizers + the three encoders of an SD3 pipeline, on a mesh."""

    def __init__(self, tokenizers: dict[str, Any], encoders: dict[str, nnx.Module], mesh: Mesh,
                 max_sequence_length: int = 256, joint_attention_dim: int = 4096):
        self.tokenizers = tokenizers
        self.mesh = mesh
        self.max_sequence_length = max_sequence_length
        self.use_t5 = "t5" in encoders
        self.width = encoders["t5"].cfg.d_model if self.use_t5 else joint_attention_dim
        split = {name: nnx.split(m) for name, m in encoders.items()}
        self.graphdefs = {name: g for name, (g, _) in split.items()}
        self.params = {name: s for name, (_, s) in split.items()}
        self._encode = SyncedJit(self._encode_impl, "encode_sd3_text")
        self._encode_empty = SyncedJit(self._encode_batch, "encode_sd3_empty", out_shardings=mesh_lib.replicated(mesh))
        self._empty: SD3Cond | None = None

    # ------------------------------------------------------------------ host
    def tokenize(self, prompts: Sequence[str]) -> tuple[SD3Tokens, np.ndarray]:
        """(token ids, [B] bool: truncated by any of the tokenizers)."""
        clip_l = tok_lib.tokenize(self.tokenizers["clip_l"], prompts, CLIP_MAX_LENGTH)
        clip_g = tok_lib.tokenize(self.tokenizers["clip_g"], prompts, CLIP_MAX_LENGTH)
        t5 = tok_lib.tokenize(self.tokenizers["t5"], prompts, self.max_sequence_length) if self.use_t5 else None
        truncated = clip_l.truncated | clip_g.truncated | (t5.truncated if t5 is not None else False)
        return SD3Tokens(clip_l.ids, clip_g.ids, None if t5 is None else t5.ids), truncated

    # ------------------------------------------------------------------ device
    def _encode_batch(self, params: dict, tokens: SD3Tokens) -> SD3Cond:
        run = lambda name, ids: nnx.merge(self.graphdefs[name], params[name])(ids)
        clip_l, clip_g = run("clip_l", tokens.clip_l), run("clip_g", tokens.clip_g)
        if self.use_t5:
            t5 = run("t5", tokens.t5)
        else:
            t5 = jnp.zeros((tokens.clip_l.shape[0], self.max_sequence_length, self.width), clip_l.penultimate.dtype)
        cond = assemble(clip_l, clip_g, t5)
        return jax.tree.map(lambda x: x.astype(jnp.float32), cond)

    def _encode_impl(self, params: dict, tokens: SD3Tokens) -> SD3Cond:
        if tokens.clip_l.ndim == 2:
            cond, batch_axis = self._encode_batch(params, tokens), 0
        else:  # [R, B, L]: a round's M + 1 batches, one after the other (activations of one batch live)
            cond, batch_axis = jax.lax.map(lambda t: self._encode_batch(params, t), tokens), 1
        lead = [None] * batch_axis
        spec = lambda x: PartitionSpec(*lead, mesh_lib.BATCH_AXES, *([None] * (x.ndim - batch_axis - 1)))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec(x))), cond)

    def encode_tokens(self, tokens: SD3Tokens) -> SD3Cond:
        """Global token arrays [B, L] or [R, B, L] (batch axis sharded) -> SD3Cond of the same leading shape."""
        return self._encode(self.params, tokens)

    def encode(self, prompts: Sequence[str]) -> SD3Cond:
        """Prompts -> SD3Cond of host arrays, on every process (the whole mesh encodes them): for
        sampling, sample grids and embedding caches. Every process passes the same prompts."""
        tokens, truncated = self.tokenize(prompts)
        if truncated.any():
            logging.warning("%d of %d prompts were longer than the tokenizers' limits and were truncated",
                            int(truncated.sum()), len(prompts))
        b = len(prompts)
        pad = -b % mesh_lib.batch_divisor(self.mesh)  # rows repeated to fill the mesh, then dropped
        padded = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, 0)]), tokens)
        cond = self.encode_tokens(jax.tree.map(self._global, padded))
        return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True)[:b], cond)

    def _global(self, x: np.ndarray) -> jax.Array:
        return mesh_lib.global_batch(self.mesh, x)

    def empty(self) -> SD3Cond:
        """The embedding of "" [1, ...], replicated; computed once."""
        if self._empty is None:
            tokens, _ = self.tokenize([""])
            self._empty = self._encode_empty(self.params, tokens)
        return self._empty


# ---------------------------------------------------------------------------- loading

# (our name, pipeline subfolder of the encoder, of the tokenizer)
COMPONENTS = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"),
              ("t5", "text_encoder_3", "tokenizer_3"))


def _components(use_t5: bool):
    return [c for c in COMPONENTS if use_t5 or c[0] != "t5"]


def check_pipeline(root: str, use_t5: bool = True) -> list[str]:
    """Cheap checks (config files and tokenizers only, no weights) of an SD3 pipeline's text side:
    every folder present, every tokenizer fits its encoder's vocabulary."""
    needed = [f for _, enc, tok in _components(use_t5) for f in (enc, tok)]
    problems = component_problems(root, needed)
    if problems:
        return problems
    for name, enc, tok in _components(use_t5):
        try:
            raw = loader.read_folder_config(os.path.join(root, enc), _CLASSES[name], enc)
            tokenizer = tok_lib.load_tokenizer(os.path.join(root, tok), "t5" if name == "t5" else "clip")
        except Exception as e:  # CheckpointError, or a tokenizer file the library cannot parse
            problems.append(str(e))
            continue
        eos = None if name == "t5" else raw.get("eos_token_id")
        problems += tok_lib.check_vocabulary(tokenizer, raw["vocab_size"], f"{tok}/ vs {enc}/", eos)
    return problems


_CLASSES = {"clip_l": ("CLIPTextModelWithProjection",), "clip_g": ("CLIPTextModelWithProjection",),
            "t5": ("T5EncoderModel",)}


def load_sd3_text_encoder(root: str, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES, *, dtype: str = "bfloat16",
                          max_sequence_length: int = 256, use_t5: bool = True,
                          progress: bool = True) -> SD3TextEncoder:
    """The tokenizers and encoders of the pipeline at `root`, the encoders sharded on `mesh`."""
    from dpdmd_jax.weights.clip import load_clip_text
    from dpdmd_jax.weights.t5 import load_t5_encoder

    problems = check_pipeline(root, use_t5)
    if problems:
        raise CheckpointError("\n  - ".join([f"{root}: the text encoders cannot be loaded:", *problems]))
    tokenizers, encoders = {}, {}
    for name, enc, tok in _components(use_t5):
        tokenizers[name] = tok_lib.load_tokenizer(os.path.join(root, tok), "t5" if name == "t5" else "clip")
        load = load_t5_encoder if name == "t5" else load_clip_text
        encoders[name] = load(os.path.join(root, enc), dtype=dtype, mesh=mesh, rules=rules, progress=progress)
    joint = loader.read_folder_config(os.path.join(root, "transformer"), ("SD3Transformer2DModel",),
                                      "transformer").get("joint_attention_dim", 4096) if not use_t5 else 4096
    return SD3TextEncoder(tokenizers, encoders, mesh, max_sequence_length, joint)
