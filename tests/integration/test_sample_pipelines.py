"""The sampler on several processes on the tiny SD3 and SDXL pipelines
(`dpdmd_jax.tools.tiny_pipeline`): two processes with 4 of the 8 virtual devices each sample with the
teacher (its CFG, the text encoders, the VAE). (The sample function closes over no array:
tests/unit/test_sample_function.py.)"""

from __future__ import annotations

import os

import pytest

from dpdmd_jax.sampling import folder as sampling_folder
from dpdmd_jax.tools.tiny_pipeline import make_tiny_pipeline
from tests.integration.test_sample_cli import _free_port, _wait_all, launch_process
from tests.unit.test_sample import rows


CONFIGS = {"sd3": "configs/sd35.py:tiny", "sdxl": "configs/sdxl.py:tiny"}


PROMPTS = ["the cat on the sea", "photo of a blue house"]


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
