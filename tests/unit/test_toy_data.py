"""The toy problem's data distribution and its analytic metrics behave as documented."""

import json

import numpy as np
import pytest

from dpdmd_jax.toy import data, metrics


def _grouped(seed: int, prompts: int, r: int) -> dict[str, np.ndarray]:
    """Data laid out as the metrics expect: P prompts x R consecutive seeds."""
    ids = np.repeat(np.arange(prompts) % data.NUM_CLASSES, r)
    return data.sample_batch(seed, ids.size, ids)


def test_batch_format_and_pure_colour():
    b = data.sample_batch(0, 64)
    assert b["images"].shape == (64, 16, 16, 3) and b["images"].dtype == np.float32
    assert b["class_ids"].dtype == np.int32
    assert b["images"].min() >= -1.0 and b["images"].max() <= 1.0
    # The pixel holding the centre is fully covered: exactly the class's pure colour.
    rows, cols = b["cy"].astype(int), b["cx"].astype(int)
    centre = b["images"][np.arange(64), rows, cols]
    want = 2 * np.eye(3)[data.class_colour(b["class_ids"])] - 1
    np.testing.assert_array_equal(centre, want)
    # Objects stay inside: the outermost pixel ring is at most half covered (never foreground).
    img = b["images"].max(-1)
    for border in (img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]):
        assert np.all(border <= 0.0)
    assert data.CLASS_NAMES[data.class_id("Green Circle")] == "green circle"


def test_deterministic_with_seed():
    a, b, c = data.sample_batch(7, 32), data.sample_batch(7, 32), data.sample_batch(8, 32)
    g = data.sample_batch(np.random.default_rng(7), 32)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], g[k])
    assert not np.array_equal(a["cx"], c["cx"])
    ids = np.full(32, 4)
    assert np.all(data.sample_batch(1, 32, ids)["class_ids"] == 4)
    with pytest.raises(ValueError):
        data.sample_batch(1, 4, np.array([0, 1, 2, 6]))


