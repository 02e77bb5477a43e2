"""An embedding cache as a data source (`data.kind="embeddings"`): conditionings read from `.npy`
files written once by `python -m dpdmd_jax.data.embedding_cache`, so the text encoders are never
loaded. One file per field of the backbone's conditioning plus `uncond_<field>.npy` (the embedding
of ""), stored in the encoders' output dtype (bfloat16 as its raw 16 bits), memory-mapped when read,
so each host reads only its rows. `meta.json` records the prompts' source, the model and the shapes.
A cache built from an image folder (`--images`) also holds `real_latents.npy`, each image's latents
on the row of its caption: the real side of DMD2's GAN (`gan.real="data"`), each real image seen by
the classifier with its own caption as the conditioning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable

import jax
import ml_collections
import ml_dtypes
import numpy as np
from tqdm import tqdm

from dpdmd_jax.config import gan_on_real_data
from dpdmd_jax.core import Cond, RoundBatch
from dpdmd_jax.data.base import HostSource
from dpdmd_jax.data.prompts import PromptOrder

_STORED = {"bfloat16": np.uint16}  # dtypes .npy cannot name, stored as their raw bits
REAL_LATENTS = "real_latents.npy"  # a cache built with --images: the images' latents, row for row with their captions


def _fields(cond_type) -> list[str]:
    return [f.name for f in dataclasses.fields(cond_type)]


def write_cache(out: str, prompts, text_encoder, cond_type, *, meta: dict, batch: int = 32,
                dtype: str = "bfloat16", encode_images: Callable[[int, int], np.ndarray] | None = None) -> str:
    """Encodes every prompt (in batches of `batch`) into the cache folder `out`. With
    `encode_images(start, stop)` (the latents of the real images whose captions are prompts
    start..stop), `real_latents.npy` holds them row for row with the conditionings (DMD2's GAN)."""
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; embedding caches are never overwritten: choose another --out")
    tmp = out + ".incomplete"
    shutil.rmtree(tmp, ignore_errors=True)  # a previous interrupted attempt
    os.makedirs(tmp)
    n = len(prompts)
    fields = _fields(cond_type)
    store = np.dtype(_STORED.get(dtype, dtype))
    empty = jax.device_get(text_encoder.empty())
    arrays = {}
    for f in fields:
        row = getattr(empty, f)[0]
        np.save(os.path.join(tmp, f"uncond_{f}.npy"), _to_store(row, dtype))
        arrays[f] = np.lib.format.open_memmap(os.path.join(tmp, f"{f}.npy"), "w+", store, (n, *row.shape))
    truncated, real = 0, None
    what = "encoding prompts and images" if encode_images else "encoding prompts"
    for start in tqdm(range(0, n, batch), desc=what, unit_scale=batch):
        chunk = [prompts[i] for i in range(start, min(start + batch, n))]
        k = len(chunk)
        cond = jax.device_get(text_encoder.encode(chunk + chunk[-1:] * (batch - k)))  # one shape: one compile
        truncated += int(text_encoder.tokenize(chunk)[1].sum())
        for f in fields:
            arrays[f][start:start + k] = _to_store(getattr(cond, f)[:k], dtype)
        if encode_images:
            latents = np.asarray(encode_images(start, start + k))
            if real is None:
                real = np.lib.format.open_memmap(os.path.join(tmp, REAL_LATENTS), "w+", store, (n, *latents.shape[1:]))
            real[start:start + k] = _to_store(latents, dtype)
    for a in [*arrays.values(), *([real] if real is not None else [])]:
        a.flush()
    shapes = {f: list(a.shape) for f, a in arrays.items()}
    extra = {"real_latents": list(real.shape)} if real is not None else {}
    with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump({**meta, "num_prompts": n, "dtype": dtype, "fields": fields, "shapes": shapes,
                   "truncated_prompts": truncated, **extra}, fh, indent=2)
    os.replace(tmp, out)
    return out


def _to_store(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    return x.view(np.uint16) if dtype == "bfloat16" else x


def read_meta(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(path):
        hint = " (it was interrupted while being written; rerun the cache command)" if os.path.isdir(
            cache_dir + ".incomplete") else ""
        raise FileNotFoundError(f"{cache_dir} is not an embedding cache: no meta.json{hint}")
    with open(path) as f:
        return json.load(f)


def prompts_digest(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


class EmbeddingSource(HostSource):
    """Conditionings read from an embedding cache, in the prompt sources' (seed, round) order."""

    no_prompts = "an embedding cache holds conditionings, not prompts"

    def __init__(self, c: ml_collections.ConfigDict, backbone, mesh=None, rules=None):
        del mesh, rules  # host arrays only: the trainer places them
        self.meta = read_meta(c.data.cache_dir)
        self.cond_type = backbone.cond_type
        fields = _fields(self.cond_type)
        if self.meta["fields"] != fields:
            raise ValueError(f"{c.data.cache_dir} holds {self.meta['fields']}, backbone {c.backbone!r} needs {fields}")
        spec = backbone.cond_spec(1)
        for f in fields:
            want = list(getattr(spec, f).shape[1:])
            if self.meta["shapes"][f][1:] != want:
                raise ValueError(f"{c.data.cache_dir}: {f} rows are {self.meta['shapes'][f][1:]}, the model takes "
                                 f"{want}; the cache was made for another model")
        load = lambda name: np.load(os.path.join(c.data.cache_dir, name), mmap_mode="r")
        self.arrays = {f: load(f"{f}.npy") for f in fields}
        # DMD2's GAN on real data: each row's image, with the row's caption as its conditioning.
        self.real = load(REAL_LATENTS) if gan_on_real_data(c) else None
        if self.real is not None and tuple(self.real.shape[1:]) != tuple(backbone.latent_shape()):
            raise ValueError(f"{c.data.cache_dir}: its real latents are {list(self.real.shape[1:])}, the model takes "
                             f"{list(backbone.latent_shape())}; build the cache at this run's data.latent_size")
        self.empty = {f: self._decode(load(f"uncond_{f}.npy")) for f in fields}
        self.order = PromptOrder(self.meta["num_prompts"], c.seed, c.distill.fake_updates_per_student + 1,
                                 c.batch_size)

    def __len__(self) -> int:
        return self.meta["num_prompts"]

    def _decode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self.meta["dtype"] == "bfloat16":
            x = x.view(ml_dtypes.bfloat16)
        return x.astype(np.float32)

    def _take(self, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
        flat = idx.reshape(-1)
        order = np.argsort(flat)  # memory-mapped reads in file order
        rows = np.empty((flat.size, *a.shape[1:]), np.float32)
        rows[order] = self._decode(a[flat[order]])
        return rows.reshape(*idx.shape, *a.shape[1:])

    def _rows(self, idx: np.ndarray):
        return self.cond_type(**{f: self._take(a, idx) for f, a in self.arrays.items()})

    def round(self, r: int, rows: slice) -> RoundBatch:
        idx = self.order.indices(r, rows)
        real = None if self.real is None else self._take(self.real, idx)
        return RoundBatch(cond=self._rows(idx), uncond=self.uncond(rows.stop - rows.start), real=real)

    def uncond(self, n: int) -> Cond:
        return self.cond_type(**{f: np.broadcast_to(e, (n, *e.shape)) for f, e in self.empty.items()})

    def eval_cond(self, n: int):
        return self._rows(np.arange(min(n, len(self))))
