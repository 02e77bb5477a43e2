"""The sampler on several processes for every backbone: on the tiny SD3 and SDXL pipelines
(`dpdmd_jax.tools.tiny_pipeline`), two processes with 4 of the 8 virtual devices each sample with the
teacher (its CFG, the text encoders, the VAE); and the jitted sample function closes over no array
(on several processes JAX refuses to embed one that spans other hosts' devices: the MMDiT's position
table did, and two-process SD3 sampling crashed at every compile)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from configs import toy as toy_config
from dpdmd_jax.sampling import folder as sampling_folder
from dpdmd_jax.sampling import sampler as sampling_sampler
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.tools.tiny_pipeline import make_tiny_pipeline
from tests.test_sample import _free_port, _wait_all, launch_process, rows

CONFIGS = {"sd3": "configs/sd35.py:tiny", "sdxl": "configs/sdxl.py:tiny"}
PROMPTS = ["the cat on the sea", "photo of a blue house"]


@pytest.mark.parametrize("backbone", ["mmdit", "unet"])
def test_the_sample_function_closes_over_no_array(backbone):
    """Every frozen array (the model's buffers, such as the MMDiT's position table) is an argument of
    the jitted sampler, for the student and the teacher: traced, its program holds no jax.Array
    constant (numpy constants, such as the step grid, are fine: every process has them)."""
    c = toy_config.get_config("smoke" if backbone == "mmdit" else "unet")
    setup = setup_lib.build(c)
    assert jax.tree.leaves(setup.frozen.buffers) or backbone == "unet"  # the MMDiT has some to close over
    put = lambda x: mesh_lib.global_batch(setup.mesh, np.asarray(x))
    cond = jax.tree.map(put, setup.data.embed(np.zeros(8, np.int32)))
    ids = put(np.arange(8, dtype=np.int32))
    for sampler in ("student", "teacher"):
        fn = sampling_sampler.make_sample_fn(setup, sampler, root_seed=0)
        traced = fn.func.jitted.trace(*fn.args, setup.frozen.teacher, ids, ids, cond, cond)
        closed = [x.shape for x in traced.jaxpr.consts if isinstance(x, jax.Array)]
        assert not closed, f"{sampler} sampler closes over arrays of shapes {closed}"


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_two_processes_sample_a_pipeline(family, tmp_path):
    root = str(tmp_path / "pipe")
    make_tiny_pipeline(root, family=family)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out, port = str(tmp_path / "samples"), _free_port()
    logs = [str(tmp_path / f"process{i}") for i in (0, 1)]
    # No --workdir: the teacher of model.source (the student path differs only in its grid and no CFG).
    flags = [f"--config={CONFIGS[family]}", f"--config.model.source={root}", "--sampler=teacher",
             f"--prompt_file={prompts}", "--seeds=2", "--per_device_batch=1", f"--out={out}"]
    procs = [launch_process(flags, port, i, logs[i]) for i in (0, 1)]
    _wait_all(procs, timeout_s=540)
    for i, p in enumerate(procs):
        err = open(logs[i] + ".err").read()
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    assert f"4 images in {out} (4 made now)" in open(logs[0] + ".out").read()
    r = rows(out)
    assert sorted((x["prompt"], x["seed"]) for x in r) == sorted((p, s) for p in PROMPTS for s in range(2))
    assert r[0]["sampler"] == "teacher" and r[0]["cfg_scale"] > 1
    for x in r:
        assert sampling_folder.readable_png(os.path.join(out, "images", x["file"]))
