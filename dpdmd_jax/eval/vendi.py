"""The Vendi score (Friedman & Dieng 2023) of a set of features: the exponential of the Shannon
entropy of the eigenvalues of K / n, K the n x n similarity matrix with unit diagonal. It is the
"effective number" of distinct items: n identical items score 1, n mutually orthogonal ones n.

The kernel here is the cosine similarity of the features (each row L2-normalised, K = X X^T), as
the `vendi_score` package's `score_X` / `score_dual`. K / n and X^T X / n have the same non-zero
eigenvalues, so the smaller of the two Gram matrices is decomposed (`eigvalsh`, float64). `q` gives
the order-q score of the package (`entropy_q`): q = 1 Shannon, q = "inf" -log max p, otherwise the
Renyi entropy log(sum p^q) / (1 - q); eigenvalues <= 0 (numerical zeros) are left out, 0 log 0 = 0.
Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

Order = float | str


class VendiPerGroup(NamedTuple):
    """The Vendi score of each group (e.g. one prompt's seeds) and their mean."""

    mean: float
    groups: list[Hashable]  # sorted
    scores: list[float]  # in the order of `groups`


def entropy_q(p: np.ndarray, q: Order = 1) -> float:
    """The order-q entropy of eigenvalues `p` (summing to 1); p <= 0 is left out (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    p = p[p > 0]
    if q == "inf":
        return float(-np.log(np.max(p)))
    if isinstance(q, str):
        raise ValueError(f"q must be a number or 'inf', got {q!r}")
    if q == 1:
        return float(-np.sum(p * np.log(p)))
    return float(np.log(np.sum(p ** q)) / (1 - q))


def score_K(K: np.ndarray, q: Order = 1) -> float:
    """The Vendi score of an n x n similarity matrix with unit diagonal: exp(entropy of eig(K / n))."""
    K = np.asarray(K, np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"a similarity matrix is square [n, n] with n >= 1, got {list(K.shape)}")
    return float(np.exp(entropy_q(np.linalg.eigvalsh(K / K.shape[0]), q)))


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Each row L2-normalised (float64); a zero row has no direction and is refused."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be [n, d] with n >= 1, got {list(x.shape)}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError(f"features row(s) {np.flatnonzero(norms[:, 0] == 0).tolist()[:10]} are all zero: the cosine "
                         "similarity is undefined for them")
    return x / norms


def vendi_score(features: np.ndarray, q: Order = 1, normalize: bool = True) -> float:
    """The Vendi score of features [n, d] under the cosine-similarity kernel (`normalize=False`: the
    linear kernel X X^T of rows you have already scaled to unit norm)."""
    x = unit_rows(features) if normalize else np.asarray(features, np.float64)
    n, d = x.shape
    gram = x @ x.T if n <= d else x.T @ x  # same non-zero spectrum; the smaller is cheaper
    return float(np.exp(entropy_q(np.linalg.eigvalsh(gram / n), q)))


def per_group(features: np.ndarray, groups: Sequence[Hashable], q: Order = 1, normalize: bool = True) -> VendiPerGroup:
    """The Vendi score of each group's rows (e.g. groups = prompt index of each image: a prompt's
    seeds) and the mean over groups."""
    x = np.asarray(features)
    labels = np.asarray(groups)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"groups must give one label per feature row ({x.shape[0]}), got shape {list(labels.shape)}")
    names = sorted(set(labels.tolist()))
    if not names:
        raise ValueError("per_group needs at least one feature row")
    scores = [vendi_score(x[labels == g], q=q, normalize=normalize) for g in names]
    return VendiPerGroup(mean=float(np.mean(scores)), groups=names, scores=scores)
