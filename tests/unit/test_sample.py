"""The batch sampler in this process: a run's student (or the teacher) -> PNGs + grids + one JSONL
row per image; identical images on 2 and 8 devices and any batch; bad input is refused before
sampling; a rerun remakes truncated PNGs. On the tiny VP backbone with the toy's prompts, so the
stochastic (re-noising) student, the hardest case for determinism, is the one checked. (Several
processes, kills and signals, the command line: tests/integration/test_sample_cli.py.)"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import toy as toy_config
from dpdmd_jax.run import sample as run_sample
from dpdmd_jax.sampling import folder as sampling_folder
from dpdmd_jax.config import override
from dpdmd_jax.run import train as run_train


OVERRIDES = {"backbone": "tiny_vp", "distill.target": "denoise", "evals": {}, "num_rounds": 2,
             "checkpoint_every": 1, "data.latent_size": (8, 8)}


def config():
    c = override(toy_config.get_config("smoke"), OVERRIDES)
    return c


def train_run(workdir: str) -> str:
    """The run the sampler tests read: 2 rounds of the tiny VP student, a checkpoint each round."""
    run_train.train(config(), workdir)
    return workdir


def pngs(folder: str) -> dict[str, np.ndarray]:
    d = os.path.join(folder, "images")
    return {n: np.asarray(Image.open(os.path.join(d, n))) for n in sorted(os.listdir(d))}


def assert_same_images(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same images from another batch or device layout, up to 8-bit quantization: that layout may
    sum XLA's reductions in another order, and a value on a rounding boundary then moves one level (seen
    on an AMD EPYC with AVX-512: 1 channel of 1 pixel in 18 images; bit-equal on the machines before).
    Another noise or prompt for an image would change most of its pixels by far more. (A rerun of the
    same layout is the same program: compare those bit for bit.)"""
    assert list(got) == list(want)
    diff = np.stack([np.abs(got[n].astype(int) - want[n]) for n in want])
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 4, (diff.max(), np.count_nonzero(diff))


def rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_same_images_on_2_and_8_devices_and_any_batch(run_dir, tmp_path):
    a = run_sample.sample(config(), str(tmp_path / "d8"), workdir=run_dir, seeds=3, per_device_batch=1)
    b = run_sample.sample(config(), str(tmp_path / "d2"), workdir=run_dir, seeds=3, per_device_batch=1,
                          devices=jax.devices()[:2])
    c = run_sample.sample(config(), str(tmp_path / "d2b3"), workdir=run_dir, seeds=3, per_device_batch=3,
                          devices=jax.devices()[:2])
    assert a["images"] == b["images"] == c["images"] == 18 and a["rows"] == 18
    ia, ib, ic = pngs(a["out"]), pngs(b["out"]), pngs(c["out"])
    assert list(ia) == [f"p{p:05d}_s{s:03d}.png" for p in range(6) for s in range(3)]
    assert_same_images(ib, ia)
    assert_same_images(ic, ia)
    # Seeds differ, and so do the images of one prompt (the student's noise really is per image).
    assert not np.array_equal(ia["p00000_s000.png"], ia["p00000_s001.png"])
    r = rows(a["out"])
    assert [(x["prompt_index"], x["seed"]) for x in r] == [(p, s) for p in range(6) for s in range(3)]
    assert r[0]["prompt"] == "red square" and r[0]["sampler"] == "student" and r[0]["nfe"] == 4
    assert r[0]["grid"] == [999.0, 749.0, 499.0, 249.0, -1.0] and r[0]["cfg_scale"] == 1.0
    assert r[0]["source"].endswith("checkpoints/2") and r[0]["seconds"] > 0
    grid = np.asarray(Image.open(os.path.join(a["out"], "grids", "p00005.png")))
    np.testing.assert_array_equal(grid, np.concatenate([ia[f"p00005_s{s:03d}.png"] for s in range(3)], axis=1))


def test_teacher_sampler_and_bad_input(run_dir, tmp_path):
    t = run_sample.sample(config(), str(tmp_path / "teacher"), sampler="teacher", seeds=2, num_prompts=2)
    r = rows(t["out"])
    assert len(r) == 4 and r[0]["sampler"] == "teacher" and r[0]["steps"] == 4 and r[0]["nfe"] == 8
    assert r[0]["cfg_scale"] == 3.5 and r[0]["source"] == "model.source=random"
    # A folder made with other settings is refused, and left as it was.
    with pytest.raises(sampling_folder.SampleError, match="other settings"):
        run_sample.sample(config(), t["out"], workdir=run_dir, seeds=2, num_prompts=2)
    with pytest.raises(sampling_folder.SampleError, match=r"checkpoints at steps \[1, 2\], not 7"):
        run_sample.sample(config(), str(tmp_path / "x"), workdir=run_dir, step=7)
    with pytest.raises(sampling_folder.SampleError, match="no checkpoints/ folder"):
        run_sample.sample(config(), str(tmp_path / "x"), workdir=str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(sampling_folder.SampleError, match="prompt_file"):
        run_sample.sample(config(), str(tmp_path / "x"), prompt_file=str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_text("red square\na purple cat\n")
    with pytest.raises(sampling_folder.SampleError, match="purple cat"):
        run_sample.sample(config(), str(tmp_path / "x"), prompt_file=str(bad))
    with pytest.raises(sampling_folder.SampleError, match="drop --workdir"):
        run_sample.sample(config(), str(tmp_path / "x"), workdir=run_dir, sampler="teacher")
    # A different training config than the run's is refused before anything is sampled.
    other = override(config(), {"distill.anchor_k": 3})
    with pytest.raises(Exception, match="different config"):
        run_sample.sample(other, str(tmp_path / "x"), workdir=run_dir)
    assert not os.path.exists(tmp_path / "x")


def _check_whole(out: str) -> list[dict]:
    """The folder as a stopped sampler must leave it: only whole PNGs, exactly one row for each."""
    names = sorted(os.listdir(os.path.join(out, "images")))
    assert names and all(n.endswith(".png") for n in names), names  # no temporary files left
    assert all(sampling_folder.readable_png(os.path.join(out, "images", n)) for n in names)
    r = rows(out)
    assert sorted(x["file"] for x in r) == names
    return r


def test_a_rerun_remakes_truncated_pngs_and_keeps_the_bad_files_aside(run_dir, tmp_path):
    out = str(tmp_path / "samples")
    first = run_sample.sample(config(), out, workdir=run_dir, seeds=2, per_device_batch=1)
    assert first["rows"] == 12
    before = pngs(out)
    image, grid = os.path.join(out, "images", "p00003_s001.png"), os.path.join(out, "grids", "p00003.png")
    for path, keep in ((image, 0.5), (grid, 0.99)):  # cut in the pixel data; cut in the closing chunk
        data = open(path, "rb").read()
        open(path, "wb").write(data[: int(len(data) * keep)])
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        f.write('{"prompt": "red sq')  # a row torn by a kill
    again = run_sample.sample(config(), out, workdir=run_dir, seeds=2, per_device_batch=1)
    assert again["made"] == 1 and again["rows"] == 12
    after = pngs(out)
    assert list(after) == list(before)
    for name in before:  # the remade image is the one that was lost; no other was touched
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert sorted(os.listdir(os.path.join(out, "corrupt"))) == ["p00003.png", "p00003_s001.png"]
    _check_whole(out)
    assert sampling_folder.readable_png(grid)
    assert np.asarray(Image.open(grid)).shape[1] == 2 * before["p00003_s001.png"].shape[1]
