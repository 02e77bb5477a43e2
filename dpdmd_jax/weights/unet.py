"""diffusers `UNet2DConditionModel` folders (a pipeline's `unet/`) <-> our `UNet2DConditionModel`.

Our attribute names follow diffusers except for the flattenings in `_RENAMES`: one-element
`downsamplers` / `upsamplers` lists are single attributes, `to_out.0` is `to_out`, the GEGLU
feed-forward's `net.0.proj` / `net.2` are `proj_in` / `proj_out`, and flax's `kernel` is torch's
`weight`. With `scan_layers`, each Transformer2DModel's blocks are one `block_stack.layers` stack
whose leading axis runs over diffusers' `transformer_blocks.{k}`. A linear layer's LoRA adapter
(`models.lora`: `<layer>.lora.a` (in, r), `.lora.b` (r, out)) maps to peft's `<layer>.lora_A.weight`
(r, in) / `.lora_B.weight` (out, r), the names diffusers' LoRA files use.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.models.unet import UNet2DConditionModel, UNetConfig
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.pipeline import component_folder, resolve_pipeline

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_CLASS_NAMES = ("UNet2DConditionModel",)
_STACK = "block_stack"

# (our dotted path pattern, diffusers pattern), applied in order to our (unscanned) path.
_RENAMES = (
    (r"\.downsampler\.", ".downsamplers.0.conv."),
    (r"\.upsampler\.", ".upsamplers.0.conv."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
    (r"\.kernel$", ".weight"),
    (r"\.lora\.a$", ".lora_A.weight"),
    (r"\.lora\.b$", ".lora_B.weight"),
)


def diffusers_key(path: tuple[Any, ...]) -> str:
    """Our (unscanned) state path -> the diffusers state-dict key."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def key_map(cfg: UNetConfig, abstract_state: nnx.State) -> dict[tuple, loader.Source]:
    """For every leaf of the model state: its diffusers keys, checkpoint shape and layout change
    (conv kernels (kh, kw, I, O) <- (O, I, kh, kw); linear kernels (in, out) <- (out, in)); a
    scanned leaf (..., "block_stack", "layers", ...) stacks `transformer_blocks.0..n-1`."""
    del cfg  # the layout follows from the state alone; kept for the common key_map signature
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        stacked = _STACK in path
        if stacked:
            at = path.index(_STACK)
            rests = [(*path[:at], "transformer_blocks", k, *path[at + 2:]) for k in range(shape[0])]
            shape = shape[1:]
        else:
            rests = [path]
        if path[-1] == "kernel" and len(shape) == 4:
            transform, ckpt_shape = loader.conv_to_ours, (shape[3], shape[2], shape[0], shape[1])
        elif path[-1] == "kernel" or path[-2:] in (("lora", "a"), ("lora", "b")):  # LoRA: torch Linear weights
            transform, ckpt_shape = loader.linear_to_ours, shape[::-1]
        else:
            transform, ckpt_shape = loader.identity, shape
        sources[path] = loader.Source(
            keys=tuple(diffusers_key(p) for p in rests), shape=ckpt_shape, transform=transform, stacked=stacked
        )
    return sources


def resolve_folder(path: str | os.PathLike) -> str:
    """A local unet folder: `path` itself, its `unet/` subfolder (pipeline root), or a hub snapshot
    (only if `path` is not a local directory and the hub is reachable)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        path = resolve_pipeline(path, ["unet"])
    return component_folder(path, "unet")


def read_config(folder: str, **overrides: Any) -> UNetConfig:
    raw = loader.read_folder_config(folder, _CLASS_NAMES, "diffusers UNet2DConditionModel")
    return loader.build_config(UNetConfig.from_diffusers, raw, folder, **overrides)


def abstract_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    """The model with shape-only parameters (no allocation)."""
    return loader.abstract_model(lambda rngs: UNet2DConditionModel(cfg, rngs=rngs))


def load_unet(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
    **exec_overrides: Any,
) -> UNet2DConditionModel:
    """Loads a diffusers UNet2DConditionModel folder (config.json + one safetensors file, or an
    indexed sharded set) into our `UNet2DConditionModel`.

    Args:
      path: the `unet/` folder (or the pipeline root holding it).
      dtype / param_dtype: compute and storage dtypes ("float32", "bfloat16"); param_dtype
        defaults to dtype.
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
      exec_overrides: execution knobs of `UNetConfig` (scan_layers, remat_policy, attention_impl).
    """
    folder = resolve_folder(path)
    cfg = read_config(folder, dtype=dtype, param_dtype=param_dtype or dtype, **exec_overrides)
    return loader.load_module(abstract_unet(cfg), lambda st: key_map(cfg, st), folder,
                              prefix="diffusion_pytorch_model", mesh=mesh, rules=rules, progress=progress)


def save_unet(model: UNet2DConditionModel, out_dir: str | os.PathLike, *, dtype: str | None = None,
              overwrite: bool = False) -> str:
    """Writes `model` as a diffusers unet folder (config.json + one safetensors file; scanned stacks
    unstacked) that `UNet2DConditionModel.from_pretrained(out_dir)` loads. Refuses to overwrite
    unless asked."""
    return loader.save_module(model, lambda st: key_map(model.cfg, st), out_dir, weights_name=WEIGHTS_NAME,
                              config=model.cfg.to_diffusers(), dtype=dtype, overwrite=overwrite)
