"""A student as a diffusers pipeline folder: the teacher's pipeline with the student's denoiser and a
scheduler whose grid is the student's (`python -m dpdmd_jax.export` documents the result and how
diffusers samples it). The folder is written under a temporary name and renamed; an existing one
is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np


DENOISERS = {"mmdit": "transformer", "unet": "unet"}


class ExportError(ValueError):
    """Bad export input; the message says what to fix."""


def student_scheduler(backbone: str, grid, teacher_scheduler: dict) -> tuple[dict, dict]:
    """(scheduler config.json, pipeline call kwargs) that sample `grid` (the student's levels,
    ending clean) with the stock diffusers scheduler of the backbone's pipeline."""
    # diffusers imports torch (seconds, and only the export needs it): imported here, when it runs.
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    steps = len(grid) - 1
    call: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=1.0)
    if backbone == "mmdit":
        config = {k: v for k, v in teacher_scheduler.items() if not k.startswith("_")}
        config["use_dynamic_shifting"] = False  # the student's grid does not move with resolution
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        if not np.allclose(scheduler.sigmas.numpy(), grid, rtol=0, atol=1e-6):
            call["sigmas"] = [float(x) for x in grid[:-1]]  # the pipeline's `sigmas=` argument
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dict(scheduler.config)}, call
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

    def fill(tmp: str) -> None:
        for name in sorted(os.listdir(root)) if root else []:
            if name in (denoiser, "scheduler", "model_index.json") or name.startswith("."):
                continue
            _copy_component(os.path.join(root, name), os.path.join(tmp, name), link)
        write_denoiser(os.path.join(tmp, denoiser))
        write_scheduler(tmp, scheduler)
        if index is not None:
            index["scheduler"] = ["diffusers", scheduler["_class_name"]]
            with open(os.path.join(tmp, "model_index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "dpdmd_student.json"), "w") as f:
            json.dump(dict(meta, teacher=root, student_grid=[float(x) for x in grid], call=call), f, indent=2)

    return write_new_folder(out, fill)


def write_scheduler(folder: str, scheduler: dict) -> None:
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2)


def write_new_folder(out: str, fill: Callable[[str], None]) -> str:
    """Makes the folder `out` (which must not exist) by `fill`ing a temporary sibling and renaming it
    into place: an interrupted export leaves no half-written `out`."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise ExportError(f"--out={out} exists; exports never overwrite: choose a new folder or remove it.")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out
