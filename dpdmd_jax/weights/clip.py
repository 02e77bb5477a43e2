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

A full `CLIPModel` folder (openai/clip-vit-large-patch14 as published: one config.json nesting
`text_config` and `vision_config`, one weights file with `text_model.`, `vision_model.`,
`text_projection.weight`, `visual_projection.weight` and `logit_scale`) gives either tower:
`load_clip_text` / `load_clip_vision` read their half and its projection (CLIPModel's top-level
`projection_dim`), and skip the other tower's tensors and `logit_scale`.

The vision tower's layouts are the text tower's with `vision_model.` / `visual_projection.weight`:
CLIPVisionModelWithProjection and published CLIPVisionModel checkpoints use the prefix, a
CLIPVisionModel saved by transformers >= 5 does not.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.models.clip import (
    CLASS_NAME,
    CLASS_NAME_WITH_PROJECTION,
    MODEL_TYPE,
    VISION_CLASS_NAME,
    VISION_CLASS_NAME_WITH_PROJECTION,
    VISION_MODEL_TYPE,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.safetensors_io import CheckpointError, TensorInfo, index_checkpoint

WEIGHTS_PREFIX = "model"
WEIGHTS_NAME = f"{WEIGHTS_PREFIX}.safetensors"
TEXT_MODEL_PREFIX = "text_model."
PROJECTION_KEY = "text_projection.weight"
# Buffers some checkpoints store (under the transformer prefix) that are not parameters of the model.
IGNORED_BUFFERS = ("embeddings.position_ids",)
VISION_MODEL_PREFIX = "vision_model."
VISUAL_PROJECTION_KEY = "visual_projection.weight"
FULL_CLASS_NAME = "CLIPModel"
FULL_MODEL_TYPE = "clip"
# Tensors of a full CLIPModel that belong to neither tower's loader: the contrastive temperature.
FULL_MODEL_EXTRAS = ("logit_scale",)

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


def is_full_clip(raw: dict[str, Any]) -> bool:
    """Whether a config.json describes a whole CLIPModel (both towers)."""
    return raw.get("model_type") == FULL_MODEL_TYPE or FULL_CLASS_NAME in (raw.get("architectures") or [])


def tower_config(raw: dict[str, Any], folder: str, tower: str) -> dict[str, Any]:
    """A full CLIPModel config's `text_config` / `vision_config` (`tower`) as a standalone tower
    config with its projection: CLIPModel's projections are sized by its top-level projection_dim
    (transformers' default 512), whatever the nested config says.

    Old configs (openai/clip-vit-large-patch14's) also carry `text_config_dict` /
    `vision_config_dict`; transformers then builds the tower from that dict and its defaults,
    overriding every field of the nested config (the published text_config's legacy bos / eos /
    pad ids 0 / 2 / 1 become the defaults 49406 / 49407 / 1), and so do we."""
    sub = raw.get(f"{tower}_dict")
    sub = raw.get(tower) if sub is None else sub
    if sub is not None and not isinstance(sub, dict):
        raise CheckpointError(f"{folder}/config.json: {tower} is not an object")
    sub = {k: v for k, v in (sub or {}).items() if k != "architectures"}
    sub["projection_dim"] = raw.get("projection_dim", 512)
    sub["architectures"] = [CLASS_NAME_WITH_PROJECTION if tower == "text_config" else VISION_CLASS_NAME_WITH_PROJECTION]
    return sub


def _other_tower_keys(tensors: dict[str, TensorInfo], prefix: str, projection_key: str) -> list[str]:
    """A full CLIPModel's tensors that the other tower's loader reads (and logit_scale)."""
    return [k for k in tensors if k.startswith(prefix) or k == projection_key or k in FULL_MODEL_EXTRAS]


def read_raw_text_config(folder: str) -> tuple[dict[str, Any], bool]:
    """The folder's config.json checked to describe a CLIP text encoder (class and model_type),
    and whether it is a full CLIPModel (then its text_config, as a CLIPTextModelWithProjection config)."""
    raw = loader.read_folder_config(
        folder, (CLASS_NAME, CLASS_NAME_WITH_PROJECTION, FULL_CLASS_NAME), "transformers CLIP text encoder"
    )
    if is_full_clip(raw):
        return tower_config(raw, folder, "text_config"), True
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise CheckpointError(
            f"{folder}/config.json has model_type {raw['model_type']!r}, not a CLIP text encoder ({MODEL_TYPE!r})"
        )
    return raw, False


def read_raw_config(folder: str) -> dict[str, Any]:
    """The text encoder's config.json as a dict (see `read_raw_text_config`)."""
    return read_raw_text_config(folder)[0]


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
    model.safetensors, or a sharded set with model.safetensors.index.json), or the text tower and
    text_projection of a full CLIPModel folder (e.g. openai/clip-vit-large-patch14, for the CLIP score).

    Args:
      path: the model folder (e.g. a pipeline's `text_encoder/` or `text_encoder_2/`, or a CLIPModel).
      dtype / param_dtype: compute and storage dtypes ("float32", "bfloat16"); param_dtype
        defaults to dtype.
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
    """
    folder = os.fspath(path)
    raw, full = read_raw_text_config(folder)  # before any weights file is opened
    tensors = index_checkpoint(folder, WEIGHTS_PREFIX)
    overrides: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype or dtype)
    if not raw.get("architectures"):  # the class is unstated: the projection head exists iff its weight does
        overrides["with_projection"] = PROJECTION_KEY in tensors
    cfg = config_from_raw(raw, folder, **overrides)
    prefix = TEXT_MODEL_PREFIX if full else checkpoint_prefix(tensors)
    ignore = [prefix + name for name in IGNORED_BUFFERS]
    if full:
        ignore += _other_tower_keys(tensors, VISION_MODEL_PREFIX, VISUAL_PROJECTION_KEY)
    return loader.load_module(abstract_clip_text(cfg), lambda st: key_map(cfg, st, prefix=prefix), folder,
                              prefix=WEIGHTS_PREFIX, mesh=mesh, rules=rules, progress=progress, tensors=tensors,
                              ignore=ignore)


def save_clip_text(
    model: CLIPTextModel, out_dir: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False
) -> str:
    """Writes `model` as a transformers folder (config.json + model.safetensors, published key
    layout) that `CLIPTextModelWithProjection.from_pretrained(out_dir)` (or `CLIPTextModel`, without
    the projection) loads. Refuses to overwrite unless asked."""
    return loader.save_module(model, lambda st: key_map(model.cfg, st), out_dir, weights_name=WEIGHTS_NAME,
                              config=model.cfg.to_transformers(), dtype=dtype, overwrite=overwrite)


# ---------------------------------------------------------------------------- vision tower


def vision_key(path: tuple[Any, ...], prefix: str = VISION_MODEL_PREFIX) -> str:
    """Our vision state path -> the transformers state-dict key (the tower under `prefix`)."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key if path[0] == "visual_projection" else prefix + key


def vision_key_map(
    cfg: CLIPVisionConfig, abstract_state: nnx.State, *, prefix: str = VISION_MODEL_PREFIX
) -> dict[tuple, loader.Source]:
    """For every leaf of the vision model state: its transformers key, checkpoint shape and layout
    change (Linear kernels transposed, the patch conv (kh, kw, in, out) <-> (out, in, kh, kw)).
    `cfg` is taken for the common key-map signature."""
    del cfg
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        transform, ckpt_shape = loader.identity, shape
        if path[-1] == "kernel" and len(shape) == 2:
            transform, ckpt_shape = loader.linear_to_ours, shape[::-1]
        elif path[-1] == "kernel":
            kh, kw, i, o = shape
            transform, ckpt_shape = loader.conv_to_ours, (o, i, kh, kw)
        sources[path] = loader.Source(keys=(vision_key(path, prefix),), shape=ckpt_shape, transform=transform)
    return sources


_VISION_CLASSES = (VISION_CLASS_NAME, VISION_CLASS_NAME_WITH_PROJECTION, FULL_CLASS_NAME)
_VISION_WHAT = "transformers CLIP vision tower"


def read_raw_vision_config(folder: str) -> tuple[dict[str, Any], bool]:
    """The folder's config.json checked to describe a CLIP vision tower, and whether it is a full
    CLIPModel (then its vision_config, as a CLIPVisionModelWithProjection config)."""
    raw = loader.read_folder_config(folder, _VISION_CLASSES, _VISION_WHAT)
    if is_full_clip(raw):
        return tower_config(raw, folder, "vision_config"), True
    if raw.get("model_type", VISION_MODEL_TYPE) != VISION_MODEL_TYPE:
        raise CheckpointError(
            f"{folder}/config.json has model_type {raw['model_type']!r}, not a CLIP vision tower "
            f"({VISION_MODEL_TYPE!r} or a full {FULL_MODEL_TYPE!r} model)"
        )
    return raw, False


def read_vision_config(folder: str | os.PathLike, **overrides: Any) -> CLIPVisionConfig:
    """The CLIPVisionConfig of a CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel folder
    (with_projection from `architectures`; a CLIPModel always has its visual_projection)."""
    folder = os.fspath(folder)
    raw, _ = read_raw_vision_config(folder)
    return loader.build_config(CLIPVisionConfig.from_transformers, raw, folder, **overrides)


def abstract_clip_vision(cfg: CLIPVisionConfig) -> CLIPVisionModel:
    """The vision model with shape-only parameters (no allocation)."""
    return loader.abstract_model(lambda rngs: CLIPVisionModel(cfg, rngs=rngs))


def load_clip_vision(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
) -> CLIPVisionModel:
    """Loads the CLIP vision tower from a transformers CLIPVisionModel /
    CLIPVisionModelWithProjection folder, or the vision tower and visual_projection of a full
    CLIPModel folder (e.g. openai/clip-vit-large-patch14; its text half and logit_scale are skipped).

    Args:
      path: the model folder (config.json + model.safetensors, or a sharded set).
      dtype / param_dtype: compute and storage dtypes; param_dtype defaults to dtype.
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
    """
    folder = os.fspath(path)
    raw, full = read_raw_vision_config(folder)  # before any weights file is opened
    tensors = index_checkpoint(folder, WEIGHTS_PREFIX)
    overrides: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype or dtype)
    if not raw.get("architectures"):  # the class is unstated: the projection head exists iff its weight does
        overrides["with_projection"] = VISUAL_PROJECTION_KEY in tensors
    cfg = loader.build_config(CLIPVisionConfig.from_transformers, raw, folder, **overrides)
    if full:
        prefix = VISION_MODEL_PREFIX
        ignore = _other_tower_keys(tensors, TEXT_MODEL_PREFIX, PROJECTION_KEY)
    else:
        prefix = VISION_MODEL_PREFIX if any(k.startswith(VISION_MODEL_PREFIX) for k in tensors) else ""
        ignore = []
    ignore += [prefix + name for name in IGNORED_BUFFERS]
    return loader.load_module(abstract_clip_vision(cfg), lambda st: vision_key_map(cfg, st, prefix=prefix), folder,
                              prefix=WEIGHTS_PREFIX, mesh=mesh, rules=rules, progress=progress, tensors=tensors,
                              ignore=ignore)


def save_clip_vision(
    model: CLIPVisionModel, out_dir: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False
) -> str:
    """Writes `model` as a transformers folder (config.json + model.safetensors, the published
    `vision_model.`-prefixed layout) that `CLIPVisionModelWithProjection.from_pretrained(out_dir)`
    (or `CLIPVisionModel`, without the projection) loads. Refuses to overwrite unless asked."""
    return loader.save_module(model, lambda st: vision_key_map(model.cfg, st), out_dir, weights_name=WEIGHTS_NAME,
                              config=model.cfg.to_transformers(), dtype=dtype, overwrite=overwrite)
