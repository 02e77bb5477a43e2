r"""Prompt embeddings encoded once and trained from, with the text encoders never loaded.

    python -m dpdmd_jax.data.embedding_cache --config=configs/sd35.py --out=/data/sd35_cache \
        --config.model.source=/ckpts/sd3.5-medium --config.data.prompt_file=prompts.txt
    python -m dpdmd_jax.main --config=configs/sd35.py --workdir=runs/x \
        --config.data.kind=embeddings --config.data.cache_dir=/data/sd35_cache ...

With `--images=FOLDER` (an image folder with captions, `data.image_folder`) the prompts are the
images' captions and the cache also holds each image's VAE latents at `data.latent_size`: the real
side of DMD2's GAN (`--config.gan.real=data`), each real image with its own caption:

    python -m dpdmd_jax.data.embedding_cache --config=configs/sdxl.py --out=/data/sdxl_real \
        --config.model.source=/ckpts/sdxl-base --images=/data/real_images
    python -m dpdmd_jax.main --config=configs/sdxl.py:dmd2 --workdir=runs/dmd2 \
        --config.data.kind=embeddings --config.data.cache_dir=/data/sdxl_real ...

The cache is a folder of `.npy` files, one per field of the backbone's conditioning (SD3:
`context.npy` [N, 333, 4096], `pooled.npy` [N, 2048]) plus `uncond_<field>.npy` (the embedding of
""), stored in the encoders' output dtype (bfloat16 as its raw 16 bits), memory-mapped when read, so
each host reads only its rows (`data.embeddings`). `meta.json` records the prompts' source, the model
and the shapes; a cache is written under a temporary name and renamed when complete, and never
overwritten.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from dpdmd_jax import backbones, cli
from dpdmd_jax.config import ConfigError
from dpdmd_jax.data import problems, prompt_sequence
from dpdmd_jax.data.embeddings import prompts_digest, read_meta, write_cache
from dpdmd_jax.data.image_folder import ImageFolderError, load_image, read_image_folder
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.weights.safetensors_io import CheckpointError

__all__ = ["build_cache", "read_meta"]


def build_cache(c: ml_collections.ConfigDict, out: str, batch: int = 32, images: str = "",
                caption_column: str = "text") -> str:
    """Encodes the prompts of config `c`'s prompt source with its text encoders (only those are
    loaded) into the cache folder `out`; with `images` (a folder), its captions and, through the
    pipeline's VAE, its images at `c.data.latent_size`."""
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; embedding caches are never overwritten: choose another --out")
    try:
        backbone = backbones.get(c)
    except (KeyError, ImportError) as e:
        raise ConfigError(f"backbone={c.backbone!r}: {e}") from e
    issues = backbone.check_source() + ([] if images else problems(c))
    if images and not backbone.has_vae():
        issues.append(f"--images encodes images with a pipeline's VAE, and model.source={c.model.source!r} has none: "
                      "set --config.model.source (or --config.text.source) to a pipeline folder.")
    if images and c.data.latent_size[0] != c.data.latent_size[1]:
        issues.append(f"data.latent_size={tuple(c.data.latent_size)}: --images centre-crops square images; "
                      "set a square data.latent_size.")
    pairs = []
    if images:
        try:
            pairs = read_image_folder(images, caption_column)
        except ImageFolderError as e:
            issues.append(f"--images: {e}")
    if issues:
        raise ConfigError("\n  - ".join(["Invalid input:", *issues]))
    prompts = [caption for _, caption in pairs] if images else prompt_sequence(c)
    mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    rules = mesh_lib.mesh_rules(c)
    text = backbone.load_text_encoder(mesh, rules)
    meta = {"prompt_source": c.data.kind, "prompt_file": c.data.prompt_file, "tfds_dir": c.data.tfds_dir,
            "prompts_sha256": prompts_digest(prompts), "model_source": c.model.source, "text_dtype": c.text.dtype,
            "max_sequence_length": c.text.max_sequence_length}
    encode_images = None
    if images:
        meta.update(prompt_source="images", images=os.path.abspath(images), caption_column=caption_column)
        encode_images = _image_encoder([path for path, _ in pairs], backbone, mesh, rules, c.data.latent_size, batch)
    return write_cache(out, prompts, text, backbone.cond_type, meta=meta, batch=batch, dtype=c.text.dtype,
                       encode_images=encode_images)


def _image_encoder(paths: list[str], backbone, mesh, rules, latent_size, batch: int):
    """(start, stop) -> the latents of images start..stop, through the pipeline's VAE (fp32), in
    batches of `batch` (the last padded: one shape, one compile)."""
    model = backbone.load_vae(mesh, rules)
    side = [s * model.cfg.downsample_factor for s in latent_size]
    graphdef, vae = nnx.split(model)
    encode = jax.jit(lambda vae, x: backbone.encode(nnx.merge(graphdef, vae), x))

    def latents(start: int, stop: int) -> np.ndarray:
        chunk = [load_image(p, side[0]) for p in paths[start:stop]]
        x = np.stack(chunk + chunk[-1:] * (batch - len(chunk)))
        return np.asarray(jax.device_get(encode(vae, x)))[:len(chunk)]

    return latents


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "Training config (its text encoders and prompt source).")
    flags.DEFINE_string("out", None, "Cache folder to create (must not exist).")
    flags.DEFINE_integer("batch", 32, "Prompts (and images) per encoding batch.")
    flags.DEFINE_string("images", "", "An image folder with captions (metadata.jsonl, or NAME.txt beside each "
                        "image): its captions are the prompts, and its images' latents the GAN's real side.")
    flags.DEFINE_string("caption_column", "text", "The caption's field in the folder's metadata.jsonl.")
    flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    out = build_cache(FLAGS.config, FLAGS.out, FLAGS.batch, FLAGS.images, FLAGS.caption_column)
    meta = read_meta(out)
    print(f"wrote {meta['num_prompts']} prompt embeddings{' and image latents' if 'real_latents' in meta else ''} "
          f"to {out}")


if __name__ == "__main__":
    define_flags()
    # Bad input (a config problem, an existing --out, a missing file or checkpoint): one line, exit code 2.
    cli.run(main, user_errors=(ConfigError, CheckpointError, FileExistsError, FileNotFoundError))
