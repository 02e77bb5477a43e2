"""Streaming safetensors reading / writing: one tensor in host memory at a time.

The safetensors package memory-maps whole files; every page touched stays in the process's
resident set until the file is closed, so loading a checkpoint through it peaks near two
copies of the weights (mapped file + the arrays we build). Reading each tensor with `readinto`
keeps the peak near one copy. The format is tiny (u64 header length, JSON header, raw
little-endian bytes); we read and write exactly that, with ml_dtypes for bfloat16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, corrupt, or does not match the model."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Tensor names -> location, from one .safetensors file's header (no data read)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}; the file is corrupt")
            header = json.loads(f.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); re-download or re-export it") from e
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        dtype = DTYPES[meta["dtype"]]
        shape = tuple(meta["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or base + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({meta['dtype']} {list(shape)}) lies outside the file or has the wrong "
                f"byte length; the file is truncated or corrupt"
            )
        out[name] = TensorInfo(path, dtype, shape, base + begin, end - begin)
    return out


def index_checkpoint(folder: str, prefix: str = "diffusion_pytorch_model") -> dict[str, TensorInfo]:
    """All tensors of a diffusers/transformers weights folder: a sharded set with its
    `<prefix>.safetensors.index.json`, or a single `<prefix>.safetensors` (or the only
    `*.safetensors` file present)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder!r} does not exist or is not a directory")
    index = os.path.join(folder, f"{prefix}.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        single = os.path.join(folder, f"{prefix}.safetensors")
        candidates = [single] if os.path.exists(single) else sorted(
            os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")
        )
        if len(candidates) != 1:
            raise CheckpointError(
                f"{folder}: expected {prefix}.safetensors or {prefix}.safetensors.index.json, found "
                f"{[os.path.basename(c) for c in candidates] or 'no .safetensors files'}"
            )
        files, weight_map = [os.path.basename(candidates[0])], None
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
            raise CheckpointError(f"{folder}: shard {fname} listed in the index is missing")
        tensors.update(read_header(path))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{folder}: tensors listed in the index but absent from their shard: {missing[:10]}")
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor into a fresh host array (no memory map)."""
    buf = np.empty(info.nbytes, np.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        if f.readinto(memoryview(buf)) != info.nbytes:
            raise CheckpointError(f"{info.file}: unexpected end of file; the checkpoint is truncated")
    return buf.view(info.dtype).reshape(info.shape)


def write_file(
    path: str, tensors: Iterable[tuple[str, Any]], shapes: dict[str, tuple[tuple[int, ...], np.dtype]]
) -> None:
    """Writes a .safetensors file, pulling tensors one at a time from `tensors` (name, array).

    `shapes` (name -> (shape, dtype)) lets the header be written before any data is produced.
    """
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section aligned to 8 bytes, as the reference writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, array), expected in zip(tensors, shapes, strict=True):
            if name != expected:
                raise ValueError(f"tensor {name} arrived where the header expects {expected}")
            array = np.ascontiguousarray(array)
            if array.shape != tuple(shapes[name][0]) or array.dtype != np.dtype(shapes[name][1]):
                raise ValueError(f"tensor {name}: got {array.dtype}{list(array.shape)}, header says {shapes[name]}")
            f.write(array.tobytes())
    os.replace(tmp, path)  # never leave a half-written file under the final name
