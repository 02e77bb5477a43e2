"""A trained LoRA run through `export_student` (the smoke config's random scanned MMDiT, one round):
the default export is the LoRA folder diffusers loads onto the teacher (`load_lora_adapter` of its
file computes our student), `--merged` the whole student, the CLI prints the recipe, and
`sample --lora` reads the folder back into the run's adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from dpdmd_jax.core import Adapted
from dpdmd_jax.run import export as run_export
from dpdmd_jax.run import sample as run_sample
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import train as run_train
from dpdmd_jax.weights.export import ExportError
from dpdmd_jax.weights.sd3 import save_mmdit
from tests.helpers import REPO, built_once
from tests.torch_helpers import rel_err, sd3_torch_kwargs
from tests.unit.test_lora import lora_smoke

# alpha 8 at rank 4: scale 2, which the file's lora_B must carry; sharded over the 8 devices (fsdp).
SETTINGS = {"student.lora.alpha": 8.0, "num_rounds": 1, "checkpoint_every": 1, "mesh.fsdp": -1}


def _inputs(run) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    spec = run.backbone.cond_spec(2)
    return dict(latents=rng.standard_normal((2, *run.distiller.latent_shape), np.float32),
                timesteps=np.array([900.0, 120.5], np.float32),
                context=rng.standard_normal(spec.context.shape, np.float32),
                pooled=rng.standard_normal(spec.pooled.shape, np.float32))


def _torch(model, x) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(**sd3_torch_kwargs(x))[0].numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    c = lora_smoke(**SETTINGS)
    # Trained once whichever worker asks first (the module's tests may run on both).
    workdir = str(built_once(tmp_path_factory, "lora_run", lambda folder: run_train.train(c, str(folder))))
    return c, workdir, setup_lib.build(c)


def test_lora_run_exports_the_lora_diffusers_loads_and_the_merged_student(trained, tmp_path):
    from diffusers import SD3Transformer2DModel

    c, workdir, run = trained
    student, _ = run_sample.load_student(run, workdir, None)
    assert isinstance(student, Adapted)
    out = run_export.export_student(c, workdir, str(tmp_path / "lora"), run=run)
    assert sorted(os.listdir(out)) == ["dpdmd_student.json", "pytorch_lora_weights.safetensors", "scheduler"]
    with open(os.path.join(out, "dpdmd_student.json")) as f:
        meta = json.load(f)
    assert meta["lora"]["rank"] == 4 and meta["lora"]["scale"] == 2.0 and meta["call"]["num_inference_steps"] == 4
    recipe = f"model.load_lora_adapter({out!r}, prefix='transformer', use_safetensors=True)"
    assert meta["load"][0].startswith(recipe)  # no pipeline behind model.source="random": the model's own call
    with pytest.raises(ExportError, match="exists; exports never overwrite"):
        run_export.export_student(c, workdir, out, run=run)
    merged = run_export.export_student(c, workdir, str(tmp_path / "merged"), merged=True, run=run)
    assert sorted(os.listdir(merged)) == ["dpdmd_student.json", "scheduler", "transformer"]

    # The teacher in diffusers plus the exported LoRA = the merged export = our student. One round
    # moves B little (the outputs differ by ~1e-4), so the updates themselves are compared too.
    x = _inputs(run)
    forward = jax.jit(lambda m, x: m(x["latents"], x["timesteps"], x["context"], x["pooled"]))
    ours = np.asarray(forward(nnx.merge(student.graphdef, student.adapters, student.base, run.frozen.buffers), x))
    ours_base = np.asarray(forward(run.teacher_model, x))
    teacher = SD3Transformer2DModel.from_pretrained(save_mmdit(run.teacher_model, tmp_path / "teacher"))
    base = _torch(teacher, x)
    teacher.load_lora_adapter(out, prefix="transformer", use_safetensors=True)  # the recipe's call
    with_lora = _torch(teacher, x)
    print(f"the trained LoRA moved the output by {rel_err(with_lora, base):.2e}; update rel err "
          f"{rel_err(with_lora - base, ours - ours_base):.2e}")
    assert rel_err(with_lora, ours) <= 1e-5
    assert rel_err(with_lora - base, ours - ours_base) <= 2e-2  # the update itself, scale 2 included
    from_merged = _torch(SD3Transformer2DModel.from_pretrained(os.path.join(merged, "transformer")), x)
    assert rel_err(from_merged, ours) <= 1e-5 and rel_err(from_merged - base, ours - ours_base) <= 2e-2

    # sample --lora: the folder back as the run's adapters, on their shardings.
    loaded = run_sample.load_student(run, None, None, lora=out)[0]
    for a, b in zip(jax.tree.leaves(loaded.adapters), jax.tree.leaves(student.adapters), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


def test_export_cli_writes_the_lora_folder_and_prints_its_recipe(trained, tmp_path):
    _, workdir, _ = trained
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "dpdmd_jax.export", f"--workdir={workdir}", f"--out={out}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Exported the student's LoRA to {out}" in done.stdout and "load_lora_adapter" in done.stdout
    assert sorted(os.listdir(out)) == ["dpdmd_student.json", "pytorch_lora_weights.safetensors", "scheduler"]
