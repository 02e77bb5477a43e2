"""The Vendi score on cases computed by hand (the comparison with the `vendi_score` package, a
requirements-dev.txt package, is tests/parity/test_vendi_package.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpdmd_jax.eval.vendi import entropy_q, per_group, score_K, vendi_score


def _pair(s: float) -> np.ndarray:
    """Two unit vectors with cosine similarity s."""
    return np.array([[1.0, 0.0], [s, math.sqrt(1 - s * s)]])


def test_identical_items_score_one():
    x = np.tile(np.array([[0.3, -1.2, 2.0, 0.5]]), (5, 1))  # K = all ones: eigenvalues of K / n are 1, 0, 0, 0, 0
    assert vendi_score(x) == pytest.approx(1.0, rel=1e-12)
    assert vendi_score(np.tile(x, (2, 1))[:, :2]) == pytest.approx(1.0, rel=1e-12)  # n > d: the dual Gram


def test_orthogonal_items_score_n():
    x = np.diag([3.0, 0.5, 2.0, 7.0]) @ np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))[0]
    for q in (1, 2, 0.5, "inf"):  # K / n = I / n: every order gives n
        assert vendi_score(x, q=q) == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("s", [0.0, 0.3, -0.6, 0.95])
def test_two_items_with_similarity_s(s):
    p1, p2 = (1 + s) / 2, (1 - s) / 2  # the eigenvalues of [[1, s], [s, 1]] / 2
    shannon = math.exp(-(p1 * math.log(p1) + p2 * math.log(p2)))
    assert vendi_score(_pair(s)) == pytest.approx(shannon, rel=1e-12)
    assert vendi_score(_pair(s), q=2) == pytest.approx(1 / (p1 ** 2 + p2 ** 2), rel=1e-12)
    assert vendi_score(_pair(s), q="inf") == pytest.approx(1 / max(p1, p2), rel=1e-12)
    assert score_K(np.array([[1.0, s], [s, 1.0]])) == pytest.approx(shannon, rel=1e-12)


def test_zero_eigenvalues_count_as_zero():
    assert entropy_q(np.array([0.5, 0.5, 0.0, -1e-17])) == pytest.approx(math.log(2), rel=1e-12)


def test_per_group():
    rng = np.random.default_rng(1)
    same = np.tile(rng.standard_normal((1, 3)), (3, 1))
    orthogonal = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    mixed = rng.standard_normal((4, 3))
    x = np.concatenate([orthogonal, same, mixed])
    out = per_group(x, ["b"] * 3 + ["a"] * 3 + ["c"] * 4)
    assert out.groups == ["a", "b", "c"]
    assert out.scores == pytest.approx([1.0, 3.0, vendi_score(mixed)], rel=1e-12)
    assert out.mean == pytest.approx((4.0 + vendi_score(mixed)) / 3, rel=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are all zero"):
        vendi_score(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="one label per feature row"):
        per_group(np.ones((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="square"):
        score_K(np.ones((2, 3)))
    with pytest.raises(ValueError, match="'inf'"):
        entropy_q(np.ones(2) / 2, q="max")
