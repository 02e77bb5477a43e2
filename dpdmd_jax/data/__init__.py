"""Data sources: where each round's conditionings come from (`config.data.kind`).

One protocol (`core.DataSource`): `round(r, rows)` returns the host (numpy) `RoundBatch` of round r
restricted to the global batch rows `rows` (a slice): conditionings [M + 1, len(rows), ...] for the
M critic updates and the generator update, and the unconditional conditioning [len(rows), ...]. A
source is a pure function of (config.seed, r), so a resumed run replays the same data, and each
process builds only the rows its devices hold (the run asks for exactly those).

`encode(global_batch)` runs on device once the rows of every process form global arrays: the text
sources return token ids from `round` and encode them there, with the text encoders sharded over
the mesh (the others return the batch as it is). For the sampler and the evaluators a source also
gives `prompts()`, `encode_prompts(prompts)`, `uncond(n)`, `prompt_problems(prompts)` and
`eval_cond(n)` (the conditionings of its first n prompts, for fixed sample grids); a source without
prompts raises `core.NoPrompts`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import ml_collections
from jax.sharding import Mesh

from dpdmd_jax.config import gan_on_real_data, regression_pairs
from dpdmd_jax.core import Backbone, DataSource, RoundBatch
from dpdmd_jax.data.embeddings import read_meta
from dpdmd_jax.data.pairs import PairCache, PairedSource
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.data.prompts import PromptFileError, TextSource, read_prompt_file, text_file_prompts

SOURCES = {
    "toy": "dpdmd_jax.data.toy:ToySource",  # the toy's class prompts
    "random": "dpdmd_jax.data.random:RandomSource",  # Gaussian conditionings of the backbone's shapes (tests)
    "prompts": "dpdmd_jax.data:text_source",  # data.prompt_file: one prompt per line, through the text encoders
    "diffusiondb": "dpdmd_jax.data:text_source",  # the DiffusionDB TFDS dataset (data.tfds_dir, data.manual_dir)
    "embeddings": "dpdmd_jax.data.embeddings:EmbeddingSource",  # data.cache_dir, made by data.embedding_cache
}
OWN_VOCABULARY = ("toy",)  # sources that encode their own fixed set of prompts (the toy's class names)


def problems(c: ml_collections.ConfigDict) -> list[str]:
    """Cheap checks of the data config and inputs, one sentence each, before anything is loaded."""

    if c.data.kind not in SOURCES:
        return [f"data.kind={c.data.kind!r}; choose one of {tuple(SOURCES)}."]
    if c.data.kind == "prompts":
        if not c.data.prompt_file:
            return ["data.kind='prompts' needs --config.data.prompt_file=FILE (.txt: one prompt per line; "
                    ".jsonl / .json / .csv / .tsv / .parquet: the column data.prompt_column)."]
        try:
            read_prompt_file(c.data.prompt_file, c.data.prompt_column)
        except PromptFileError as e:
            return [f"data.prompt_file: {e}"]
    if c.data.kind == "diffusiondb":
        from dpdmd_jax.data import diffusiondb  # TFDS imports TensorFlow (seconds): only for this source

        if not c.data.tfds_dir:
            return ["data.kind='diffusiondb' needs --config.data.tfds_dir (where the TFDS dataset is, or is built)."]
        if not diffusiondb.is_prepared(c.data.tfds_dir):
            manual = c.data.manual_dir
            if not manual or not os.path.isdir(manual):
                how = diffusiondb.DiffusionDbPrompts.MANUAL_DOWNLOAD_INSTRUCTIONS
                return [f"the DiffusionDB prompts are not built in data.tfds_dir={c.data.tfds_dir!r} and "
                        f"data.manual_dir={manual!r} is not a folder; {how}"]
    if c.data.kind == "embeddings":
        try:
            meta = read_meta(c.data.cache_dir)
        except FileNotFoundError as e:
            return [f"data.cache_dir: {e}"]
        real = meta.get("real_latents")
        if gan_on_real_data(c) and not real:
            return [f"gan.real='data' takes its real images from the embedding cache, and {c.data.cache_dir} holds "
                    "none: build one with --images=FOLDER (python -m dpdmd_jax.data.embedding_cache), or set "
                    "--config.gan.real=teacher."]
        if gan_on_real_data(c) and tuple(real[1:3]) != tuple(c.data.latent_size):
            return [f"{c.data.cache_dir} holds real latents of {real[1]}x{real[2]}, and data.latent_size is "
                    f"{tuple(c.data.latent_size)}: build the cache at this size (--config.data.latent_size)."]
    return []


def prompt_sequence(c: ml_collections.ConfigDict) -> Sequence[str]:
    """The prompts of a text source (`prompts` or `diffusiondb`), as a random-access sequence."""
    if c.data.kind == "prompts":
        return text_file_prompts(c)
    if c.data.kind == "diffusiondb":
        from dpdmd_jax.data import diffusiondb  # TFDS imports TensorFlow (seconds): only for this source

        if not diffusiondb.is_prepared(c.data.tfds_dir):
            diffusiondb.prepare(c.data.tfds_dir, c.data.manual_dir)
        return diffusiondb.Prompts(c.data.tfds_dir)
    raise ValueError(f"data.kind={c.data.kind!r} has no prompts (choose 'prompts' or 'diffusiondb')")


def for_prompt_file(c: ml_collections.ConfigDict, prompt_file: str | None) -> ml_collections.ConfigDict:
    """A copy of `c` whose data source encodes the prompts of `prompt_file` (the sampler's
    --prompt_file): the toy's own class prompts stay with the toy source; every other source
    becomes a prompt file read by the pipeline's text encoders."""
    c = c.copy_and_resolve_references()
    if prompt_file and c.data.kind not in OWN_VOCABULARY:
        c.data.kind, c.data.prompt_file = "prompts", prompt_file
    return c


def text_source(c: ml_collections.ConfigDict, backbone: Backbone, mesh, rules):
    if not hasattr(backbone, "load_text_encoder"):
        raise ValueError(f"backbone {c.backbone!r} has no text encoders; data.kind={c.data.kind!r} needs them")
    prompts = prompt_sequence(c)
    return TextSource(c, prompts, backbone.load_text_encoder(mesh, rules), mesh)


def make_source(c: ml_collections.ConfigDict, backbone: Backbone, mesh, rules) -> DataSource:
    """The config's data source; with DMD v1's pair cache (regression.pairs) its rounds also carry
    the cached pairs (`data.pairs.PairedSource`)."""
    module, name = SOURCES[c.data.kind].split(":")
    source = getattr(importlib.import_module(module), name)(c, backbone, mesh, rules)
    if regression_pairs(c):
        return PairedSource(source, PairCache.open(c, backbone))
    return source


def global_round(data: DataSource, mesh: Mesh, batch_size: int, r: int) -> RoundBatch:
    """Round r's global batch, of which this process builds only its rows (`parallel.mesh`); sources
    that return token ids encode them on device."""
    rows = mesh_lib.process_batch_rows(mesh, batch_size)
    return data.encode(mesh_lib.put_round(mesh, batch_size, data.round(r, rows)))
