"""distill.anchor_k="auto" (dpdmd_jax.distill.anchor): the curve is, per K, the share of the
teacher's final within-prompt variation that the diversity target carries (checked against a per-K
loop through the Distiller's own anchor, on the flow and VP schedules); the documented rule picks
K on constructed curves; invalid settings are refused up front; plain DMD runs no teacher pass.
(The trainer records its choice and reuses it on resume: tests/integration/test_anchor_runs.py.)"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy as toy_config
from dpdmd_jax.config import ConfigError, override
from dpdmd_jax.run.preflight import validate
from dpdmd_jax.distill import anchor
from dpdmd_jax.run import setup as setup_lib
from tests.unit.test_distill import make


SEEDS = 2  # test_distill.make's batch of 4: 2 prompts x 2 seeds


def carried_by_hand(target, final, seeds):
    dev = lambda x: (lambda y: y - y.mean(axis=1, keepdims=True))(
        np.asarray(x, np.float64).reshape(-1, seeds, int(np.prod(np.shape(x)[1:]))))
    return (dev(target) * dev(final)).sum() / (dev(final) ** 2).sum()


def test_choose_k_is_the_first_k_whose_ratio_reaches_the_fraction():
    ratios = np.array([0.31, 0.52, 0.74, 0.75, 0.93, 1.0])
    assert anchor.choose_k(ratios, 0.75) == 4
    assert anchor.choose_k(ratios, 0.3) == 1
    assert anchor.choose_k(ratios, 0.9) == 5
    assert anchor.choose_k(np.array([0.2, 0.5, 0.99999994]), 1.0) == 3  # ratio(T) = 1 up to rounding


def test_carried_is_the_share_of_the_final_variation_a_target_reproduces():
    rng = np.random.default_rng(0)
    final = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)  # 2 prompts x 3 seeds
    dev = anchor.prompt_deviations(final, 3)
    mean_like = np.repeat(final.reshape(2, 3, -1).mean(1), 3, axis=0).reshape(final.shape)
    noise = 5.0 * rng.standard_normal(final.shape).astype(np.float32)
    assert float(anchor.carried(final, dev, 3)) == pytest.approx(1.0, abs=1e-6)
    assert float(anchor.carried(mean_like, dev, 3)) == pytest.approx(0.0, abs=1e-6)  # no variation at all
    shrunk = mean_like + 0.4 * (final - mean_like) + 7.0  # a shrunken, shifted copy of the layouts
    assert float(anchor.carried(shrunk, dev, 3)) == pytest.approx(0.4, rel=1e-5)
    np.testing.assert_allclose(anchor.carried(final + noise, dev, 3), carried_by_hand(final + noise, final, 3),
                               rtol=1e-5)


@pytest.mark.parametrize("backbone,target", [("tiny_flow", "line"), ("tiny_flow", "denoise"), ("tiny_vp", "denoise")])
def test_curve_is_what_each_k_target_carries(backbone, target):
    d, _, _, frozen, eps, cond, uncond, _ = make(backbone, {"distill.target": target})
    cond = jax.tree.map(lambda x: jnp.repeat(x[:SEEDS], SEEDS, axis=0), cond)  # a prompt's seeds adjacent
    curve = jax.jit(lambda f, e, c, u: anchor.target_curve(d, f, e, c, u, SEEDS))(frozen, eps, cond, uncond)
    sample = d.teacher_sample(frozen.teacher, frozen.buffers, eps, cond, uncond)
    expected = []
    for k in range(1, len(d.teacher_grid)):  # the target DP-DMD trains on with anchor K, as a clean latent
        d.anchor_k = k
        if target == "line":
            z_tk, t_k = d.teacher_anchor(frozen, eps, cond, uncond)
            x0 = np.asarray(eps) - (np.asarray(eps) - np.asarray(z_tk)) / (1.0 - float(t_k))
        else:
            x0 = d.diversity_target(frozen, eps, cond, uncond)
        expected.append(carried_by_hand(x0, sample, SEEDS))
    np.testing.assert_allclose(curve, expected, rtol=1e-4, atol=1e-5)
    assert float(curve[-1]) == pytest.approx(1.0, abs=1e-5)  # at K = T the target is the sample


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"distill.auto_anchor.criterion": "spread"}, "distill.auto_anchor.criterion='spread' is unknown"),
        ({"distill.auto_anchor.fraction": 1.5}, "distill.auto_anchor.fraction=1.5 must lie in (0, 1]"),
        ({"distill.auto_anchor.seeds": 1}, "distill.auto_anchor.seeds=1 must be an integer >= 2"),
        ({"distill.auto_anchor.prompts": 9}, "distill.auto_anchor.prompts=9 must be an integer in 1..batch_size=8"),
        ({"distill.anchor_k": "late"}, "distill.anchor_k='late' must lie in 1..teacher.steps=4, or be 'auto'"),
    ],
)
def test_invalid_auto_anchor_settings_are_refused(overrides, message):
    c = override(toy_config.get_config("smoke"), {"distill.anchor_k": "auto", **overrides})
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(c)


def test_plain_dmd_with_auto_runs_no_teacher_pass(tmp_path, monkeypatch):
    """lambda_div = 0 never uses the anchor (e.g. the main job's DMD baseline of an "auto" run)."""
    monkeypatch.setattr(anchor, "target_curve", lambda *a, **k: pytest.fail("no anchor to choose for plain DMD"))
    c = override(toy_config.get_config("smoke"), {"distill.anchor_k": "auto", "distill.lambda_div": 0.0})
    assert setup_lib.build(c, workdir=str(tmp_path)).distiller.anchor_k is None
