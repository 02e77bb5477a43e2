"""transformers `T5EncoderModel` folders <-> our `T5Encoder` (load onto shardings, export back).

Our names flatten transformers' `encoder.block.{i}.layer.{0,1}` into `blocks.{i}.{attn_norm, attn,
ff_norm, ff}` (`_RENAMES`). Two leaves need more than a rename:
  - the relative attention bias sits at our top level; the checkpoint holds it in block 0 only;
  - the token embedding: T5EncoderModel ties `encoder.embed_tokens` to `shared`, and `save_pretrained`
    (transformers 5.24) writes only `shared.weight`; other exports hold `encoder.embed_tokens.weight`, or
    both. We read whichever is present; when both are, both are shape-checked and, as transformers does
    (it unties the pair when their values differ), `encoder.embed_tokens.weight` is the one the encoder uses.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.models.t5 import T5Config, T5Encoder
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.pipeline import component_folder
from dpdmd_jax.weights.safetensors_io import CheckpointError, index_checkpoint

WEIGHTS_PREFIX = "model"
WEIGHTS_NAME = "model.safetensors"
SHARED_KEY = "shared.weight"
EMBED_TOKENS_KEY = "encoder.embed_tokens.weight"
PIPELINE_SUBFOLDER = "text_encoder_3"  # where SD3 / SD3.5 pipelines keep T5-XXL

# (our dotted path pattern, transformers pattern), applied in order to our path.
_RENAMES = (
    (r"^embed_tokens\.embedding$", SHARED_KEY),
    (r"^relative_attention_bias$", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"^blocks\.(\d+)\.attn_norm\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.", r"encoder.block.\1.layer.0.SelfAttention."),
    (r"^blocks\.(\d+)\.ff_norm\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ff\.", r"encoder.block.\1.layer.1.DenseReluDense."),
    (r"^final_layer_norm\.", "encoder.final_layer_norm."),
    (r"\.kernel$", ".weight"),
)


def transformers_key(path: tuple[Any, ...]) -> str:
    """Our state path -> the transformers state-dict key."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def key_map(
    cfg: T5Config, abstract_state: nnx.State, embedding_keys: tuple[str, ...] = (SHARED_KEY,)
) -> dict[tuple, loader.Source]:
    """For every leaf of the model state: its transformers keys, checkpoint shape and layout change.

    `embedding_keys`: the checkpoint keys of the (tied) token embedding; with several, each is
    validated and the first is loaded (`loader.load_state` uses the first part of an unstacked
    Source). Export writes `shared.weight` only, as `save_pretrained` does.
    """
    del cfg  # the state's shapes say everything; kept for the uniform key_map(cfg, state) signature
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        if path == ("embed_tokens", "embedding"):
            sources[path] = loader.Source(keys=tuple(embedding_keys), shape=shape)
        elif path[-1] == "kernel":
            sources[path] = loader.Source(
                keys=(transformers_key(path),), shape=shape[::-1], transform=loader.linear_to_ours
            )
        else:
            sources[path] = loader.Source(keys=(transformers_key(path),), shape=shape)
    return sources


def embedding_keys_in(names) -> tuple[str, ...]:
    """The token-embedding keys among checkpoint key `names`, the one the encoder uses first
    (shared.weight if it has neither, so that validation reports it missing)."""
    present = tuple(k for k in (EMBED_TOKENS_KEY, SHARED_KEY) if k in names)
    return present or (SHARED_KEY,)


def read_config(folder: str, **overrides: Any) -> T5Config:
    raw = loader.read_folder_config(folder, ("T5EncoderModel",), "transformers T5EncoderModel")
    if raw.get("model_type", "t5") != "t5":
        raise CheckpointError(f"{folder}/config.json has model_type {raw['model_type']!r}, not a T5 ('t5') model")
    return loader.build_config(T5Config.from_transformers, raw, folder, **overrides)


def load_t5_encoder(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
    **overrides: Any,
) -> T5Encoder:
    """Loads a transformers T5EncoderModel folder (one model.safetensors or an indexed, sharded set)
    into a `T5Encoder`.

    Args:
      path: the encoder folder, or an SD3 pipeline root holding it as text_encoder_3/.
      dtype / param_dtype: compute and storage dtypes ("float32", "bfloat16"); param_dtype defaults to dtype.
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
      overrides: execution knobs of `T5Config` (residual_dtype).
    """
    folder = component_folder(path, PIPELINE_SUBFOLDER)
    cfg = read_config(folder, dtype=dtype, param_dtype=param_dtype or dtype, **overrides)
    tensors = index_checkpoint(folder, WEIGHTS_PREFIX)  # headers only
    embedding_keys = embedding_keys_in(tensors)
    abstract = loader.abstract_model(lambda rngs: T5Encoder(cfg, rngs=rngs))
    return loader.load_module(abstract, lambda st: key_map(cfg, st, embedding_keys), folder, prefix=WEIGHTS_PREFIX,
                              mesh=mesh, rules=rules, progress=progress, tensors=tensors)


def save_t5_encoder(
    model: T5Encoder, out_dir: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False
) -> str:
    """Writes `model` as a transformers folder (config.json + one model.safetensors, embedding as
    `shared.weight`) that `T5EncoderModel.from_pretrained(out_dir)` loads. Refuses to overwrite unless asked."""
    return loader.save_module(model, lambda st: key_map(model.cfg, st), out_dir, weights_name=WEIGHTS_NAME,
                              config=model.cfg.to_transformers(), dtype=dtype, overwrite=overwrite)
