r"""Export a distilled student as a complete diffusers pipeline folder (a LoRA student: a LoRA folder).

    python -m dpdmd_jax.export --workdir=runs/sd35 --out=exports/sd35_student \
        [--step=N] [--dtype=bfloat16] [--link=copy|symlink|hardlink] [--merged]

The config is the one the run recorded (`WORKDIR/config.json`, `dpdmd_jax.run_config`) unless
`--config=FILE` names one; `--config.FIELD=VALUE` overrides apply on top, and one that changes what the
checkpoints mean is refused, naming the field. Bad input exits with code 2 and one message.

The folder is the teacher's pipeline (`model.source`, or `text.source` for the text side) with our
student as its `transformer/` (SD3) or `unet/` (SDXL) and a scheduler whose 4-step grid is the
student's: SD3 keeps `FlowMatchEulerDiscreteScheduler` (its `set_timesteps(4)` gives the student's
sigmas at the teacher's shift); SDXL gets `LCMScheduler` with `original_inference_steps` = the
number of student steps, whose `set_timesteps(4)` gives (999, 749, 499, 249) and whose step is the
student's (predict x0, re-noise to the next timestep; its boundary-condition weights at these
timesteps are 1 - 2e-8 and 4e-8). `StableDiffusion3Pipeline` / `StableDiffusionXLPipeline
.from_pretrained(out)` load it as is. Their `__call__` signatures fix the default steps (28 / 50)
and CFG (7 / 5), which no config file can change, so sample the student with

    pipe(prompt, num_inference_steps=4, guidance_scale=1.0)

(`dpdmd_student.json` in the folder records these call arguments, the grid, the source run and
step). A student grid the stock scheduler cannot express (e.g. `configs/toy.py:wide`-style sigmas)
is recorded there as `sigmas` / `timesteps` call arguments instead. The toy (`model.source=toy`, or
random test weights) has no pipeline: its export is the student's `transformer/` or `unet/` folder (diffusers
`SD3Transformer2DModel` / `UNet2DConditionModel`) and the scheduler. The folder is written under a
temporary name and renamed, and an existing `--out` is never overwritten.

A LoRA run (`student.lora.rank` > 0) exports a LoRA folder for the teacher's pipeline (`weights.lora`):
`pytorch_lora_weights.safetensors` (scale alpha / rank folded into lora_B), the student's `scheduler/`,
and in `dpdmd_student.json` the recipe: `pipe = StableDiffusion3Pipeline.from_pretrained(teacher)`,
`pipe.load_lora_weights(out)`, `pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out,
subfolder="scheduler")` (SDXL: `StableDiffusionXLPipeline`, `LCMScheduler`), then the call above.
`--merged` writes the full pipeline instead, the adapters merged into the kernels (W + scale A B, fp32).
`python -m dpdmd_jax.sample --lora=out` samples a LoRA folder with our sampler.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from dpdmd_jax import cli, run_config
from dpdmd_jax.config import ConfigError
from dpdmd_jax.core import TrainingError
from dpdmd_jax.run.export import export_student
from dpdmd_jax.weights.export import DENOISERS, ExportError
from dpdmd_jax.weights.safetensors_io import CheckpointError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program, so importing the module defines no flags)."""
    config_flags.DEFINE_config_file("config", None, "The training run's config file (default: the config the run "
                                    "recorded in --workdir, its config.json).", lock_config=True)
    flags.DEFINE_string("workdir", None, "The training run's workdir (its checkpoints and recorded config).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "The pipeline folder to write (must not exist).")
    flags.DEFINE_string("dtype", "float32", "dtype of the exported student weights (float32, bfloat16, float16).")
    flags.DEFINE_enum("link", "copy", ["copy", "symlink", "hardlink"],
                      "How the teacher's other components (text encoders, VAE, tokenizers) get into --out.")
    flags.DEFINE_bool("merged", False, "A LoRA run: write the full pipeline, adapters merged into the kernels, "
                      "instead of the LoRA folder.")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.config is None:  # `run_config` makes the run's record the default: there is none
        run_config.read_record(FLAGS.workdir)  # says why
        raise cli.UsageError(f"--workdir={FLAGS.workdir}: pass the run's --config=FILE")
    try:
        out = export_student(FLAGS.config, FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                             link=FLAGS.link, merged=FLAGS.merged)
    except (ExportError, ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        raise cli.UsageError(str(e)) from e
    with open(os.path.join(out, "dpdmd_student.json")) as f:
        meta = json.load(f)
    call = meta["call"]
    if "load" in meta:  # a LoRA folder: its diffusers recipe
        print(f"Exported the student's LoRA to {out}. Load it with diffusers:\n  " + "\n  ".join(meta["load"]))
        return
    if not os.path.exists(os.path.join(out, "model_index.json")):  # the toy: a model folder, no pipeline
        cls = "UNet2DConditionModel" if FLAGS.config.backbone == "unet" else "SD3Transformer2DModel"
        print(f"Exported to {out}: diffusers {cls}.from_pretrained({out!r}, subfolder="
              f"{DENOISERS[FLAGS.config.backbone]!r}) loads the student; scheduler/ holds its 4-step grid.")
        return
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    print(f"Exported to {out}. Sample it with diffusers:\n  pipe = DiffusionPipeline.from_pretrained({out!r})\n"
          f"  image = pipe(prompt, {args}).images[0]")


if __name__ == "__main__":
    run_config.use_recorded_config()
    define_flags()
    cli.run(main, user_errors=(ExportError, run_config.RecordError))
