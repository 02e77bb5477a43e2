"""The export command's job: the student of a training run's checkpoint, written as a diffusers
pipeline folder (`weights.export`), or for a LoRA student as the LoRA folder users load onto the
teacher's pipeline (`weights.lora`; `merged=True`: the pipeline, adapters merged into the kernels)."""

from __future__ import annotations

from typing import Any

from etils import epath
from flax import nnx

from dpdmd_jax.core import Adapted
from dpdmd_jax.distill import adapters
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import workdir as workdir_lib
from dpdmd_jax.run.preflight import workdir_problems
from dpdmd_jax.run.sample import load_student
from dpdmd_jax.run_config import is_uri
from dpdmd_jax.sampling.folder import SampleError
from dpdmd_jax.weights import lora as lora_io
from dpdmd_jax.weights.export import DENOISERS, ExportError, toy_scheduler, write_student_pipeline
from dpdmd_jax.weights.sd3 import save_mmdit
from dpdmd_jax.weights.unet import save_unet


def export_student(c: Any, workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
                   link: str = "copy", merged: bool = False, run: setup_lib.Run | None = None) -> str:
    """Writes the student of `workdir` (checkpoint `step`, default latest) as a diffusers pipeline
    folder at `out`; returns `out`. A LoRA student (`student.lora.rank` > 0) is written as a LoRA
    folder for the teacher's pipeline, or with `merged` as the pipeline with the adapters merged into
    its kernels. `run`: the run if already built (`run.setup.build`)."""
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
    if merged and adapters.rank(c, "student") == 0:
        raise ExportError("--merged merges a LoRA student's adapters; this run trains the whole student, whose "
                          "export is the full pipeline already: drop --merged")
    run = run or setup_lib.build(c)
    try:
        params, source = load_student(run, workdir, step)
    except SampleError as e:
        raise ExportError(str(e)) from e
    builtin = run.backbone.builtin_source()
    root = None if builtin else run.backbone.pipeline_root  # the toy / random models have no pipeline
    meta = dict(source=source, dtype=dtype)
    if isinstance(params, Adapted):
        meta["lora"] = _lora_settings(c, run)
        if not merged:
            return _export_lora(c, run, params, out, meta, root)
        params = lora_io.merge_adapters(params.base, params.adapters, meta["lora"]["scale"])
    model = nnx.merge(run.distiller.graphdef, params, run.frozen.buffers)
    save = save_mmdit if c.backbone == "mmdit" else save_unet
    return write_student_pipeline(c.backbone, root, out,
                                  lambda folder: save(model, folder, dtype=dtype), run.distiller.student_grid,
                                  meta, link, toy_scheduler(c) if builtin else None)


def _lora_settings(c: Any, run: setup_lib.Run) -> dict:
    """The student's LoRA settings, for dpdmd_student.json; `scale` (alpha / rank) is static, in the
    adapters' graphdef, not in their state."""
    rank, alpha = adapters.rank(c, "student"), adapters.alpha(c, "student")
    targets = adapters.targets(c, "student", run.backbone)
    return dict(rank=rank, alpha=alpha, scale=alpha / rank, targets=list(targets) if targets else "all linear layers")


def _export_lora(c: Any, run: setup_lib.Run, params: Adapted, out: str, meta: dict, root: str | None) -> str:
    """The LoRA folder of a LoRA student: its adapters as `pytorch_lora_weights.safetensors` (the
    scale folded into lora_B), the student's scheduler and `dpdmd_student.json` (with its recipe)."""
    cfg, scale = run.teacher_model.cfg, meta["lora"]["scale"]
    write = lambda folder: lora_io.save_lora(c.backbone, cfg, params.adapters, folder, scale, dtype=meta["dtype"])
    return lora_io.write_lora_folder(c.backbone, out, write, run.distiller.student_grid, meta, root,
                                     toy_scheduler(c) if root is None else None)
