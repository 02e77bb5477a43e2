"""Our Vendi score against the `vendi_score` package (Friedman & Dieng 2023's code: numpy, scipy,
scikit-learn; a requirements-dev.txt package, so it is here and not in tests/unit)."""

from __future__ import annotations

import numpy as np
import pytest
from vendi_score import vendi as reference

from dpdmd_jax.eval.vendi import score_K, vendi_score


def test_matches_the_vendi_score_package():
    rng = np.random.default_rng(0)
    wide, tall = rng.standard_normal((6, 16)), rng.standard_normal((40, 5)) + 0.3  # n < d; n > d (dual)
    for x in (wide, tall):
        assert vendi_score(x) == pytest.approx(reference.score_X(x), rel=1e-10)  # score_X is q = 1 only
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        for q in (1, 2, 0.5, "inf"):
            # The package's n x n kernel for n <= d, its d x d dual for n > d: there K / n has n - d
            # zero eigenvalues that come out of eigvalsh as +-1e-17 noise, which orders q < 1 amplify
            # (p ** q), so the n x n route is compared there only for q >= 1.
            expected = reference.score_K(u @ u.T, q=q) if x is wide else reference.score_dual(x, q=q)
            assert vendi_score(x, q=q) == pytest.approx(expected, rel=1e-10)
            if x is wide or q in (1, 2, "inf"):
                assert score_K(u @ u.T, q=q) == pytest.approx(reference.score_K(u @ u.T, q=q), rel=1e-10)
