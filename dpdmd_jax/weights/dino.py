"""transformers DINOv2 / DINOv3 ViT folders <-> our `Dinov2Model` / `DINOv3ViTModel` (load onto
shardings, export back).

Our attribute paths are the checkpoints' keys (see `dpdmd_jax.models.dino`); only the leaf names
differ (`kernel` is torch's `weight`), Linear kernels are transposed and the patch conv is kept in
flax's (kh, kw, in, out) layout. Layouts:
  * DINOv2 (facebook/dinov2-*, and what transformers 5 writes for Dinov2Model): `embeddings.*`,
    `encoder.layer.N.attention.attention.{query,key,value}`, `...attention.output.dense`,
    `mlp.fc1/fc2` (or SwiGLU `mlp.weights_in/weights_out`), `layer_scale{1,2}.lambda1`, `layernorm`;
  * DINOv3 ViT (facebook/dinov3-*, and what transformers 5 writes): `embeddings.*`, `layer.N.*`,
    `norm`; a file that already uses transformers' module path `model.layer.N` is read too.
`load_dino` picks the family from config.json's model_type.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.models.dino import (
    DINOV2_CLASS_NAME,
    DINOV2_MODEL_TYPE,
    DINOV3_CLASS_NAME,
    DINOV3_MODEL_TYPE,
    Dinov2Config,
    Dinov2Model,
    DINOv3ViTConfig,
    DINOv3ViTModel,
)
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.safetensors_io import CheckpointError, TensorInfo, index_checkpoint

WEIGHTS_PREFIX = "model"
WEIGHTS_NAME = f"{WEIGHTS_PREFIX}.safetensors"
DINOV3_LAYER_PREFIX = "model."  # transformers' module path for DINOv3's layers (`model.layer.N`)

_RENAMES = ((r"\.kernel$", ".weight"),)
_FAMILIES = {
    DINOV2_MODEL_TYPE: (DINOV2_CLASS_NAME, Dinov2Config, Dinov2Model, "transformers DINOv2 model"),
    DINOV3_MODEL_TYPE: (DINOV3_CLASS_NAME, DINOv3ViTConfig, DINOv3ViTModel, "transformers DINOv3 ViT model"),
}


def transformers_key(path: tuple[Any, ...], layer_prefix: str = "") -> str:
    """Our state path -> the transformers state-dict key (`layer_prefix` before DINOv3's `layer.N`)."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return layer_prefix + key if path[0] == "layer" else key


def key_map(cfg: Any, abstract_state: nnx.State, *, layer_prefix: str = "") -> dict[tuple, loader.Source]:
    """For every leaf of a DINOv2 / DINOv3 state: its transformers key, checkpoint shape and layout
    change. The table follows the state alone; `cfg` is taken for the common key-map signature."""
    del cfg
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        transform, ckpt_shape = loader.identity, shape
        if path[-1] == "kernel" and len(shape) == 2:
            transform, ckpt_shape = loader.linear_to_ours, shape[::-1]
        elif path[-1] == "kernel":  # the patch conv
            kh, kw, i, o = shape
            transform, ckpt_shape = loader.conv_to_ours, (o, i, kh, kw)
        sources[path] = loader.Source(keys=(transformers_key(path, layer_prefix),), shape=ckpt_shape,
                                      transform=transform)
    return sources


def read_raw_config(folder: str, model_type: str | None = None) -> dict[str, Any]:
    """The folder's config.json, checked to describe a DINOv2 / DINOv3 ViT model (`model_type`,
    or either when None)."""
    types = [model_type] if model_type else list(_FAMILIES)
    classes = [_FAMILIES[t][0] for t in types]
    what = " or ".join(_FAMILIES[t][3] for t in types)
    raw = loader.read_folder_config(folder, classes, what)
    declared = raw.get("model_type")
    if declared is None:  # old configs: the class says it
        archs = raw.get("architectures") or []
        declared = next((t for t in types if _FAMILIES[t][0] in archs), None)
    if declared not in types:
        raise CheckpointError(
            f"{folder}/config.json has model_type {raw.get('model_type')!r}, not a {what} "
            f"({' or '.join(repr(t) for t in types)})"
        )
    return {**raw, "model_type": declared}


def read_config(folder: str | os.PathLike, model_type: str | None = None, **overrides: Any):
    """The Dinov2Config / DINOv3ViTConfig of a folder, by its model_type."""
    folder = os.fspath(folder)
    raw = read_raw_config(folder, model_type)
    return loader.build_config(_FAMILIES[raw["model_type"]][1].from_transformers, raw, folder, **overrides)


def abstract_dino(cfg: Dinov2Config | DINOv3ViTConfig) -> Dinov2Model | DINOv3ViTModel:
    """The model with shape-only parameters (no allocation)."""
    model_cls = Dinov2Model if isinstance(cfg, Dinov2Config) else DINOv3ViTModel
    return loader.abstract_model(lambda rngs: model_cls(cfg, rngs=rngs))


def _layer_prefix(tensors: dict[str, TensorInfo]) -> str:
    return DINOV3_LAYER_PREFIX if any(k.startswith(DINOV3_LAYER_PREFIX + "layer.") for k in tensors) else ""


def load_dino(
    path: str | os.PathLike,
    *,
    model_type: str | None = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
) -> Dinov2Model | DINOv3ViTModel:
    """Loads a transformers Dinov2Model or DINOv3ViTModel folder (config.json + model.safetensors,
    or a sharded set), the class chosen by config.json's model_type (or required: `model_type`
    "dinov2" / "dinov3_vit").

    Args:
      dtype / param_dtype: compute and storage dtypes; param_dtype defaults to dtype.
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
    """
    folder = os.fspath(path)
    raw = read_raw_config(folder, model_type)  # before any weights file is opened
    cfg = loader.build_config(_FAMILIES[raw["model_type"]][1].from_transformers, raw, folder,
                              dtype=dtype, param_dtype=param_dtype or dtype)
    tensors = index_checkpoint(folder, WEIGHTS_PREFIX)
    layer_prefix = _layer_prefix(tensors) if isinstance(cfg, DINOv3ViTConfig) else ""
    return loader.load_module(abstract_dino(cfg), lambda st: key_map(cfg, st, layer_prefix=layer_prefix), folder,
                              prefix=WEIGHTS_PREFIX, mesh=mesh, rules=rules, progress=progress, tensors=tensors)


def load_dinov2(path: str | os.PathLike, **kwargs: Any) -> Dinov2Model:
    """`load_dino` of a Dinov2Model folder (anything else is refused)."""
    return load_dino(path, model_type=DINOV2_MODEL_TYPE, **kwargs)


def load_dinov3(path: str | os.PathLike, **kwargs: Any) -> DINOv3ViTModel:
    """`load_dino` of a DINOv3ViTModel folder (anything else is refused)."""
    return load_dino(path, model_type=DINOV3_MODEL_TYPE, **kwargs)


def save_dino(
    model: Dinov2Model | DINOv3ViTModel, out_dir: str | os.PathLike, *, dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Writes `model` as a transformers folder (config.json + model.safetensors, the published key
    layout) that `Dinov2Model` / `DINOv3ViTModel.from_pretrained(out_dir)` loads. Refuses to
    overwrite unless asked."""
    return loader.save_module(model, lambda st: key_map(model.cfg, st), out_dir, weights_name=WEIGHTS_NAME,
                              config=model.cfg.to_transformers(), dtype=dtype, overwrite=overwrite)
