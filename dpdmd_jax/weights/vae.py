"""diffusers `AutoencoderKL` folders (a pipeline's `vae/`) <-> our `AutoencoderKL`.

Our attribute names follow diffusers except for the flattenings in `_RENAMES`: one-element
`downsamplers` / `upsamplers` / `attentions` lists are single attributes, `to_out.0` is `to_out`,
and flax's `kernel` is torch's `weight`. Folders written before diffusers renamed the mid-block
attention (query / key / value / proj_attn, same Linear shapes) load too: diffusers renames them
on load (`ModelMixin._fix_state_dict_keys_on_load`), and so do we; export writes the current names.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.models.vae import AutoencoderKL, VAEConfig
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.pipeline import component_folder
from dpdmd_jax.weights.safetensors_io import index_checkpoint

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_CLASS_NAMES = ("AutoencoderKL",)

# (our dotted path pattern, diffusers pattern), applied in order to our path.
_RENAMES = (
    (r"\.downsampler\.", ".downsamplers.0.conv."),
    (r"\.upsampler\.", ".upsamplers.0.conv."),
    (r"\.mid_block\.attention\.", ".mid_block.attentions.0."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.kernel$", ".weight"),
)
# Current diffusers attention names -> the pre-0.14 ones still found in old vae/ folders.
_LEGACY_ATTENTION = (
    (r"\.to_q\.", ".query."),
    (r"\.to_k\.", ".key."),
    (r"\.to_v\.", ".value."),
    (r"\.to_out\.0\.", ".proj_attn."),
)


def diffusers_key(path: tuple[Any, ...], legacy_attention: bool = False) -> str:
    """Our state path -> the diffusers state-dict key (legacy attention names if asked)."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in _RENAMES + (_LEGACY_ATTENTION if legacy_attention else ()):
        key = re.sub(pattern, repl, key)
    return key


def key_map(cfg: VAEConfig, abstract_state: nnx.State, *, legacy_attention: bool = False) -> dict[tuple, loader.Source]:
    """For every leaf of the model state: its diffusers key, checkpoint shape and layout change
    (conv kernels (kh, kw, I, O) <- (O, I, kh, kw); linear kernels (in, out) <- (out, in))."""
    del cfg  # the layout follows from the state alone; kept for the common key_map signature
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        if path[-1] == "kernel" and len(shape) == 4:
            transform, ckpt_shape = loader.conv_to_ours, (shape[3], shape[2], shape[0], shape[1])
        elif path[-1] == "kernel":
            transform, ckpt_shape = loader.linear_to_ours, shape[::-1]
        else:
            transform, ckpt_shape = loader.identity, shape
        sources[path] = loader.Source(
            keys=(diffusers_key(path, legacy_attention),), shape=ckpt_shape, transform=transform
        )
    return sources


def read_config(folder: str, **overrides: Any) -> VAEConfig:
    raw = loader.read_folder_config(folder, _CLASS_NAMES, "diffusers AutoencoderKL")
    return loader.build_config(VAEConfig.from_diffusers, raw, folder, **overrides)


def abstract_vae(cfg: VAEConfig) -> AutoencoderKL:
    """The model with shape-only parameters (no allocation)."""
    return loader.abstract_model(lambda rngs: AutoencoderKL(cfg, rngs=rngs))


def _uses_legacy_attention(keys) -> bool:
    """Whether the checkpoint names the mid-block attention query/key/value/proj_attn."""
    return any(re.search(r"\.attentions\.0\.query\.weight$", k) for k in keys)


def load_vae(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
) -> AutoencoderKL:
    """Loads a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).

    Args:
      path: the `vae/` folder (or the pipeline root holding it).
      dtype / param_dtype: compute and storage dtypes; param_dtype defaults to dtype. Keep
        float32 for decoding unless bfloat16's ~1e-2 error is acceptable (fp16 is not offered:
        the SDXL VAE overflows it).
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
    """
    folder = component_folder(path, "vae")
    cfg = read_config(folder, dtype=dtype, param_dtype=param_dtype or dtype)
    tensors = index_checkpoint(folder, "diffusion_pytorch_model")  # headers only
    legacy = _uses_legacy_attention(tensors)
    return loader.load_module(
        abstract_vae(cfg), lambda st: key_map(cfg, st, legacy_attention=legacy), folder,
        prefix="diffusion_pytorch_model", mesh=mesh, rules=rules, progress=progress, tensors=tensors,
    )


def save_vae(model: AutoencoderKL, out_dir: str | os.PathLike, *, dtype: str | None = None,
             overwrite: bool = False) -> str:
    """Writes `model` as a diffusers vae folder (config.json + one safetensors file, current key
    names) that `AutoencoderKL.from_pretrained(out_dir)` loads. Refuses to overwrite unless asked."""
    return loader.save_module(model, lambda st: key_map(model.cfg, st), out_dir, weights_name=WEIGHTS_NAME,
                              config=model.cfg.to_diffusers(), dtype=dtype, overwrite=overwrite)
