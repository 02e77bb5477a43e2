"""Device mesh construction and logical-axis -> mesh-axis rules (the one place that knows both).

Mesh axes are ("data", "fsdp", "tensor"). Parameters carry logical names ("embed", "heads",
"mlp", "layers", ...); `DEFAULT_RULES` maps them: large matrices are split over "fsdp" on their
model dimension and over "tensor" on heads / MLP width. The batch is split over ("data", "fsdp").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpdmd_jax.core import RoundBatch
from dpdmd_jax.models.layers import split_rows

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or None = replicated). First match wins, as in MaxText/flax.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("vocab", "tensor"),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {len(devices)} available devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices but {len(devices)} are "
            "available; set the sizes so their product is the device count (one may be -1)"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _mesh_axes_for(logical: str | None, rules) -> tuple[str, ...]:
    if logical is None:
        return ()
    for name, target in rules:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    return ()


def spec_for(
    shape: Sequence[int], logical_axes: Sequence[str | None] | None, mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """PartitionSpec of one array: each logical axis mapped by `rules`, dropped (replicated) where
    the dimension is not divisible by the mesh axis size or the mesh axis is already used."""
    if not logical_axes:
        return PartitionSpec()
    used: set[str] = set()
    out = []
    for dim, logical in zip(shape, logical_axes):
        axes = tuple(a for a in _mesh_axes_for(logical, rules) if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            if axes:
                _log_replicated(tuple(shape), tuple(logical_axes), logical, dim, axes, size)
            out.append(None)
    return PartitionSpec(*out)


_REPLICATED_LOGGED: set[tuple] = set()


def _log_replicated(shape, logical_axes, logical, dim, axes, size) -> None:
    """One log line per distinct case of a dimension that its rule would shard but cannot."""
    key = (shape, logical_axes, logical)
    if key not in _REPLICATED_LOGGED:
        _REPLICATED_LOGGED.add(key)
        logging.warning("sharding: dimension %s=%d of a %s parameter %s is not divisible by mesh axes %s (size %d); "
                        "it is replicated", logical, dim, shape, logical_axes, axes, size)


def _logical_axes(var: Any) -> tuple | None:
    if isinstance(var, nnx.Variable):
        return var.get_metadata().get("out_sharding")
    return None


def state_shardings(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf of an NNX state (abstract or concrete), from its logical axes."""

    def one(var):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        spec = spec_for(value.shape, _logical_axes(var), mesh, rules)
        sharding = NamedSharding(mesh, spec)
        return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def rows_split(mesh: Mesh, fn: Callable) -> Callable:
    """`fn`, traced with the models' activations split over the batch axes of `mesh`
    (`models.layers.split_rows`): each device computes only its rows of the batch."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with split_rows(mesh, BATCH_AXES):
            return fn(*args, **kwargs)

    return traced


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def process_batch_rows(mesh: Mesh, batch: int) -> slice:
    """The rows of a global batch (split over BATCH_AXES) that this process's devices hold.

    Each process builds only these rows of its input; with devices ordered by process (as
    `jax.devices()` and `make_mesh` order them) they are one contiguous block."""
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((batch,))
    held = sorted({(sl.start or 0, batch if sl.stop is None else sl.stop) for (sl,) in index.values()})
    lo, hi = held[0][0], held[-1][1]
    if sum(b - a for a, b in held) != hi - lo:
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {held}; order the mesh's "
                         "devices by process (the default) so that each host feeds one block")
    return slice(lo, hi)


def round_shardings(mesh: Mesh, batch: RoundBatch) -> RoundBatch:
    """A round's batch: conditionings [M + 1, B, ...] (and the GAN's real latents, aligned with them)
    split over the batch axes on B, the unconditional conditioning [B, ...] and the regression's
    cached pairs [B, ...] on their first axis."""
    on_b = lambda x: NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 2))))
    first = lambda x: batch_sharding(mesh, x.ndim)
    return RoundBatch(cond=jax.tree.map(on_b, batch.cond), uncond=jax.tree.map(first, batch.uncond),
                      real=jax.tree.map(on_b, batch.real), pairs=jax.tree.map(first, batch.pairs))


def put_round(mesh: Mesh, batch_size: int, local: RoundBatch) -> RoundBatch:
    """This process's rows of a round (host arrays) -> global arrays: each process supplies only the
    rows its devices hold, so no host ever builds the whole batch."""

    def put(x, sharding, axis):
        shape = list(x.shape)
        shape[axis] = batch_size
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), tuple(shape))

    sh = round_shardings(mesh, local)
    return RoundBatch(cond=jax.tree.map(lambda x, s: put(x, s, 1), local.cond, sh.cond),
                      uncond=jax.tree.map(lambda x, s: put(x, s, 0), local.uncond, sh.uncond),
                      real=jax.tree.map(lambda x, s: put(x, s, 1), local.real, sh.real),
                      pairs=jax.tree.map(lambda x, s: put(x, s, 0), local.pairs, sh.pairs))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """Global batches are split over this many devices (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """A host array that every process holds whole -> a global array sharded on its leading axis
    (which must divide by `batch_divisor`); each device takes its rows."""
    sharding = batch_sharding(mesh, np.ndim(x))
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])


def check_batch_divisible(batch: int, mesh: Mesh, what: str = "batch") -> None:
    n = batch_divisor(mesh)
    if batch % n:
        raise ValueError(
            f"{what}={batch} is not divisible by the data x fsdp mesh size {n} "
            f"(mesh {dict(mesh.shape)}); choose a multiple of {n}"
        )


def sharding_report(state: Any) -> dict[str, int]:
    """Bytes of a placed state that are sharded vs replicated (per device and in total)."""
    total = replicated_bytes = per_device = 0
    for x in jax.tree.leaves(state):
        if not isinstance(x, jax.Array):
            continue
        nbytes = x.size * x.dtype.itemsize
        total += nbytes
        shard = x.sharding.shard_shape(x.shape)
        shard_bytes = math.prod(shard) * x.dtype.itemsize
        per_device += shard_bytes
        if shard_bytes == nbytes and len(x.sharding.device_set) > 1:
            replicated_bytes += nbytes
    return {"total_bytes": total, "replicated_bytes": replicated_bytes, "per_device_bytes": per_device}


def sharding_plan(abstract_state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, int]:
    """`sharding_report` of a shape-only state (`weights.loader.abstract_model`) as `state_shardings`
    would place it on `mesh`: plan the bytes per device without allocating anything."""
    shardings = state_shardings(abstract_state, mesh, rules)
    total = replicated_bytes = per_device = 0
    for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings), strict=True):
        nbytes = math.prod(x.shape) * x.dtype.itemsize
        shard_bytes = math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        total, per_device = total + nbytes, per_device + shard_bytes
        replicated_bytes += nbytes if shard_bytes == nbytes and mesh.size > 1 else 0
    return {"total_bytes": total, "replicated_bytes": replicated_bytes, "per_device_bytes": per_device}


def mesh_rules(c: Any) -> tuple:
    """The logical-axis rules of a config's `mesh.rules` as ((logical, mesh axis or None), ...)."""
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in c.mesh.rules)
