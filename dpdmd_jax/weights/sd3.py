"""diffusers `SD3Transformer2DModel` folders <-> our `MMDiT` (load onto shardings, export back).

Our attribute names follow diffusers except for a few flattenings, listed in `_RENAMES`:
the time/text embedders sit at the top level, `to_out.0` is `to_out`, the feed-forward's
`net.0.proj` / `net.2` are `proj_in` / `proj_out`, and the patch conv is kept as a kernel. A linear
layer's LoRA adapter (`models.lora`: `<layer>.lora.a` (in, r), `.lora.b` (r, out)) maps to peft's
`<layer>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), the names diffusers' LoRA files use.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.models.mmdit import MMDiT, MMDiTConfig
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.pipeline import component_folder, resolve_pipeline
from dpdmd_jax.weights.safetensors_io import CheckpointError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# (our dotted path pattern, diffusers pattern), applied in order to our path.
_RENAMES = (
    (r"^(timestep_embedder|text_embedder)\.", r"time_text_embed.\1."),
    (r"\.to_out\.", r".to_out.0."),
    (r"\.(ff|ff_context)\.proj_in\.", r".\1.net.0.proj."),
    (r"\.(ff|ff_context)\.proj_out\.", r".\1.net.2."),
    (r"^pos_embed\.proj_kernel$", "pos_embed.proj.weight"),
    (r"^pos_embed\.proj_bias$", "pos_embed.proj.bias"),
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


def _transform(path: tuple[Any, ...], ndim: int):
    if path[-1] == "proj_kernel":
        return loader.conv_to_ours
    if (path[-1] == "kernel" or path[-2:] in (("lora", "a"), ("lora", "b"))) and ndim == 2:
        return loader.linear_to_ours  # LoRA's A and B are torch Linear weights too (peft's lora_A / lora_B)
    return loader.identity


def _checkpoint_shape(shape: tuple[int, ...], transform) -> tuple[int, ...]:
    if transform is loader.linear_to_ours:
        return shape[::-1]
    if transform is loader.conv_to_ours:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    return shape


def key_map(cfg: MMDiTConfig, abstract_state: nnx.State) -> dict[tuple, loader.Source]:
    """For every leaf of the model state: its diffusers keys, checkpoint shape and layout change."""
    groups = cfg.layer_groups()
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        if path[0] == "block_stacks":  # ("block_stacks", g, "layers", ...) -> layers start..stop
            start, stop = groups[path[1]]
            rests = [("transformer_blocks", i, *path[3:]) for i in range(start, stop)]
            shape = shape[1:]
        else:
            rests = [path]
        transform = _transform(path, len(shape))
        sources[path] = loader.Source(
            keys=tuple(diffusers_key(p) for p in rests),
            shape=_checkpoint_shape(shape, transform),
            transform=transform,
            stacked=path[0] == "block_stacks",
        )
    return sources


def resolve_folder(path: str | os.PathLike) -> str:
    """A local transformer folder: `path` itself, its `transformer/` subfolder (pipeline root), or a
    hub snapshot (only if `path` is not a local directory and the hub is reachable)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        path = resolve_pipeline(path, ["transformer"])
    path = component_folder(path, "transformer")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json; expected a diffusers SD3Transformer2DModel folder")
    return path


def read_config(folder: str, **overrides: Any) -> MMDiTConfig:
    raw = loader.read_folder_config(folder, ("SD3Transformer2DModel",), "diffusers SD3Transformer2DModel")
    return loader.build_config(MMDiTConfig.from_diffusers, raw, folder, **overrides)


def abstract_mmdit(cfg: MMDiTConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the model (no allocation)."""
    model = loader.abstract_model(lambda rngs: MMDiT(cfg, rngs=rngs))
    return nnx.split(model)


def load_mmdit(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    expected: MMDiTConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> MMDiT:
    """Loads a diffusers SD3/SD3.5 transformer folder into an `MMDiT`.

    Args:
      path: the `transformer/` folder (or the pipeline root holding it).
      dtype / param_dtype: compute and storage dtypes ("float32", "bfloat16"); param_dtype
        defaults to dtype.
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
      expected: if given, the checkpoint's architecture must equal this one.
      overrides: execution knobs of `MMDiTConfig` (scan_layers, remat_policy, attention_impl).
    """
    folder = resolve_folder(path)
    cfg = read_config(folder, dtype=dtype, param_dtype=param_dtype or dtype, **overrides)
    if expected is not None:
        diff = {
            k: (v, cfg.to_diffusers()[k]) for k, v in expected.to_diffusers().items() if cfg.to_diffusers()[k] != v
        }
        if diff:
            raise CheckpointError(
                f"{folder}/config.json does not match the requested architecture: "
                + ", ".join(f"{k}: expected {a}, checkpoint has {b}" for k, (a, b) in diff.items())
            )
    abstract = loader.abstract_model(lambda rngs: MMDiT(cfg, rngs=rngs))
    return loader.load_module(abstract, lambda st: key_map(cfg, st), folder, prefix="diffusion_pytorch_model",
                              mesh=mesh, rules=rules, progress=progress)


def save_mmdit(model: MMDiT, out_dir: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False) -> str:
    """Writes `model` as a diffusers transformer folder (config.json + one safetensors file) that
    `SD3Transformer2DModel.from_pretrained(out_dir)` loads. Refuses to overwrite unless asked."""
    return loader.save_module(model, lambda st: key_map(model.cfg, st), out_dir, weights_name=WEIGHTS_NAME,
                              config=model.cfg.to_diffusers(), dtype=dtype, overwrite=overwrite)
