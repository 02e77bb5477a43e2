"""The trainer's inputs: bad config and prompt input fail early and clearly, sequence fields are
settable from the command line, user backbones are named by module, data rows are a pure function
of (seed, round). (Runs: sharded rounds == single device, the VP test backbone trains, CLI runs,
SIGKILL / SIGTERM, checkpoints restored across meshes and exported: tests/integration/
test_trainer_runs.py.)"""

from __future__ import annotations

import re
import sys

import jax
import numpy as np
import pytest

from configs import toy as toy_config
from dpdmd_jax.config import ConfigError, override
from dpdmd_jax.run import setup as setup_lib
from tests.helpers import REPO


def smoke(**overrides):
    return override(toy_config.get_config("smoke"), overrides)


def test_toy_default_is_the_matched_timeline_with_auto_anchor():
    """The toy default is the setting docs/benchmarks/toy-time-axis.md founds: every flow grid at SD3.5's
    1024^2 timeline moved to 16 x 16 (shift 0.375) and K chosen automatically; `:shift3` is SD3's own grid, `:shiftS`
    moves the teacher's anchor grid, the student's grid and the DMD noise grid together."""
    from dpdmd_jax.run.preflight import validate
    from dpdmd_jax.diffusion.flow import flow_match_sigmas

    c = toy_config.get_config()
    validate(c)
    assert c.teacher.shift == c.dmd.shift == toy_config.MATCHED_SHIFT == 3.0 * 16 / 128
    assert c.distill.anchor_k == "auto" and c.distill.lambda_div > 0 and c.compare_with_dmd
    np.testing.assert_array_equal(c.student.sigmas, flow_match_sigmas(4, 0.375)[:-1])
    assert c.student.sigmas[1] < 0.43  # a much larger first step than shift 3's 1 -> 0.8577
    c3 = toy_config.get_config("shift3,k5")
    validate(c3)
    assert c3.teacher.shift == c3.dmd.shift == 3.0 and c3.distill.anchor_k == 5
    np.testing.assert_array_equal(c3.student.sigmas, flow_match_sigmas(4, 3.0)[:-1])
    wide = toy_config.get_config("shift3,k30,wide")  # the most diverse setting measured on the shift-3 grid
    validate(wide)
    assert wide.distill.anchor_k == wide.teacher.steps == 30 and list(wide.student.sigmas) == [1.0, 0.75, 0.5, 0.25]
    unet = toy_config.get_config("unet")
    validate(unet)
    assert unet.backbone == "unet" and unet.distill.anchor_k == 5 and unet.distill.target == "denoise"
    with pytest.raises(ValueError, match="unknown toy config variant 'shiftx'"):
        toy_config.get_config("shiftx")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"distill.anchor_k": 0}, "distill.anchor_k=0 must lie in 1..teacher.steps=4"),
        ({"distill.anchor_k": 5}, "distill.anchor_k=5 must lie in 1..teacher.steps=4"),
        ({"distill.lambda_div": -0.1}, "distill.lambda_div=-0.1 is negative"),
        ({"backbone": "dit"}, "backbone='dit' is unknown"),
        ({"dmd.simulation": "both"}, "dmd.simulation='both'"),
        ({"distill.target": "x"}, "distill.target='x'"),
        ({"student.sigmas": (1.0, 1.0, 0.5)}, "strictly decreasing"),
        ({"teacher.cfg_scale": 0.5}, "teacher.cfg_scale=0.5 must be >= 1"),
        ({"batch_size": 6}, "batch_size=6 is not divisible by the data x fsdp mesh size 8"),
        ({"mesh.fsdp": 3}, "mesh: mesh sizes"),
        ({"model.source": "/nowhere/sd35"},
         "model.source='/nowhere/sd35': pipeline folder '/nowhere/sd35' does not exist"),
        ({"dmd.sigma_min": 0.9, "dmd.sigma_max": 0.1}, "sigma_min < sigma_max"),
        ({"backbone": "tiny_vp", "data.kind": "random"}, "distill.target='line' does not fit backbone 'tiny_vp'"),
        ({"backbone": "tiny_vp", "distill.target": "denoise", "student.timesteps": (999, 1000)},
         "student.timesteps=[999, 1000] must hold"),
        ({"backbone": "tiny_flow", "model.source": "toy"}, "test backbone only builds random weights"),
        ({"data.kind": "parquet"}, "data.kind='parquet'"),
        ({"evals.grid.every": -1}, "evals.grid.every=-1"),
        ({"mesh.rules": (("embed", "model"),)}, "mesh.rules entry ('embed', 'model') must be"),
    ],
)
def test_invalid_config_fails_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        setup_lib.build(smoke(**overrides))


