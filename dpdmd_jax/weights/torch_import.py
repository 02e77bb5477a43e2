r"""Import a PyTorch `.pt` state dict of a student transformer (the method's released SD3.5-M
students are these: `torch.save(transformer.state_dict())`, loaded in its README with
`pipe.transformer.load_state_dict(..., strict=True)`) as a diffusers pipeline folder that our
sampler, evaluator and diffusers all read.

    python -m dpdmd_jax.weights.torch_import --pt=DPDMD-SD35M-4NFE-natural.pt \
        --pipeline=/ckpts/stable-diffusion-3.5-medium --out=exports/dpdmd_sd35m
    python -m dpdmd_jax.sample --config=configs/sd35.py --config.model.source=exports/dpdmd_sd35m \
        --prompt_file=prompts.txt --out=samples/dpdmd_sd35m

The file is read with `torch.load(..., weights_only=True)` only: a `.pt` that holds pickled Python
objects besides tensors is refused (unpickling arbitrary objects can run code). Its keys must be
exactly the diffusers `SD3Transformer2DModel` keys of the pipeline's transformer config (a common
`module.` / `_orig_mod.` wrapper prefix, from DDP or torch.compile, is removed); missing,
unexpected and mis-shaped keys are named before anything is written. The student's scheduler is
the default 4-step student grid (FlowMatchEuler, shift 3), as the method samples it.
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace
from typing import Any

from absl import flags

from dpdmd_jax import cli
from dpdmd_jax.config import base_config
from dpdmd_jax.weights import loader, sd3
from dpdmd_jax.weights.export import ExportError, write_student_pipeline
from dpdmd_jax.weights.pipeline import resolve_pipeline
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.sd3 import WEIGHTS_NAME, resolve_folder
from dpdmd_jax.weights.torch_files import read_pt_state_dict

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    flags.DEFINE_string("pt", None, "The .pt state dict of the student transformer.")
    flags.DEFINE_string("pipeline", None, "The teacher's diffusers StableDiffusion3Pipeline folder.")
    flags.DEFINE_string("out", None, "The student pipeline folder to write (must not exist).")
    flags.mark_flags_as_required(["pt", "pipeline", "out"])


def check_against_config(state: dict[str, Any], transformer_folder: str, what: str) -> None:
    """Names every missing, unexpected and mis-shaped key of `state` for the transformer that
    `transformer_folder`'s config.json describes (shape-only model, nothing allocated)."""
    cfg = sd3.read_config(transformer_folder)
    _, abstract_state = sd3.abstract_mmdit(cfg)
    sources = sd3.key_map(cfg, abstract_state)
    loader.validate(sources, {k: SimpleNamespace(shape=tuple(v.shape)) for k, v in state.items()}, what)


def import_pt(pt: str, pipeline: str, out: str, link: str = "copy") -> str:
    """Writes `pipeline` with the transformer of `pt` and the 4-step student scheduler to `out`."""
    from safetensors.torch import save_file  # torch, as above

    root = resolve_pipeline(pipeline)
    transformer = resolve_folder(root)
    state = read_pt_state_dict(pt)
    check_against_config(state, transformer, pt)

    def write(folder: str) -> None:
        os.makedirs(folder)
        shutil.copyfile(os.path.join(transformer, "config.json"), os.path.join(folder, "config.json"))
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, WEIGHTS_NAME))

    grid = [*base_config().student.sigmas, 0.0]  # FlowMatchEuler, 4 steps, shift 3
    return write_student_pipeline("mmdit", root, out, write, grid, dict(source=os.path.abspath(pt)), link)


def main(argv):
    del argv
    out = import_pt(FLAGS.pt, FLAGS.pipeline, FLAGS.out)
    print(f"Wrote {out}; sample it with python -m dpdmd_jax.sample --config=configs/sd35.py "
          f"--config.model.source={out} --prompt_file=PROMPTS --out=DIR")


if __name__ == "__main__":
    define_flags()
    cli.run(main, user_errors=(CheckpointError, ExportError))
