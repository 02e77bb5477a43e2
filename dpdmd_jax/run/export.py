"""The export command's job: the student of a training run's checkpoint, written as a diffusers
pipeline folder (`weights.export`)."""

from __future__ import annotations

from typing import Any

from etils import epath
from flax import nnx

from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import workdir as workdir_lib
from dpdmd_jax.run.preflight import workdir_problems
from dpdmd_jax.run.sample import load_student
from dpdmd_jax.run_config import is_uri
from dpdmd_jax.sampling.folder import SampleError
from dpdmd_jax.weights.export import DENOISERS, ExportError, toy_scheduler, write_student_pipeline
from dpdmd_jax.weights.sd3 import save_mmdit
from dpdmd_jax.weights.unet import save_unet


def export_student(c: Any, workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
                   link: str = "copy", run: setup_lib.Run | None = None) -> str:
    """Writes the student of `workdir` (checkpoint `step`, default latest) as a diffusers pipeline
    folder at `out`; returns `out`. `run`: the run if already built (`run.setup.build`)."""
    workdir = workdir_lib.absolute(workdir)
    workdir_lib.check_workdir_config(workdir, c, write=False)  # first: the other checks assume the run's config
    if c.backbone not in DENOISERS:
        raise ExportError(f"backbone {c.backbone!r}: export writes diffusers pipelines of {tuple(DENOISERS)}")
    if is_uri(out):  # weights.export writes and renames a local folder (a URI would become ./gs:/...)
        raise ExportError(f"--out={out}: export writes a local folder; export there, then copy it (e.g. "
                          "gcloud storage cp -r). --workdir may be gs://.")
    if epath.Path(workdir_lib.absolute(out)).exists():
        raise ExportError(f"--out={out} exists; exports never overwrite: choose a new folder or remove it.")
    problems = workdir_problems(workdir_lib.absolute(out), flag="--out")
    if problems:
        raise ExportError(" ".join(problems))
    if not c.model.source:
        raise ExportError("model.source is empty: set it to the teacher the run distilled")
    run = run or setup_lib.build(c)
    try:
        params, source = load_student(run, workdir, step)
    except SampleError as e:
        raise ExportError(str(e)) from e
    model = nnx.merge(run.distiller.graphdef, params, run.frozen.buffers)
    save = save_mmdit if c.backbone == "mmdit" else save_unet
    builtin = run.backbone.builtin_source()
    root = None if builtin else run.backbone.pipeline_root  # the toy / random models have no pipeline
    return write_student_pipeline(c.backbone, root, out,
                                  lambda folder: save(model, folder, dtype=dtype), run.distiller.student_grid,
                                  dict(source=source, dtype=dtype), link, toy_scheduler(c) if builtin else None)
