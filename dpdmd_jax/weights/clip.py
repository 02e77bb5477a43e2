"""transformers CLIP text-encoder folders <-> our `CLIPTextModel` (load onto shardings, export back).

Our attribute paths are transformers' module paths; only the leaf names differ (`kernel` and
`embedding` are torch's `weight`). Checkpoint layouts:
  * published checkpoints (SD3 text_encoder / text_encoder_2, SDXL) and what transformers writes
    for CLIPTextModelWithProjection: the transformer under `text_model.`, `text_projection.weight`
    at the top level;
  * a CLIPTextModel saved by transformers >= 5: the same keys without the `text_model.` prefix
    (transformers strips it on load);
  * checkpoints saved before transformers 4.31 also hold `text_model.embeddings.position_ids`, the
    arange(max_position_embeddings) buffer, which is not a parameter: it is accepted and skipped.
We detect the prefix from the file's header and export the published layout, which every
transformers version loads into either class.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.models.clip import CLASS_NAME, CLASS_NAME_WITH_PROJECTION, MODEL_TYPE, CLIPTextConfig, CLIPTextModel
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.safetensors_io import CheckpointError, TensorInfo, index_checkpoint

WEIGHTS_PREFIX = "model"
WEIGHTS_NAME = f"{WEIGHTS_PREFIX}.safetensors"
TEXT_MODEL_PREFIX = "text_model."
PROJECTION_KEY = "text_projection.weight"
# Buffers some checkpoints store (under the transformer prefix) that are not parameters of the model.
IGNORED_BUFFERS = ("embeddings.position_ids",)

_RENAMES = ((r"\.kernel$", ".weight"), (r"\.embedding$", ".weight"))


def transformers_key(path: tuple[Any, ...], prefix: str = TEXT_MODEL_PREFIX) -> str:
    """Our state path -> the transformers state-dict key (transformer keys under `prefix`)."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key if path[0] == "text_projection" else prefix + key


def key_map(
    cfg: CLIPTextConfig, abstract_state: nnx.State, *, prefix: str = TEXT_MODEL_PREFIX
) -> dict[tuple, loader.Source]:
    """For every leaf of the model state: its transformers key, checkpoint shape and layout change.
    The table is the same for every CLIP text config; `cfg` is taken for the common key-map signature."""
    del cfg
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        linear = path[-1] == "kernel"
        sources[path] = loader.Source(
            keys=(transformers_key(path, prefix),),
            shape=shape[::-1] if linear else shape,
            transform=loader.linear_to_ours if linear else loader.identity,
        )
    return sources


def checkpoint_prefix(tensors: dict[str, TensorInfo]) -> str:
    """`text_model.` when the checkpoint stores the transformer under it (published layout), else ""
    (a CLIPTextModel written by transformers >= 5). A mixed file fails validation, naming its keys."""
    return TEXT_MODEL_PREFIX if any(k.startswith(TEXT_MODEL_PREFIX) for k in tensors) else ""


def read_raw_config(folder: str) -> dict[str, Any]:
    """The folder's config.json, checked to describe a CLIP text encoder (class and model_type)."""
    raw = loader.read_folder_config(
        folder, (CLASS_NAME, CLASS_NAME_WITH_PROJECTION), "transformers CLIP text encoder"
    )
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise CheckpointError(
            f"{folder}/config.json has model_type {raw['model_type']!r}, not a CLIP text encoder ({MODEL_TYPE!r})"
        )
    return raw


def config_from_raw(raw: dict[str, Any], folder: str, **overrides: Any) -> CLIPTextConfig:
    return loader.build_config(CLIPTextConfig.from_transformers, raw, folder, **overrides)


def read_config(folder: str, **overrides: Any) -> CLIPTextConfig:
    return config_from_raw(read_raw_config(folder), folder, **overrides)


def abstract_clip_text(cfg: CLIPTextConfig) -> CLIPTextModel:
    """The model with shape-only parameters (no allocation)."""
    return loader.abstract_model(lambda rngs: CLIPTextModel(cfg, rngs=rngs))


def load_clip_text(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
) -> CLIPTextModel:
    """Loads a transformers CLIPTextModel / CLIPTextModelWithProjection folder (config.json +
    model.safetensors, or a sharded set with model.safetensors.index.json).

    Args:
      path: the model folder (e.g. a pipeline's `text_encoder/` or `text_encoder_2/`).
      dtype / param_dtype: compute and storage dtypes ("float32", "bfloat16"); param_dtype
        defaults to dtype.
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
    """
    folder = os.fspath(path)
    raw = read_raw_config(folder)  # before any weights file is opened
    tensors = index_checkpoint(folder, WEIGHTS_PREFIX)
    overrides: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype or dtype)
    if not raw.get("architectures"):  # the class is unstated: the projection head exists iff its weight does
        overrides["with_projection"] = PROJECTION_KEY in tensors
    cfg = config_from_raw(raw, folder, **overrides)
    prefix = checkpoint_prefix(tensors)
    return loader.load_module(abstract_clip_text(cfg), lambda st: key_map(cfg, st, prefix=prefix), folder,
                              prefix=WEIGHTS_PREFIX, mesh=mesh, rules=rules, progress=progress, tensors=tensors,
                              ignore=[prefix + name for name in IGNORED_BUFFERS])


def save_clip_text(
    model: CLIPTextModel, out_dir: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False
) -> str:
    """Writes `model` as a transformers folder (config.json + model.safetensors, published key
    layout) that `CLIPTextModelWithProjection.from_pretrained(out_dir)` (or `CLIPTextModel`, without
    the projection) loads. Refuses to overwrite unless asked."""
    return loader.save_module(model, lambda st: key_map(model.cfg, st), out_dir, weights_name=WEIGHTS_NAME,
                              config=model.cfg.to_transformers(), dtype=dtype, overwrite=overwrite)
