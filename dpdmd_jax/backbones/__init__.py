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

and `--config.backbone=my_package.my_module:my_dit` imports the module and picks it (a built-in
is named alone: `--config.backbone=mmdit`).
`docs/DESIGN.md` ("Adding a backbone") walks through one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dpdmd_jax.diffusion.schedules import Schedule


@flax.struct.dataclass
class SD3Cond:
    """SD3 / SD3.5 conditioning: context [B, L, 4096] (CLIP-L|G ++ T5), pooled [B, 2048]."""

    context: jax.Array
    pooled: jax.Array


@flax.struct.dataclass
class SDXLCond:
    """SDXL conditioning: context [B, 77, 2048], text_embeds [B, 1280] (pooled), time_ids [B, 6]."""

    context: jax.Array
    text_embeds: jax.Array
    time_ids: jax.Array


class Backbone(Protocol):
    schedule: Schedule
    cond_type: type

    def check_source(self) -> list[str]:
        """Cheap checks of `config.model.source` (paths exist, ...), one sentence per problem."""

    def load(self, mesh: jax.sharding.Mesh, rules) -> nnx.Module:
        """The frozen teacher from `config.model.source`, each parameter on the sharding its logical
        axes get under `rules` (`parallel.mesh.state_shardings`)."""

    def apply(self, model: nnx.Module, z: jax.Array, level: jax.Array, cond: Any) -> jax.Array:
        """The prediction (v or eps, per `schedule.prediction`) at `level` ([B] schedule levels)."""

    def latent_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one latent."""

    def cond_spec(self, batch: int) -> Any:
        """`cond_type` of ShapeDtypeStructs for `batch` samples."""


def uncond_zeros(backbone: Backbone, batch: int) -> Any:
    """Zero conditioning (SDXL's `force_zeros_for_empty_prompt`, the toy's NULL class)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), backbone.cond_spec(batch))


_REGISTRY: dict[str, Callable[[ml_collections.ConfigDict], Backbone]] = {}
# Built-in backbones, imported on first use so that naming one never loads the others.
_BUILTIN = {
    "mmdit": "dpdmd_jax.backbones.sd3",
    "unet": "dpdmd_jax.backbones.sdxl",
    "tiny_flow": "dpdmd_jax.backbones.tiny",
    "tiny_vp": "dpdmd_jax.backbones.tiny",
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
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise KeyError(f"backbone {name!r} is unknown; choose one of {names()} or register your own")
    return _REGISTRY[name]


def get(config: ml_collections.ConfigDict) -> Backbone:
    """The backbone `config.backbone` names, built from `config`."""
    return backbone_class(config.backbone)(config)
