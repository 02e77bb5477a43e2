r"""Evaluate sample folders (made by `python -m dpdmd_jax.sample`): diversity and quality.

    python -m dpdmd_jax.evaluate --samples=runs/teacher_samples,runs/dmd_samples,runs/dpdmd_samples \
        --names=teacher,DMD,DP-DMD --clip=/ckpts/clip-vit-large-patch14 --dino=/ckpts/dinov2-large \
        --out=runs/eval

Per folder, `eval.json` and `eval.md` in it; with several folders, `comparison.md` / `.json` in
`--out`. Metrics:
  * `diversity_clip`: the paper's diversity (`dpdmd_jax.diversity`) on the CLIP ViT vision tower's CLS
    token before its post-LayerNorm (`last_hidden_state[:, 0]`, the method's evaluation);
  * `diversity_dino`: on the DINO tower's `pooler_output` (DINOv3 ViT-L/16 in the method's code;
    DINOv2 folders work too: transformers 5.24 has both `Dinov2Model` and `DINOv3ViTModel`);
  * `clip_score`: 100 * max(cos, 0) of the CLIP image and prompt embeddings (needs a full
    `CLIPModel` folder: both towers, both projections, its tokenizer);
  * `diversity_pixel`: the same diversity on raw pixel vectors (no tower needed; colour and layout,
    not semantics), for every folder;
  * the toy's analytic metrics (`toy.metrics.toy_metrics`) for toy sample folders, computed from
    the PNGs (8-bit) on the prompts that have all their seeds.
The towers load from local transformers folders (`--clip`, `--dino`), sharded over every device;
images are batched data-parallel. Each tower sees the images at its own resolution, preprocessed
as its folder's `preprocessor_config.json` says (else at its config's `image_size`; see
`eval.preprocess.tower_preprocessing`). Missing or unreadable PNGs are reported, skipped and
counted; prompts left with fewer than 2 images drop out of the diversity averages (counted too).
Every metric that could not be computed is named with the reason (printed, and `not_computed`
in eval.json / eval.md); when no metric at all can be computed the command stops with exit code 2.
"""

from __future__ import annotations

from absl import flags, logging

from dpdmd_jax import cli
from dpdmd_jax.eval.folder import EvaluateError, evaluate
from dpdmd_jax.weights.safetensors_io import CheckpointError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    flags.DEFINE_list("samples", None, "Sample folders (comma separated).")
    flags.DEFINE_list("names", None, "A name per folder for the tables (default: folder names).")
    flags.DEFINE_string("clip", None, "A transformers CLIP folder (CLIPModel for the CLIP score, or CLIPVisionModel).")
    flags.DEFINE_string("dino", None, "A transformers Dinov2Model / DINOv3ViTModel folder.")
    flags.DEFINE_string("out", None, "Folder for the comparison table (default: the first sample folder).")
    flags.DEFINE_integer("per_device_batch", 8, "Images per device per batch of tower features.")
    flags.mark_flags_as_required(["samples"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    evaluate(FLAGS.samples, FLAGS.names, clip=FLAGS.clip, dino=FLAGS.dino, out=FLAGS.out,
             per_device_batch=FLAGS.per_device_batch)


if __name__ == "__main__":
    define_flags()
    cli.run(main, user_errors=(EvaluateError, CheckpointError, FileNotFoundError))
