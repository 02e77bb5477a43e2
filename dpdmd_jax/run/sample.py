"""The sample command's job: build the run a config describes, take its student (a checkpoint of a
training run, or a diffusers LoRA of one over the teacher) or its teacher, and sample prompts x seeds
into a folder (`sampling.sampler`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

from dpdmd_jax import data as data_lib
from dpdmd_jax.core import Adapted, Params
from dpdmd_jax.distill import adapters
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import workdir as workdir_lib
from dpdmd_jax.run.preflight import workdir_problems
from dpdmd_jax.sampling.folder import SampleError
from dpdmd_jax.sampling.sampler import check_pairs, prompt_list, sample_with
from dpdmd_jax.weights import lora as lora_io


def load_student(run: setup_lib.Run, workdir: str | None, step: int | None,
                 lora: str | None = None) -> tuple[Params, str]:
    """(student weights, source description): a run's checkpoint (with LoRA: the run's base plus the
    checkpoint's adapters, `Distiller.weights`), the base plus the diffusers LoRA folder `lora`, or
    model.source's weights."""
    if lora:
        if step is not None:
            raise SampleError("--step picks a checkpoint of --workdir; --lora samples its LoRA folder instead: "
                              "drop one of them")
        return lora_student(run, lora), f"lora={lora}"
    if not workdir:
        if step is not None:
            raise SampleError("--step needs --workdir (the run whose checkpoint to sample)")
        return run.frozen.teacher, f"model.source={run.config.model.source}"
    workdir = workdir_lib.absolute(workdir)
    if not (epath.Path(workdir) / workdir_lib.CHECKPOINTS).is_dir():  # epath: the workdir may be gs://
        raise SampleError(f"--workdir={workdir} holds no checkpoints/ folder: is it a training run's workdir?")
    mngr = workdir_lib.checkpoint_manager(workdir, run.config)
    steps = sorted(mngr.all_steps())
    if not steps:
        raise SampleError(f"{workdir} has no checkpoint yet; train first (python -m dpdmd_jax.main).")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise SampleError(f"--step={step}: {workdir} has checkpoints at steps {steps}, not {step}.")
    student = workdir_lib.restore_student(mngr, chosen, setup_lib.abstract_student(run))
    mngr.close()
    return run.distiller.weights("student", student, run.frozen), f"{workdir}/checkpoints/{chosen}"


def lora_student(run: setup_lib.Run, folder: str) -> Adapted:
    """The teacher plus a diffusers LoRA of the student (`python -m dpdmd_jax.export`'s folder, or one
    diffusers saved), as the config's `student.lora` (rank, targets) shapes its adapters
    (`weights.lora.load_lora`; the alpha does not change what the adapters compute)."""
    c = run.config
    if "student" not in run.distiller.adapters:
        raise SampleError(f"--lora={folder}: the config's student.lora.rank is 0; set --config.student.lora.rank "
                          "(and .targets) to the LoRA's, or pass the run's --workdir (its recorded config)")
    template = run.distiller.adapters["student"][1]
    state = lora_io.load_lora(folder, c.backbone, run.teacher_model.cfg, template,
                              adapters.alpha(c, "student") / adapters.rank(c, "student"),
                              shardings=mesh_lib.state_shardings(template, run.mesh, run.rules))
    return run.distiller.weights("student", state, run.frozen)


def sample(c: ml_collections.ConfigDict, out: str, *, workdir: str | None = None, step: int | None = None,
           sampler: str = "student", prompt_file: str | None = None, prompt_column: str = "",
           num_prompts: int | None = None, seeds: int = 9, seed: int = 0, per_device_batch: int = 4,
           vae_dtype: str = "float32", devices: Sequence[Any] | None = None, lora: str | None = None,
           pairs: bool = False) -> dict:
    """Samples prompts x `seeds` images into `out` (resumably) on `devices` (default: all); returns a
    summary dict (`preempted`: a SIGTERM stopped it early, and a re-run finishes). `prompt_column`:
    the prompt field of a structured `prompt_file` ("" = the config's data.prompt_column, else auto).
    `lora`: a diffusers LoRA folder of the student, sampled over the teacher instead of a checkpoint.
    `pairs` (--sampler=teacher): `out` also keeps what makes it a pair cache for DMD v1's regression
    (`data.pairs`): each image's latents and each prompt's conditioning."""
    if seeds < 1 or per_device_batch < 1:
        raise SampleError(f"--seeds={seeds} and --per_device_batch={per_device_batch} must be >= 1")
    check_pairs(sampler, pairs)
    if sampler == "teacher" and (workdir or lora):
        raise SampleError("--sampler=teacher samples the config's model.source; drop --workdir and --lora")
    out = workdir_lib.absolute(out)
    problems = workdir_problems(out, flag="--out")  # before any model is loaded
    if problems:
        raise SampleError(" ".join(problems))
    if workdir:  # the run's config must be this one (before any prompt-source change below)
        workdir_lib.check_workdir_config(workdir_lib.absolute(workdir), c, write=False)
    column = prompt_column or c.data.prompt_column
    c = data_lib.for_prompt_file(c, prompt_file)  # a copy
    if prompt_file:  # the column goes with the file: a pipeline's text source reads the file too
        c.data.prompt_column = column
    c.regression.pairs = ""  # sampling reads no pair cache (and may be writing this run's)
    run = setup_lib.build(c, devices)
    prompts = prompt_list(run.data, prompt_file, column)[:num_prompts]
    if not prompts:
        raise SampleError("no prompts to sample")
    params, source = load_student(run, workdir, step, lora) if sampler == "student" else (
        run.frozen.teacher, f"model.source={c.model.source}")
    return sample_with(run, params, source, out, prompts, sampler=sampler, seeds=seeds, seed=seed,
                       per_device_batch=per_device_batch, vae_dtype=vae_dtype, stop_on_sigterm=True,
                       pairs=pairs)
