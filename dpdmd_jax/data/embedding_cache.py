r"""Prompt embeddings encoded once and trained from, with the text encoders never loaded.

    python -m dpdmd_jax.data.embedding_cache --config=configs/sd35.py --out=/data/sd35_cache \
        --config.model.source=/ckpts/sd3.5-medium --config.data.prompt_file=prompts.txt
    python -m dpdmd_jax.main --config=configs/sd35.py --workdir=runs/x \
        --config.data.kind=embeddings --config.data.cache_dir=/data/sd35_cache ...

The cache is a folder of `.npy` files, one per field of the backbone's conditioning (SD3:
`context.npy` [N, 333, 4096], `pooled.npy` [N, 2048]) plus `uncond_<field>.npy` (the embedding of
""), stored in the encoders' output dtype (bfloat16 as its raw 16 bits), memory-mapped when read, so
each host reads only its rows. `meta.json` records the prompts' source, the model and the shapes;
a cache is written under a temporary name and renamed when complete, and never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import jax
import ml_collections
import ml_dtypes
import numpy as np
from tqdm import tqdm

from dpdmd_jax.distill.step import RoundBatch

_STORED = {"bfloat16": np.uint16}  # dtypes .npy cannot name, stored as their raw bits


def _fields(cond_type) -> list[str]:
    return [f.name for f in dataclasses.fields(cond_type)]


def write_cache(out: str, prompts, text_encoder, cond_type, *, meta: dict, batch: int = 32,
                dtype: str = "bfloat16") -> str:
    """Encodes every prompt (in batches of `batch`) into the cache folder `out`."""
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
    truncated = 0
    for start in tqdm(range(0, n, batch), desc="encoding prompts", unit_scale=batch):
        chunk = [prompts[i] for i in range(start, min(start + batch, n))]
        k = len(chunk)
        cond = jax.device_get(text_encoder.encode(chunk + chunk[-1:] * (batch - k)))  # one shape: one compile
        truncated += int(text_encoder.tokenize(chunk)[1].sum())
        for f in fields:
            arrays[f][start:start + k] = _to_store(getattr(cond, f)[:k], dtype)
    for a in arrays.values():
        a.flush()
    shapes = {f: list(a.shape) for f, a in arrays.items()}
    with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump({**meta, "num_prompts": n, "dtype": dtype, "fields": fields, "shapes": shapes,
                   "truncated_prompts": truncated}, fh, indent=2)
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


class EmbeddingSource:
    """Conditionings read from an embedding cache, in the prompt sources' (seed, round) order."""

    def __init__(self, c: ml_collections.ConfigDict, backbone, mesh=None, rules=None):
        from dpdmd_jax.data.prompts import PromptOrder

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

    def _rows(self, idx: np.ndarray):
        flat = idx.reshape(-1)
        order = np.argsort(flat)  # memory-mapped reads in file order
        fields = {}
        for f, a in self.arrays.items():
            rows = np.empty((flat.size, *a.shape[1:]), np.float32)
            rows[order] = self._decode(a[flat[order]])
            fields[f] = rows.reshape(*idx.shape, *a.shape[1:])
        return self.cond_type(**fields)

    def round(self, r: int, rows: slice) -> RoundBatch:
        n = rows.stop - rows.start
        uncond = self.cond_type(**{f: np.broadcast_to(e, (n, *e.shape)) for f, e in self.empty.items()})
        return RoundBatch(cond=self._rows(self.order.indices(r, rows)), uncond=uncond)

    def eval_cond(self, n: int):
        return self._rows(np.arange(min(n, len(self))))


def build_cache(c: ml_collections.ConfigDict, out: str, batch: int = 32) -> str:
    """Encodes the prompts of config `c`'s prompt source with its text encoders (only those are
    loaded) into the cache folder `out`."""
    from dpdmd_jax import backbones
    from dpdmd_jax import config as config_lib
    from dpdmd_jax.data import problems, prompt_sequence
    from dpdmd_jax.parallel.mesh import mesh_rules
    from dpdmd_jax.parallel import mesh as mesh_lib

    config_lib.validate(c)
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; embedding caches are never overwritten: choose another --out")
    backbone = backbones.get(c)
    issues = problems(c) + backbone.check_source()
    if issues:
        raise config_lib.ConfigError("\n  - ".join(["Invalid input:", *issues]))
    prompts = prompt_sequence(c)
    mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    text = backbone.load_text_encoder(mesh, mesh_rules(c))
    meta = {"prompt_source": c.data.kind, "prompt_file": c.data.prompt_file, "tfds_dir": c.data.tfds_dir,
            "prompts_sha256": prompts_digest(prompts), "model_source": c.model.source, "text_dtype": c.text.dtype,
            "max_sequence_length": c.text.max_sequence_length}
    return write_cache(out, prompts, text, backbone.cond_type, meta=meta, batch=batch, dtype=c.text.dtype)


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config (its text encoders and prompt source).")
    flags.DEFINE_string("out", None, "Cache folder to create (must not exist).")
    flags.DEFINE_integer("batch", 32, "Prompts per encoding batch.")
    flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    out = build_cache(FLAGS.config, FLAGS.out, FLAGS.batch)
    print(f"wrote {read_meta(out)['num_prompts']} prompt embeddings to {out}")


if __name__ == "__main__":
    from dpdmd_jax import cli
    from dpdmd_jax.config import ConfigError
    from dpdmd_jax.weights.safetensors_io import CheckpointError

    define_flags()
    # Bad input (a config problem, an existing --out, a missing file or checkpoint): one line, exit code 2.
    cli.run(main, user_errors=(ConfigError, CheckpointError, FileExistsError, FileNotFoundError))
