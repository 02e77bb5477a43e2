"""Checkpoint tensors -> placed NNX state, streamed leaf by leaf, with up-front validation.

A backbone's key map says, for every leaf of our (abstract) state, which checkpoint tensors it
comes from and how their layout changes (`Source`). `load_state` first checks the whole map
against the checkpoint's headers (missing, unexpected and shape-mismatched keys, all named in
one error) and only then reads: one leaf at a time, converted to the target dtype on the host,
and `device_put` straight onto its sharding, so host memory peaks near one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx
from tqdm import tqdm

from dpdmd_jax.parallel.mesh import DEFAULT_RULES, state_shardings
from dpdmd_jax.weights.safetensors_io import CheckpointError, TensorInfo, index_checkpoint, read_tensor, write_file

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


# ---------------------------------------------------------------------------- whole folders


def abstract_model(build: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
    """`nnx.eval_shape(lambda: build(rngs))`: the model with shape-only parameters, no allocation.

    The params draw counter is a host (numpy) integer: a traced one makes every draw cost time
    linear in the ops traced so far (flax 0.12.8 `Variable.set_value` reads the new value's
    `.sharding`, and on a tracer that builds an error message by walking the whole trace), so the
    shape-only build grows quadratically with the number of parameters (unscanned full-size SDXL
    UNet: 83 s -> 3 s). Keys are unchanged.
    """
    def make():
        rngs = nnx.Rngs(seed)
        rngs.params.count = nnx.RngCount(np.zeros((), np.uint32), tag="params")
        return build(rngs)

    return nnx.eval_shape(make)


def read_folder_config(folder: str, class_names: Iterable[str], what: str) -> dict:
    """The `config.json` of a diffusers/transformers model folder, checked to describe one of
    `class_names` (its `_class_name` or `architectures`, when present)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json; expected a {what} folder")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    names = set(class_names)
    declared = [raw["_class_name"]] if "_class_name" in raw else list(raw.get("architectures") or [])
    if declared and not names.intersection(declared):
        raise CheckpointError(f"{path} describes a {'/'.join(declared)}, not a {what} ({' or '.join(sorted(names))})")
    return raw


def build_config(from_raw: Callable[..., Any], raw: dict, folder: str, **overrides: Any) -> Any:
    """`from_raw(raw, **overrides)` (a model config's `from_diffusers` / `from_transformers`), its
    ValueError / TypeError turned into a CheckpointError naming the folder's config.json."""
    try:
        return from_raw(raw, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from e


def load_module(
    abstract_model: nnx.Module,
    key_map: Callable[[nnx.State], dict[Path, Source]],
    folder: str,
    *,
    prefix: str,
    mesh: jax.sharding.Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
    tensors: dict[str, TensorInfo] | None = None,
    ignore: Iterable[str] = (),
) -> nnx.Module:
    """Fills `abstract_model` (from `nnx.eval_shape`) from the safetensors of `folder` (one file or
    an indexed set named `prefix`; or `tensors`, its already-read index), each leaf placed on its
    sharding on `mesh` (else device 0). Checkpoint keys in `ignore` (buffers that are not
    parameters) are dropped; every other key is validated."""
    graphdef, abstract = nnx.split(abstract_model)
    tensors = index_checkpoint(folder, prefix) if tensors is None else tensors
    tensors = {k: v for k, v in tensors.items() if k not in set(ignore)}
    shardings = state_shardings(abstract, mesh, rules) if mesh is not None else jax.devices()[0]
    state = load_state(abstract, key_map(abstract), tensors, shardings, folder, progress=progress)
    return nnx.merge(graphdef, state)


def save_module(
    model: nnx.Module,
    key_map: Callable[[nnx.State], dict[Path, Source]],
    out_dir: str | os.PathLike,
    *,
    weights_name: str,
    config: dict,
    dtype: Any = None,
    overwrite: bool = False,
) -> str:
    """Writes `model` as a reference-loadable folder: `config.json` + one `weights_name` file.
    Refuses to overwrite existing weights unless asked."""
    out_dir = os.fspath(out_dir)
    weights = os.path.join(out_dir, weights_name)
    if os.path.exists(weights) and not overwrite:
        raise FileExistsError(f"{weights} exists; pass overwrite=True or choose another folder")
    os.makedirs(out_dir, exist_ok=True)
    state = nnx.state(model)
    sources = key_map(state)
    np_dtype = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))
    write_file(weights, export_tensors(state, sources, np_dtype), checkpoint_shapes(state, sources, np_dtype))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
