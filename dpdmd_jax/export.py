r"""Export a distilled student as a complete diffusers pipeline folder.

    python -m dpdmd_jax.export --workdir=runs/sd35 --out=exports/sd35_student \
        [--step=N] [--dtype=bfloat16] [--link=copy|symlink|hardlink]

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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from absl import flags
from ml_collections import config_flags

from dpdmd_jax import cli, run_config

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
    flags.mark_flags_as_required(["workdir", "out"])


DENOISERS = {"mmdit": "transformer", "unet": "unet"}


class ExportError(ValueError):
    """Bad export input; the message says what to fix."""


def student_scheduler(backbone: str, grid, teacher_scheduler: dict) -> tuple[dict, dict]:
    """(scheduler config.json, pipeline call kwargs) that sample `grid` (the student's levels,
    ending clean) with the stock diffusers scheduler of the backbone's pipeline."""
    import numpy as np

    steps = len(grid) - 1
    call: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=1.0)
    if backbone == "mmdit":
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = {k: v for k, v in teacher_scheduler.items() if not k.startswith("_")}
        config["use_dynamic_shifting"] = False  # the student's grid does not move with resolution
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        if not np.allclose(scheduler.sigmas.numpy(), grid, rtol=0, atol=1e-6):
            call["sigmas"] = [float(x) for x in grid[:-1]]  # the pipeline's `sigmas=` argument
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dict(scheduler.config)}, call
    from diffusers import LCMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "steps_offset", "clip_sample", "clip_sample_range", "thresholding", "rescale_betas_zero_snr")
    config = {k: teacher_scheduler[k] for k in keep if k in teacher_scheduler}
    scheduler = LCMScheduler.from_config(dict(config, original_inference_steps=steps, timestep_spacing="leading",
                                              set_alpha_to_one=True))
    scheduler.set_timesteps(steps)
    if [int(t) for t in scheduler.timesteps] != [int(t) for t in grid[:-1]]:
        call["timesteps"] = [int(t) for t in grid[:-1]]
    return {"_class_name": "LCMScheduler", **dict(scheduler.config)}, call


def _copy_component(src: str, dst: str, link: str) -> None:
    if link == "symlink":
        os.symlink(os.path.abspath(src), dst)
    elif os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=os.link if link == "hardlink" else shutil.copy2)
    else:
        (os.link if link == "hardlink" else shutil.copy2)(src, dst)


# The toy's schedules as diffusers scheduler configs (it has no pipeline folder to take them from).
TOY_SCHEDULERS = {"mmdit": dict(num_train_timesteps=1000),
                  "unet": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear", prediction_type="epsilon")}


def toy_scheduler(c: Any) -> dict:
    """The teacher scheduler config of a run without a pipeline (toy / random models): the flow
    grid at the run's own shift (the toy default's is 0.375), or the VP schedule."""
    config = dict(TOY_SCHEDULERS[c.backbone])
    if c.backbone == "mmdit":
        config["shift"] = float(c.teacher.shift)
    return config


def write_student_pipeline(backbone: str, root: str | None, out: str, write_denoiser: Callable[[str], None], grid,
                           meta: dict, link: str = "copy", teacher_scheduler: dict | None = None) -> str:
    """`root`'s pipeline with the student's denoiser (`write_denoiser(folder)` writes it) and the
    student's scheduler, written to a temporary sibling of `out` and renamed into place. Without a
    `root` (the toy) the folder holds the denoiser and the scheduler only, the latter made from
    `teacher_scheduler` (`toy_scheduler`)."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise ExportError(f"--out={out} exists; exports never overwrite: choose a new folder or remove it.")
    denoiser = DENOISERS[backbone]
    index = None
    if root is None:
        if teacher_scheduler is None:
            raise ExportError("a pipeline without a root folder needs its teacher_scheduler (export.toy_scheduler)")
    else:
        with open(os.path.join(root, "model_index.json")) as f:
            index = json.load(f)
        with open(os.path.join(root, "scheduler", "scheduler_config.json")) as f:
            teacher_scheduler = json.load(f)
    scheduler, call = student_scheduler(backbone, grid, teacher_scheduler)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        for name in sorted(os.listdir(root)) if root else []:
            if name in (denoiser, "scheduler", "model_index.json") or name.startswith("."):
                continue
            _copy_component(os.path.join(root, name), os.path.join(tmp, name), link)
        write_denoiser(os.path.join(tmp, denoiser))
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f, indent=2)
        if index is not None:
            index["scheduler"] = ["diffusers", scheduler["_class_name"]]
            with open(os.path.join(tmp, "model_index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "dpdmd_student.json"), "w") as f:
            json.dump(dict(meta, teacher=root, student_grid=[float(x) for x in grid], call=call), f, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out


def export_student(c: Any, workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
                   link: str = "copy", setup: Any = None) -> str:
    """Writes the student of `workdir` (checkpoint `step`, default latest) as a diffusers pipeline
    folder at `out`; returns `out`. `setup`: the run's trainer `Setup` if already built."""
    from flax import nnx

    from dpdmd_jax.distill import trainer
    from dpdmd_jax.sample import SampleError, load_student

    workdir = os.path.abspath(os.path.expanduser(workdir))
    run_config.check_workdir_config(workdir, c, write=False)  # first: the other checks assume the run's config
    if c.backbone not in DENOISERS:
        raise ExportError(f"backbone {c.backbone!r}: export writes diffusers pipelines of {tuple(DENOISERS)}")
    if os.path.exists(os.path.abspath(os.path.expanduser(out))):
        raise ExportError(f"--out={out} exists; exports never overwrite: choose a new folder or remove it.")
    from dpdmd_jax.preflight import workdir_problems

    problems = workdir_problems(os.path.abspath(os.path.expanduser(out)), flag="--out")
    if problems:
        raise ExportError(" ".join(problems))
    if not c.model.source:
        raise ExportError("model.source is empty: set it to the teacher the run distilled")
    setup = setup or trainer.build(c)
    try:
        params, source = load_student(setup, workdir, step)
    except SampleError as e:
        raise ExportError(str(e)) from e
    model = nnx.merge(setup.distiller.graphdef, params, setup.frozen.buffers)
    if c.backbone == "mmdit":
        from dpdmd_jax.weights.sd3 import save_mmdit as save
    else:
        from dpdmd_jax.weights.unet import save_unet as save
    builtin = c.model.source == "toy" or c.model.source.startswith("random")
    root = None if builtin else setup.backbone.pipeline_root  # the toy / random models have no pipeline
    return write_student_pipeline(c.backbone, root, out,
                                  lambda folder: save(model, folder, dtype=dtype), setup.distiller.student_grid,
                                  dict(source=source, dtype=dtype), link, toy_scheduler(c) if builtin else None)


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from dpdmd_jax.config import ConfigError
    from dpdmd_jax.distill.trainer import TrainingError
    from dpdmd_jax.weights.safetensors_io import CheckpointError

    if FLAGS.config is None:  # `run_config` makes the run's record the default: there is none
        run_config.read_record(FLAGS.workdir)  # says why
        raise cli.UsageError(f"--workdir={FLAGS.workdir}: pass the run's --config=FILE")
    try:
        out = export_student(FLAGS.config, FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                             link=FLAGS.link)
    except (ExportError, ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        raise cli.UsageError(str(e)) from e
    with open(os.path.join(out, "dpdmd_student.json")) as f:
        call = json.load(f)["call"]
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
