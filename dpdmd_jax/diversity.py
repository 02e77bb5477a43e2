"""The paper's diversity and a CLIP score, on features (pure NumPy, float64).

Diversity, as the method's own evaluation computes it: L2-normalise each image's feature, take the
mean cosine similarity over the distinct pairs of one prompt's R images (the upper triangle of
their Gram matrix, i.e. i != j), and report 1 - that, averaged over prompts. Identical images give
0; the bound is 1 + 1 / (R - 1) for features that cancel in pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prompt_diversity(features: np.ndarray) -> float:
    """1 - mean pairwise cosine among one prompt's images; features [R, F], R >= 2."""
    f = _unit(features)
    r = f.shape[0]
    if r < 2:
        raise ValueError(f"diversity needs >= 2 images per prompt, got {r}")
    gram = f @ f.T
    return float(1.0 - (gram.sum() - np.trace(gram)) / (r * (r - 1)))


def diversity(features: np.ndarray | Sequence[np.ndarray]) -> float:
    """The average over prompts of `prompt_diversity`: features [P, R, F], or a list of [R_p, F]
    arrays when prompts have different numbers of images."""
    return float(np.mean([prompt_diversity(f) for f in features]))


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
    """CLIPScore (Hessel et al. 2021, torchmetrics' convention): mean over images of
    100 * max(cos(image, its prompt's text), 0); both [N, D] (projected embeddings)."""
    cos = np.sum(_unit(image_embeds) * _unit(text_embeds), axis=-1)
    return float(np.mean(100.0 * np.maximum(cos, 0.0)))
