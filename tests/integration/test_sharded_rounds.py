"""Sharded rounds equal single-device ones with the paper's GAN on (its classifier head sharded by its
logical axes), with LoRA students (the adapters' B sharded over fsdp) and with DMD v1's cached
regression pairs (split over the batch axes): 2 rounds on 8 devices against 2 on one. (The plain
round: test_trainer_runs.py; the GAN's and LoRA's step semantics:
tests/unit/test_baselines.py, tests/unit/test_lora.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import toy as toy_config
from dpdmd_jax.config import override
from dpdmd_jax.distill import adapters
from dpdmd_jax.run import sample as run_sample
from tests.helpers import train_rounds
from tests.unit.test_baselines import gan_config
from tests.unit.test_lora import lora_smoke, rounds


@pytest.fixture(scope="module")
def gan_single_device():
    """The reference: 2 GAN rounds on one device (outside `fresh_compiles`: this program may come from the
    compilation cache)."""
    return train_rounds(gan_config(), jax.devices()[:1], rounds=2)


@pytest.fixture
def fresh_compiles():
    """No persistent compilation cache while the test runs. A GAN round on 8 CPU devices loaded back from
    the cache deadlocks (jax 0.10.2): one device enters an all-gather while the others wait in another
    ("Termination timeout for `all gather ...`", then abort), in 7 of 7 cached runs here and in none of
    6 freshly compiled ones; the plain round's cached executables run."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # the cache's "in use" is decided once per process: decide it again
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def test_sharded_gan_rounds_equal_single_device(gan_single_device, fresh_compiles):
    _, _, ref_state, ref_history, _ = gan_single_device
    _, _, state, history, _ = train_rounds(gan_config(**{"mesh.fsdp": 8}), jax.devices(), rounds=2)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.disc))  # by its logical axes
    for a, b in zip(history, ref_history, strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for x, y in zip(jax.tree.leaves((state.fake, state.disc)), jax.tree.leaves((ref_state.fake, ref_state.disc)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=2e-6)


def test_sharded_lora_rounds_equal_single_device():
    """On the tiny flow backbone (its linear layers' kernels shard over fsdp): a cheap compile."""
    c = lambda fsdp: lora_smoke(**{"backbone": "tiny_flow", "data.kind": "random", "mesh.fsdp": fsdp})
    _, _, ref_state, ref_history = rounds(c(1), jax.devices()[:1])
    run, _, state, history = rounds(c(8), jax.devices())
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.student))  # B: (None, embed)
    for a, b in zip(history, ref_history, strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for role in adapters.ROLES:
        for x, y in zip(jax.tree.leaves(getattr(state, role)), jax.tree.leaves(getattr(ref_state, role)), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=2e-6)


def test_sharded_rounds_from_a_pair_cache_equal_single_device(tmp_path):
    """DMD v1's cached pairs split over the batch axes like the round's conditionings (tiny flow backbone)."""
    c = lambda **o: override(toy_config.get_config("smoke"), {
        "backbone": "tiny_flow", "data.latent_size": (16, 16), "evals": {}, "regression.weight": 0.25, **o})
    out = str(tmp_path / "pairs")
    run_sample.sample(c(), out, sampler="teacher", pairs=True, seeds=3, devices=jax.devices()[:1])
    _, _, ref_state, ref_history, _ = train_rounds(c(**{"regression.pairs": out}), jax.devices()[:1], rounds=2)
    _, _, state, history, _ = train_rounds(c(**{"regression.pairs": out, "mesh.fsdp": 8}), jax.devices(), rounds=2)
    assert all(h["loss_reg"] > 0 for h in history)
    for a, b in zip(history, ref_history, strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for x, y in zip(jax.tree.leaves(state.student), jax.tree.leaves(ref_state.student), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=2e-6)