def test_data_layout_has_stated_spread():
    n = 20000
    b = data.sample_batch(3, n)
    mean, std = data.layout_stats()
    layout = np.stack([b["cx"], b["cy"], b["size"]], -1)
    np.testing.assert_allclose(layout.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(layout.std(0), std, rtol=0.02)
    assert std[0] > 2.0 and std[2] > 0.7  # real spread, not a near-constant layout
    assert b["size"].min() >= data.SIZE_RANGE[0] and b["size"].max() <= data.SIZE_RANGE[1]
    counts = np.bincount(b["class_ids"], minlength=data.NUM_CLASSES)
    assert np.all(np.abs(counts - n / 6) < 0.1 * n / 6)


def test_detector_exact_on_clean_renders():
    b = data.sample_batch(11, 512)
    d = metrics.detect(b["images"])
    assert np.abs(d["cx"] - b["cx"]).max() < 0.15
    assert np.abs(d["cy"] - b["cy"]).max() < 0.15
    assert np.abs(d["size"] - b["size"]).max() < 0.2
    np.testing.assert_array_equal(d["colour"], data.class_colour(b["class_ids"]))
    np.testing.assert_array_equal(d["shape"], data.class_shape(b["class_ids"]))
    assert d["valid"].all() and np.all(d["n_components"] == 1)


def test_detector_flags_invalid_images():
    ids = np.array([0, 0, 4])
    # Two separate objects; an empty image; an object far too small to count.
    a = data.render(ids[:1], np.array([4.0]), np.array([4.0]), np.array([2.5]))
    b = data.render(ids[:1], np.array([12.0]), np.array([12.0]), np.array([2.5]))
    two = np.maximum(a, b)
    empty = -np.ones_like(a)
    tiny = data.render(ids[2:], np.array([8.0]), np.array([8.0]), np.array([1.0]))
    d = metrics.detect(np.concatenate([two, empty, tiny]))
    np.testing.assert_array_equal(d["n_components"], [2, 0, 1])
    np.testing.assert_array_equal(d["valid"], [False, False, False])
    assert d["colour"][1] == -1 and np.isfinite(d["cx"]).all() and np.isfinite(d["size"]).all()


def test_pairwise_cosine_diversity_hand_cases():
    e = np.eye(3)
    assert metrics.pairwise_cosine_diversity(np.stack([e[:2], e[:2]])) == pytest.approx(1.0)
    assert metrics.pairwise_cosine_diversity(np.array([[e[0], -e[0]]])) == pytest.approx(2.0)
    same = np.tile(np.array([1.0, 2.0, 3.0]), (2, 5, 1))
    assert metrics.pairwise_cosine_diversity(same) == pytest.approx(0.0, abs=1e-12)
    f = np.random.default_rng(0).normal(size=(3, 4, 5))
    u = f / np.linalg.norm(f, axis=-1, keepdims=True)
    brute = np.mean([[u[p, i] @ u[p, j] for i in range(4) for j in range(4) if i != j]
                     for p in range(3)])
    assert metrics.pairwise_cosine_diversity(f) == pytest.approx(1 - brute)
    with pytest.raises(ValueError):
        metrics.pairwise_cosine_diversity(f[:, :1])


def test_diversity_data_vs_collapsed():
    r = 16
    b = _grouped(5, 6, r)
    ids = b["class_ids"]
    full = metrics.toy_metrics(b["images"], ids, r)
    # Identical images within each prompt: zero diversity and zero spread.
    first = np.repeat(b["images"][::r], r, axis=0)
    collapsed = metrics.toy_metrics(first, ids, r)
    assert collapsed["diversity_layout"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["diversity_pixel"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["spread_cx"] == pytest.approx(0.0, abs=1e-5)
    assert collapsed["spread_size"] == pytest.approx(0.0, abs=1e-5)
    # Same position for all, sizes still vary: position diversity gone, some remains.
    mean, _ = data.layout_stats()
    same_pos = data.render(ids, np.full(ids.size, 5.0), np.full(ids.size, 6.0), b["size"])
    pos = metrics.toy_metrics(same_pos, ids, r)
    assert full["diversity_layout"] > 0.5
    assert pos["diversity_layout"] < 0.5 * full["diversity_layout"]
    assert pos["diversity_pixel"] < 0.5 * full["diversity_pixel"]
    # Layouts shrunk halfway towards the typical layout: the anchored layout features see it
    # (a centred-only cosine would not: directions from the mean are unchanged).
    shrunk = data.render(ids, *(m + 0.5 * (b[k] - m) for k, m in zip(("cx", "cy", "size"), mean)))
    half = metrics.toy_metrics(shrunk, ids, r)
    assert half["diversity_layout"] < full["diversity_layout"] - 0.15
    assert half["spread_cx"] == pytest.approx(0.5 * full["spread_cx"], rel=0.05)


def test_spread_on_data_matches_distribution():
    m = metrics.toy_metrics(*(lambda b: (b["images"], b["class_ids"]))(_grouped(2, 60, 32)), 32)
    _, std = data.layout_stats()
    # ddof=1 per prompt is unbiased for the variance; 60 prompts x 32 seeds -> ~2% noise.
    assert m["spread_cx"] == pytest.approx(std[0], rel=0.06)
    assert m["spread_cy"] == pytest.approx(std[1], rel=0.06)
    assert m["spread_size"] == pytest.approx(std[2], rel=0.06)
    ratio = metrics.spread_ratio(m, m)
    assert ratio == {"spread_ratio_cx": 1.0, "spread_ratio_cy": 1.0, "spread_ratio_size": 1.0}


def test_frechet_small_for_data_large_for_shifted():
    b = _grouped(9, 32, 16)
    ids = b["class_ids"]
    same = metrics.toy_metrics(b["images"], ids, 16)
    shifted = data.render(ids, b["cx"] + 2.0, b["cy"], b["size"])
    moved = metrics.toy_metrics(shifted, ids, 16)
    assert same["frechet_layout"] < 0.15
    assert moved["frechet_layout"] > 3.0  # ~2^2 from the mean shift (edges crop a little)
    # Frechet is exact for Gaussians: a pure mean shift of 2 in one coordinate gives 4.
    x = np.random.default_rng(0).normal(size=(4000, 3))
    assert metrics.frechet_distance(x, x + [2.0, 0, 0]) == pytest.approx(4.0, rel=1e-6)


def test_adherence_and_pixel_quality():
    b = _grouped(4, 12, 8)
    ids = b["class_ids"]
    good = metrics.toy_metrics(b["images"], ids, 8)
    assert good["adherence"] == good["valid"] == 1.0
    assert good["render_residual"] < 0.01 and good["saturation"] == 0.0
    # Wrong colour (channels rotated), right shape.
    recoloured = metrics.toy_metrics(np.roll(b["images"], 1, axis=-1), ids, 8)
    assert recoloured["colour_acc"] == 0.0 and recoloured["shape_acc"] == 1.0
    assert recoloured["adherence"] == 0.0 and recoloured["render_residual"] > 0.1
    # Wrong shape (square <-> circle), right colour.
    other = (ids + 3) % data.NUM_CLASSES
    reshaped = metrics.toy_metrics(data.render(other, b["cx"], b["cy"], b["size"]), ids, 8)
    assert reshaped["shape_acc"] == 0.0 and reshaped["colour_acc"] == 1.0
    # Half mis-coloured: adherence counts exactly that half.
    mixed = b["images"].copy()
    mixed[::2] = np.roll(mixed[::2], 1, axis=-1)
    assert metrics.toy_metrics(mixed, ids, 8)["adherence"] == pytest.approx(0.5)
    # Over-saturated noise is flagged.
    noise = np.random.default_rng(0).normal(0, 1.5, b["images"].shape).astype(np.float32)
    bad = metrics.toy_metrics(noise, ids, 8)
    assert bad["saturation"] > 0.3 and bad["valid"] < 0.1 and bad["render_residual"] > 0.5


def test_toy_metrics_output_and_grouping_checks():
    b = _grouped(6, 6, 4)
    m = metrics.toy_metrics(b["images"], b["class_ids"], 4)
    want = {"diversity_layout", "diversity_pixel", "spread_cx", "spread_cy", "spread_size",
            "adherence", "colour_acc", "shape_acc", "valid", "frechet_layout",
            "render_residual", "saturation", "n_images", "n_prompts"}
    assert set(m) == want
    assert all(type(v) is float and np.isfinite(v) for v in m.values())
    json.dumps(m)
    with pytest.raises(ValueError):  # prompts' seeds must be consecutive
        metrics.toy_metrics(b["images"], np.roll(b["class_ids"], 1), 4)
    with pytest.raises(ValueError):
        metrics.toy_metrics(b["images"], b["class_ids"], 5)


def test_class_embedding():
    ids = np.array([0, 1, 2, 3, 4, 5, data.NULL_CLASS])
    ctx, pooled = data.class_embedding(ids, context_dim=32, pooled_dim=16)
    assert ctx.shape == (7, 4, 32) and pooled.shape == (7, 16)
    assert ctx.dtype == pooled.dtype == np.float32
    assert np.all(ctx[-1] == 0) and np.all(pooled[-1] == 0)
    flat = np.concatenate([ctx[:6].reshape(6, -1), pooled[:6]], -1)
    dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    assert dist[~np.eye(6, dtype=bool)].min() > 5.0  # classes are far apart, not just unequal
    again, _ = data.class_embedding(ids, 32, 16)
    np.testing.assert_array_equal(ctx, again)
    other, _ = data.class_embedding(ids, 32, 16, seed=1)
    assert not np.array_equal(ctx[:6], other[:6])
    ctx[0] += 1  # callers get copies: the cached table is not mutated
    np.testing.assert_array_equal(data.class_embedding(ids, 32, 16)[0], again)
    assert data.class_embedding(np.array([2]), 8, 8, context_len=2)[0].shape == (1, 2, 8)
    with pytest.raises(ValueError):
        data.class_embedding(np.array([6]), 8, 8)
