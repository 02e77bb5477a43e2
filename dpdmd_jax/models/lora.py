"""Low-rank adapters (LoRA, Hu et al. 2021) on the models' linear layers, as peft computes them:

    y = W x + b + (alpha / r) B (A x),    A: (in, r), B: (r, out), B = 0 at the start,

so a model with fresh adapters computes exactly what the model without them does (the branch adds
0.0). Every linear layer of our models is a `Dense`; `add_adapters` gives the chosen ones a `LoRA`
after the model is built, on scanned (layer-stacked) blocks too, where A and B carry the same
leading "layers" axis as the kernel. The adapters are `nnx.LoRAParam`s, so
`nnx.split(model, nnx.LoRAParam, nnx.Param, ...)` separates them from the base weights, whose paths
and shapes are those of the model without adapters: one base serves a teacher and its adapted
copies. Nothing merges B A into W.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

Path = tuple


class LoRA(nnx.Module):
    """The low-rank branch (alpha / r) B A x of one linear layer; A and B in float32."""

    def __init__(self, a: nnx.LoRAParam, b: nnx.LoRAParam, scale: float):
        self.a, self.b, self.scale = a, b, scale

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        return (x @ a) @ b * jnp.asarray(self.scale, x.dtype)


class Dense(nnx.Linear):
    """`nnx.Linear`, plus a `LoRA` branch once `add_adapters` gives it one."""

    lora: LoRA | None = None  # class default: the attribute (and the graph node) exists only with adapters

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y if self.lora is None else y + self.lora(x).astype(y.dtype)


def dense_layers(model: nnx.Module) -> dict[Path, Dense]:
    """Every linear layer of `model` by its path (the path of its kernel, less "kernel")."""
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, Dense)}


def add_adapters(model: nnx.Module, paths: Iterable[Path], rank: int, alpha: float) -> None:
    """Gives the `Dense` layers at `paths` adapters of rank `rank` (A and B zero: `init_adapters`
    draws A). Their logical axes follow the kernel's: A (in-axis, None), B (None, out-axis), after
    the kernel's leading stacked axes."""
    layers = dense_layers(model)
    for path in paths:
        layer = layers[tuple(path)]
        kernel = layer.kernel
        *lead, n_in, n_out = kernel.shape
        names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        *lead_names, in_name, out_name = names
        layer.lora = LoRA(
            nnx.LoRAParam(jnp.zeros((*lead, n_in, rank), jnp.float32), out_sharding=(*lead_names, in_name, None),
                          eager_sharding=False),
            nnx.LoRAParam(jnp.zeros((*lead, rank, n_out), jnp.float32), out_sharding=(*lead_names, None, out_name),
                          eager_sharding=False),
            scale=float(alpha) / rank,
        )


def init_adapters(adapters: nnx.State, key: jax.Array) -> nnx.State:
    """Initial values for an adapter state (abstract or not): A uniform in +-1/sqrt(in) (peft's
    kaiming_uniform(a=sqrt(5))), B zero, so the adapted model starts equal to its base."""
    flat = nnx.to_flat_state(adapters)
    keys = jax.random.split(key, max(len(flat), 1))
    out = []
    for k, (path, var) in zip(keys, flat):
        shape = var.get_value().shape
        if path[-1] == "a":
            bound = 1.0 / math.sqrt(shape[-2])
            value = jax.random.uniform(k, shape, jnp.float32, -bound, bound)
        else:
            value = jnp.zeros(shape, jnp.float32)
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def split_adapted(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """(graphdef, adapters, base params, buffers) of a model with adapters."""
    return nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