def test_prompt_inputs_fail_clearly(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    c = smoke(**{"data.kind": "prompts", "data.prompt_file": str(empty)})
    with pytest.raises(ConfigError, match="holds no prompts"):
        setup_lib.build(c)
    empty.write_text("a photo of a cat\n")  # a random teacher has no text encoders to encode it
    with pytest.raises(ConfigError, match="needs the text encoders of a diffusers pipeline, and model.source='random'"):
        setup_lib.build(c)


def test_sequence_fields_are_settable_from_the_command_line(monkeypatch):
    """Grids and rules are tuples, so ml_collections' flags can override them."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", f"--config={REPO}/configs/toy.py:smoke", "--config.student.sigmas=(1.0, 0.5)",
            "--config.student.timesteps=(999, 499)", "--config.mesh.rules=(('embed', None),)",
            "--config.data.latent_size=(4, 4)"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags registers the override flags it finds in argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(argv)
    c = fv.config
    assert tuple(c.student.sigmas) == (1.0, 0.5) and tuple(c.student.timesteps) == (999, 499)
    assert tuple(c.mesh.rules) == (("embed", None),) and tuple(c.data.latent_size) == (4, 4)


def test_user_backbone_is_named_by_module():
    """A backbone outside the built-in list is named 'package.module:name'; its module is imported."""
    from dpdmd_jax import backbones
    from dpdmd_jax.run.preflight import validate

    c = smoke(**{"backbone": "dpdmd_jax.backbones.tiny:tiny_vp", "distill.target": "denoise", "data.kind": "random"})
    validate(c)
    assert type(backbones.get(c)).__name__ == "TinyVP"
    with pytest.raises(ConfigError, match="backbone='nowhere.mod:x' is unknown"):
        validate(smoke(backbone="nowhere.mod:x"))


def test_data_rows_are_a_pure_function_of_seed_and_round():
    """Each process builds only its rows; any split of the batch gives the same data as the whole."""
    setup = setup_lib.build(smoke(**{"mesh.fsdp": 8}))
    whole = setup.data.round(3, slice(0, 8))
    halves = [setup.data.round(3, slice(0, 4)), setup.data.round(3, slice(4, 8))]
    joined = jax.tree.map(lambda a, b: np.concatenate([a, b], axis=1), halves[0].cond, halves[1].cond)
    for x, y in zip(jax.tree.leaves(whole.cond), jax.tree.leaves(joined), strict=True):
        np.testing.assert_array_equal(x, y)
    assert halves[0].cond.context.shape[1] == 4 and halves[0].uncond.context.shape[0] == 4
    assert setup_lib.local_rows(setup) == slice(0, 8)  # one process holds every row
    assert not np.array_equal(whole.cond.context, setup.data.round(4, slice(0, 8)).cond.context)


def test_replicated_dimension_is_logged(caplog):
    """A parameter dimension whose rule names a mesh axis it does not divide is replicated, and said so."""
    from dpdmd_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(fsdp=8)
    with caplog.at_level("WARNING"):
        spec = mesh_lib.spec_for((12, 16), ("embed", "mlp"), mesh)
    assert spec == jax.sharding.PartitionSpec(None, None)
    assert "embed=12" in caplog.text and "not divisible by mesh axes ('fsdp',)" in caplog.text
