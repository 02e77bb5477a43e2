"""Checkpoint tensors -> placed NNX state, streamed leaf by leaf, with up-front validation.

A backbone's key map says, for every leaf of our (abstract) state, which checkpoint tensors it
comes from and how their layout changes (`Source`). `load_state` first checks the whole map
against the checkpoint's headers (missing, unexpected and shape-mismatched keys, all named in
one error) and only then reads: one leaf at a time, converted to the target dtype on the host,
and `device_put` straight onto its sharding, so host memory peaks near one copy of the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx
from tqdm import tqdm

from dpdmd_jax.weights.safetensors_io import CheckpointError, TensorInfo, read_tensor

Path = tuple[Any, ...]


def linear_to_ours(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> flax kernel (in, out)."""
    return w.T


def conv_to_ours(w: np.ndarray) -> np.ndarray:
    """torch Conv2d (O, I, kh, kw) -> flax (kh, kw, I, O)."""
    return w.transpose(2, 3, 1, 0)


def identity(w: np.ndarray) -> np.ndarray:
    return w


# Inverses, for exporting back to the PyTorch layout.
TO_CHECKPOINT = {linear_to_ours: linear_to_ours, conv_to_ours: lambda w: w.transpose(3, 2, 0, 1), identity: identity}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one leaf of our state comes from: checkpoint `keys` (several are stacked on a new
    leading axis, for scanned layers), each of `shape` in the checkpoint, and the layout change."""

    keys: tuple[str, ...]
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] = identity
    stacked: bool = False


def _summarise(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def validate(sources: dict[Path, Source], tensors: dict[str, TensorInfo], what: str) -> None:
    """Raises one CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    expected = {k: s.shape for s in sources.values() for k in s.keys}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(
        f"{k} (checkpoint {list(tensors[k].shape)}, model expects {list(shape)})"
        for k, shape in expected.items()
        if k in tensors and tensors[k].shape != tuple(shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_summarise(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{what} does not match the model built from its config: " + "; ".join(problems) + ". "
            "Check that config.json belongs to these weights and that the folder is the right model "
            "component (e.g. the pipeline's transformer/ folder)."
        )


def _leaf_value(var: Any) -> Any:
    return var.get_value() if isinstance(var, nnx.Variable) else var


def load_state(
    abstract_state: nnx.State,
    sources: dict[Path, Source],
    tensors: dict[str, TensorInfo],
    shardings: Any,
    what: str,
    progress: bool = True,
) -> nnx.State:
    """Fills `abstract_state` (from `nnx.eval_shape`) with checkpoint tensors placed on `shardings`
    (a matching tree of `jax.sharding.Sharding`, or one sharding for every leaf)."""
    flat = dict(nnx.to_flat_state(abstract_state))
    if set(flat) != set(sources):
        raise AssertionError(f"key map out of sync with the model: {sorted(set(flat) ^ set(sources))[:5]}")
    validate(sources, tensors, what)
    flat_shardings = (
        dict(nnx.to_flat_state(shardings)) if isinstance(shardings, nnx.State) else dict.fromkeys(flat, shardings)
    )

    loaded = []
    for path, var in tqdm(flat.items(), desc=f"loading {what}", disable=not progress, leave=False):
        src, target = sources[path], _leaf_value(var)
        parts = [src.transform(read_tensor(tensors[k])).astype(target.dtype) for k in src.keys]
        host = np.stack(parts) if src.stacked else parts[0]
        del parts
        if host.shape != target.shape:
            raise AssertionError(f"{path}: converted shape {host.shape} != model shape {target.shape}")
        sharding = _leaf_value(flat_shardings[path])
        value = jax.device_put(host, sharding)
        del host
        loaded.append((path, var.replace(value) if isinstance(var, nnx.Variable) else value))
    return nnx.from_flat_state(loaded)


def export_tensors(state: nnx.State, sources: dict[Path, Source], dtype: Any = None):
    """Yields (checkpoint key, host array in the checkpoint layout), one leaf at a time."""
    flat = dict(nnx.to_flat_state(state))
    for path, src in sources.items():
        value = np.asarray(jax.device_get(_leaf_value(flat[path])))
        if dtype is not None:
            value = value.astype(dtype)
        parts = list(value) if src.stacked else [value]
        for key, part in zip(src.keys, parts, strict=True):
            yield key, np.ascontiguousarray(TO_CHECKPOINT[src.transform](part))


def checkpoint_shapes(state: nnx.State, sources: dict[Path, Source], dtype: Any = None) -> dict[str, tuple]:
    """Checkpoint key -> (shape, dtype) of what `export_tensors` will yield, in the same order."""
    flat = dict(nnx.to_flat_state(state))
    out = {}
    for path, src in sources.items():
        dt = np.dtype(dtype) if dtype is not None else np.dtype(_leaf_value(flat[path]).dtype)
        for key in src.keys:
            out[key] = (tuple(src.shape), dt)
    return out
