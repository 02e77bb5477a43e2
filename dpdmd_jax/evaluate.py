r"""Evaluate sample folders (made by `python -m dpdmd_jax.sample`): diversity and quality.

    python -m dpdmd_jax.evaluate --samples=runs/teacher_samples,runs/dmd_samples,runs/dpdmd_samples \
        --names=teacher,DMD,DP-DMD --clip=/ckpts/clip-vit-large-patch14 --dino=/ckpts/dinov2-large \
        --inception=/ckpts/pt_inception-2015-12-05.safetensors --pickscore=/ckpts/PickScore_v1 \
        --pickscore_processor=/ckpts/CLIP-ViT-H-14-laion2B-s32B-b79K --hpsv2=/ckpts/HPS_v2.1.safetensors \
        --hpsv2_tokenizer=/ckpts/sd3.5-medium/tokenizer --out=runs/eval

Per folder: `eval.json` and `eval.md` (every metric; `not_computed` names each one that could not be
computed, with the reason) and `eval_prompts.jsonl`, one row per prompt (its index, prompt, readable
seeds, and each per-prompt number: diversity, Vendi, CLIP score, PickScore / HPSv2 mean and
`<score>_per_seed`) to find the prompts and seeds behind a number. With several folders,
`comparison.md` / `.json` in `--out`. Metrics (`eval.folder`, `eval.metrics`):
  * the paper's diversity on CLIP (CLS before the post-LayerNorm) and DINO (`pooler_output`)
    features, and the CLIP score (a full `CLIPModel` folder); `diversity_pixel` without a tower;
  * FID with clean-fid's conventions against `--fid_reference`, else the teacher's folder among
    `--samples`: `fid_t` (FID-T) when the reference is a teacher sample folder, `fid` otherwise;
  * the Vendi score per prompt (mean) and per folder on each feature set (CLIP, DINO, Inception);
  * PickScore and HPSv2 / HPSv2.1 (their means over images);
  * the toy: its analytic metrics, and `fid_t_layout` / `vendi_layout_*` on its detected layouts (no
    tower; against the teacher folder of the call): nothing about image quality, as no number of a
    random-weight tower is.
Towers load from local folders / files, sharded over every device; images are batched data-parallel
(the FID Inception: on one device). Each tower sees the images as its processor says. Every input is
checked, one line per problem, before any model loads; missing PNGs are reported then, unreadable
ones when read, both skipped and counted. When no metric at all can be computed the command stops
with exit code 2.
"""

from __future__ import annotations

from absl import flags, logging

from dpdmd_jax import cli
from dpdmd_jax.eval.fid import FIDError
from dpdmd_jax.eval.folder import EvaluateError, evaluate
from dpdmd_jax.weights.safetensors_io import CheckpointError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    flags.DEFINE_list("samples", None, "Sample folders (comma separated).")
    flags.DEFINE_list("names", None, "A name per folder for the tables (default: folder names).")
    flags.DEFINE_string("clip", None, "A transformers CLIP folder (CLIPModel for the CLIP score, or CLIPVisionModel).")
    flags.DEFINE_string("dino", None, "A transformers Dinov2Model / DINOv3ViTModel folder.")
    flags.DEFINE_string("inception", None, "The FID Inception: pytorch-fid's weights as .safetensors "
                        "(python -m dpdmd_jax.weights.inception --pth=... --out=...).")
    flags.DEFINE_string("fid_reference", None, "FID reference: a sample folder (FID-T if the teacher made it), a "
                        "folder of images, or a .npz of mu / sigma (clean-fid / pytorch-fid). Default: the teacher's "
                        "folder among --samples.")
    flags.DEFINE_string("save_fid_stats", None, "Write the FID reference's statistics to this .npz.")
    flags.DEFINE_string("pickscore", None, "A transformers CLIPModel folder (PickScore_v1).")
    flags.DEFINE_string("pickscore_processor", None, "Its processor folder (tokenizer, preprocessor_config.json); "
                        "default: --pickscore.")
    flags.DEFINE_string("hpsv2", None, "HPSv2 / HPSv2.1 open_clip weights as .safetensors "
                        "(python -m dpdmd_jax.weights.open_clip --pt=... --out=...).")
    flags.DEFINE_string("hpsv2_tokenizer", None, "A CLIPTokenizer folder with OpenAI CLIP's BPE (e.g. a pipeline's "
                        "tokenizer/), for --hpsv2.")
    flags.DEFINE_string("out", None, "Folder for the comparison table (default: the first sample folder).")
    flags.DEFINE_integer("per_device_batch", 8, "Images per device per batch of tower features.")
    flags.mark_flags_as_required(["samples"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    evaluate(FLAGS.samples, FLAGS.names, clip=FLAGS.clip, dino=FLAGS.dino, out=FLAGS.out,
             per_device_batch=FLAGS.per_device_batch, inception=FLAGS.inception, fid_reference=FLAGS.fid_reference,
             save_fid_stats=FLAGS.save_fid_stats, pickscore=FLAGS.pickscore,
             pickscore_processor=FLAGS.pickscore_processor, hpsv2=FLAGS.hpsv2, hpsv2_tokenizer=FLAGS.hpsv2_tokenizer)


if __name__ == "__main__":
    define_flags()
    cli.run(main, user_errors=(EvaluateError, CheckpointError, FIDError, FileNotFoundError))
