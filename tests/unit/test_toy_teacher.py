"""The shipped toy teachers (flow MMDiT, epsilon UNet) have the toy architectures; the UNet toy's data
source makes SDXL conditioning; a missing teacher says how to train one. (Everything that runs the
shipped teachers, and their training entry point: tests/integration/test_toy_teacher.py.)"""

import importlib.util
import os

import numpy as np
import pytest

from dpdmd_jax.toy import teacher
from tests.helpers import REPO


@pytest.fixture(scope="module")
def toy_teacher():
    return teacher.load_toy_teacher()


def test_shipped_teacher_is_the_toy_architecture(toy_teacher):
    assert toy_teacher.cfg.to_diffusers() == teacher.toy_config().to_diffusers()
    assert os.path.getsize(os.path.join(teacher.TEACHER_DIR, "diffusion_pytorch_model.safetensors")) < 8e6


@pytest.fixture(scope="module")
def unet_teacher():
    return teacher.load_toy_teacher(family="unet")


def test_shipped_unet_teacher_is_the_toy_unet_architecture(unet_teacher):
    assert unet_teacher.cfg.to_diffusers() == teacher.toy_unet_config().to_diffusers()
    assert os.path.getsize(os.path.join(teacher.TEACHER_DIRS["unet"], "diffusion_pytorch_model.safetensors")) < 8e6


def test_toy_source_makes_sdxl_conditioning_for_the_unet_toy():
    from configs import toy as toy_configs
    from dpdmd_jax import backbones
    from dpdmd_jax.data.toy import ToySource

    c = toy_configs.get_config("unet")
    backbone = backbones.get(c)
    assert backbone.check_source() == [] and backbone.cond_type is backbones.SDXLCond
    batch = ToySource(c, backbone).round(3, slice(2, 6))
    m = c.distill.fake_updates_per_student + 1
    assert batch.cond.context.shape == (m, 4, 4, 32) and batch.cond.text_embeds.shape == (m, 4, 32)
    np.testing.assert_array_equal(batch.cond.time_ids, np.broadcast_to(teacher.TOY_TIME_IDS, (m, 4, 6)))
    assert not batch.uncond.context.any() and not batch.uncond.text_embeds.any()
    np.testing.assert_array_equal(batch.uncond.time_ids, np.broadcast_to(teacher.TOY_TIME_IDS, (4, 6)))
    ids = ToySource(c, backbone).class_ids(3)[:, 2:6]
    want = teacher.toy_cond(ids, backbones.SDXLCond, 32, 32)
    np.testing.assert_array_equal(batch.cond.context, want.context)
    assert c.distill.target == "denoise" and backbone.schedule.prediction == "eps"


def test_load_toy_teacher_missing_folder_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_teacher"):
        teacher.load_toy_teacher(tmp_path / "nothing")


def _load_config(arg):
    spec = importlib.util.spec_from_file_location("toy_teacher_config", os.path.join(REPO, "configs", "toy_teacher.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
