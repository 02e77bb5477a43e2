r"""Prompt embeddings encoded once and trained from, with the text encoders never loaded.

    python -m dpdmd_jax.data.embedding_cache --config=configs/sd35.py --out=/data/sd35_cache \
        --config.model.source=/ckpts/sd3.5-medium --config.data.prompt_file=prompts.txt
    python -m dpdmd_jax.main --config=configs/sd35.py --workdir=runs/x \
        --config.data.kind=embeddings --config.data.cache_dir=/data/sd35_cache ...

The cache is a folder of `.npy` files, one per field of the backbone's conditioning (SD3:
`context.npy` [N, 333, 4096], `pooled.npy` [N, 2048]) plus `uncond_<field>.npy` (the embedding of
""), stored in the encoders' output dtype (bfloat16 as its raw 16 bits), memory-mapped when read, so
each host reads only its rows (`data.embeddings`). `meta.json` records the prompts' source, the model
and the shapes; a cache is written under a temporary name and renamed when complete, and never
overwritten.
"""

from __future__ import annotations

import os

import ml_collections
from absl import flags
from ml_collections import config_flags

from dpdmd_jax import backbones, cli
from dpdmd_jax.config import ConfigError
from dpdmd_jax.data import problems, prompt_sequence
from dpdmd_jax.data.embeddings import prompts_digest, read_meta, write_cache
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.weights.safetensors_io import CheckpointError

__all__ = ["build_cache", "read_meta"]


def build_cache(c: ml_collections.ConfigDict, out: str, batch: int = 32) -> str:
    """Encodes the prompts of config `c`'s prompt source with its text encoders (only those are
    loaded) into the cache folder `out`."""
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; embedding caches are never overwritten: choose another --out")
    try:
        backbone = backbones.get(c)
    except (KeyError, ImportError) as e:
        raise ConfigError(f"backbone={c.backbone!r}: {e}") from e
    issues = problems(c) + backbone.check_source()
    if issues:
        raise ConfigError("\n  - ".join(["Invalid input:", *issues]))
    prompts = prompt_sequence(c)
    mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    text = backbone.load_text_encoder(mesh, mesh_lib.mesh_rules(c))
    meta = {"prompt_source": c.data.kind, "prompt_file": c.data.prompt_file, "tfds_dir": c.data.tfds_dir,
            "prompts_sha256": prompts_digest(prompts), "model_source": c.model.source, "text_dtype": c.text.dtype,
            "max_sequence_length": c.text.max_sequence_length}
    return write_cache(out, prompts, text, backbone.cond_type, meta=meta, batch=batch, dtype=c.text.dtype)


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "Training config (its text encoders and prompt source).")
    flags.DEFINE_string("out", None, "Cache folder to create (must not exist).")
    flags.DEFINE_integer("batch", 32, "Prompts per encoding batch.")
    flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    out = build_cache(FLAGS.config, FLAGS.out, FLAGS.batch)
    print(f"wrote {read_meta(out)['num_prompts']} prompt embeddings to {out}")


if __name__ == "__main__":
    define_flags()
    # Bad input (a config problem, an existing --out, a missing file or checkpoint): one line, exit code 2.
    cli.run(main, user_errors=(ConfigError, CheckpointError, FileExistsError, FileNotFoundError))
