"""Backbones: what `distill/` needs of a model family, and a registry keyed by `config.backbone`.

A backbone is one module with a class registered under a name:

    from dpdmd_jax import backbones

    @backbones.register("my_dit")
    class MyDiT:
        schedule = RectifiedFlow()        # or VPEpsilon()
        cond_type = backbones.SD3Cond     # any flax.struct pytree of [B, ...] arrays
        def __init__(self, config): ...
        def check_source(self) -> list[str]: ...        # cheap input checks, before loading
        def load(self, mesh, rules) -> nnx.Module: ...   # from model.source, onto the mesh
        def apply(self, model, z, level, cond): ...      # -> prediction (v or eps)
        def latent_shape(self) -> tuple[int, int, int]: ...
        def cond_spec(self, batch) -> cond_type of jax.ShapeDtypeStruct: ...
        def has_vae(self) -> bool: ...                   # samples decoded by load_vae / decode?
        def abstract_teacher(self) -> nnx.Module: ...     # optional: shapes only (`python -m dpdmd_jax.plan`)
        def features(self, model, z, level, cond): ...   # optional: [B, h, w, D] for the GAN's head (gan.weight > 0)

(the interface is `core.Backbone`) and `--config.backbone=my_package.my_module:my_dit` imports the
module and picks it (a built-in is named alone: `--config.backbone=mmdit`; the built-ins are listed
in `_BUILTIN`, not registered).
`docs/DESIGN.md` ("Adding a backbone") walks through one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from dpdmd_jax.core import Backbone, Cond, SD3Cond, SDXLCond  # noqa: F401  (the types a backbone names)


def uncond_zeros(backbone: Backbone, batch: int) -> Cond:
    """Zero conditioning (SDXL's `force_zeros_for_empty_prompt`, the toy's NULL class)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), backbone.cond_spec(batch))


_REGISTRY: dict[str, Callable[[ml_collections.ConfigDict], Backbone]] = {}
# Built-in backbones ("module:class"), imported on first use so that naming one never loads the
# others. They do not register themselves: a module that imported this registry back would close
# an import circle.
_BUILTIN = {
    "mmdit": "dpdmd_jax.backbones.sd3:SD3Backbone",
    "unet": "dpdmd_jax.backbones.sdxl:SDXLBackbone",
    "tiny_flow": "dpdmd_jax.backbones.tiny:TinyFlow",
    "tiny_vp": "dpdmd_jax.backbones.tiny:TinyVP",
}


def register(name: str):
    """Class decorator: makes `--config.backbone=name` build this backbone."""

    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backbone {name!r} is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = cls
        return cls

    return wrap


def names() -> tuple[str, ...]:
    return tuple(sorted(set(_REGISTRY) | set(_BUILTIN)))


def backbone_class(name: str):
    """The registered class; "package.module:name" imports that module first (a user's backbone)."""
    if ":" in name:
        module, name = name.split(":", 1)
        importlib.import_module(module)
    if name not in _REGISTRY and name in _BUILTIN:
        module, cls = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), cls)
    if name not in _REGISTRY:
        raise KeyError(f"backbone {name!r} is unknown; choose one of {names()} or register your own")
    return _REGISTRY[name]


def get(config: ml_collections.ConfigDict) -> Backbone:
    """The backbone `config.backbone` names, built from `config`."""
    return backbone_class(config.backbone)(config)
