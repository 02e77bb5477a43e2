"""DMD v1's precomputed regression pairs (issue 22): `sample --sampler=teacher --pairs` writes a pair
cache; the noise a run regenerates for a cached pair is the one the teacher was sampled from (the
teacher maps it to the cached latents again); a round's regression term is the distance of the
student's sample from each pair's noise to its cached target, and no other; the draw of pairs is a
pure function of (seed, round); a cache that is not one, or that another teacher made, is refused
before anything loads. On the tiny flow backbone (random weights, rollout), one device."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import toy as toy_config
from dpdmd_jax.config import override
from dpdmd_jax.data.pairs import PairCache
from dpdmd_jax.distill import losses
from dpdmd_jax.run import sample as run_sample
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run.preflight import config_problems, run_problems
from dpdmd_jax.sampling.folder import SampleError
from tests.helpers import train_rounds

PROMPTS, SEEDS = 3, 2


def config(**overrides):
    return override(toy_config.get_config("smoke"), {"backbone": "tiny_flow", "data.latent_size": (16, 16), "evals": {},
                                                     "regression.weight": 0.25, **overrides})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A pair cache of the tiny flow teacher: 3 prompts x 2 seeds (a batch of 4 with padding: 2 batches)."""
    out = str(tmp_path_factory.mktemp("pairs") / "cache")
    summary = run_sample.sample(config(), out, sampler="teacher", pairs=True, seeds=SEEDS, num_prompts=PROMPTS,
                                per_device_batch=4, devices=jax.devices()[:1])
    assert summary["rows"] == PROMPTS * SEEDS
    return out


def test_the_cache_holds_each_pair_and_its_noise_gives_its_target_again(cache):
    files = sorted(os.listdir(os.path.join(cache, "latents")))
    assert files == [f"p{p:05d}_s{s:03d}.npy" for p in range(PROMPTS) for s in range(SEEDS)]
    assert sorted(os.listdir(os.path.join(cache, "cond"))) == [f"p{p:05d}.npz" for p in range(PROMPTS)]
    assert json.load(open(os.path.join(cache, "run.json")))["pairs"] is True
    c = config(**{"regression.pairs": cache})
    run = setup_lib.build(c, devices=jax.devices()[:1])
    pairs = run.data.round(0, slice(0, c.batch_size)).pairs  # the run's source carries them
    assert pairs.noise.shape == pairs.target.shape == (c.batch_size, 16, 16, 3)
    # The teacher maps each regenerated noise, with the stored conditioning, to the cached latents.
    again = run.distiller.teacher_sample(run.frozen.teacher, run.frozen.buffers, pairs.noise, pairs.cond,
                                         run.data.uncond(c.batch_size))
    np.testing.assert_allclose(np.asarray(again), pairs.target, rtol=0, atol=2e-6)
    # The draw is a pure function of (seed, round): a fresh reader (a resumed run) draws the same rows,
    # other rounds and seeds other rows.
    cache_ = PairCache.open(c, run.backbone)
    np.testing.assert_array_equal(cache_.indices(3), run.data.cache.indices(3))
    assert not np.array_equal(cache_.indices(3), cache_.indices(4))
    other_seed = PairCache.open(config(**{"regression.pairs": cache, "seed": c.seed + 1}), run.backbone)
    assert not np.array_equal(cache_.indices(3), other_seed.indices(3))
    # Rows split over processes are the global draw's rows.
    np.testing.assert_array_equal(cache_.pairs(2, slice(2, 6)).target, cache_.pairs(2, slice(0, 8)).target[2:6])


def test_a_round_regresses_the_students_samples_from_the_pairs_noise_on_their_targets(cache):
    c = config(**{"regression.pairs": cache})
    run, (start, _), _, history, _ = train_rounds(c, jax.devices()[:1], rounds=1)
    pairs = run.data.round(0, slice(0, c.batch_size)).pairs
    # The generator update follows the critic's: the student is still the initial one. A flow student's
    # N-step sample is deterministic, so the sampler's rollout is the generator's x for these noises.
    x = run.distiller.sample(start.student, run.frozen.buffers, pairs.noise, pairs.cond, jax.random.key(0))
    assert history[0]["loss_reg"] == pytest.approx(float(losses.regression_loss(x, pairs.target)), rel=1e-5)
    assert history[0]["loss_reg"] > 1e-3  # a real distance: the random student is not the teacher's map


def test_bad_pair_caches_are_named_before_anything_loads(cache, tmp_path):
    assert any("regression.weight=0.0" in p for p in config_problems(config(**{
        "regression.weight": 0.0, "regression.pairs": cache})))
    problems = run_problems(config(**{"regression.pairs": str(tmp_path)}), check_mesh=False)
    assert any("is not a pair cache" in p and "--pairs" in p for p in problems), problems
    problems = run_problems(config(**{"regression.pairs": cache, "teacher.cfg_scale": 2.0}), check_mesh=False)
    assert any("made by another teacher" in p and "cfg_scale: 3.5 in the cache, 2.0 in this run" in p
               for p in problems), problems
    with pytest.raises(SampleError, match="--sampler=teacher"):
        run_sample.sample(config(), str(tmp_path / "x"), pairs=True)
    assert not os.path.exists(tmp_path / "x")
