"""Sample grids for TensorBoard."""

from __future__ import annotations

import numpy as np


def image_grid(images: np.ndarray, cols: int, scale: int = 4) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one [rows*H*scale, cols*W*scale, C] image in [0, 1]."""
    images = np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)
    n, h, w, ch = images.shape
    rows = -(-n // cols)
    images = np.concatenate([images, np.zeros((rows * cols - n, h, w, ch), np.float32)])
    grid = images.reshape(rows, cols, h, w, ch).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, ch)
    return grid.repeat(scale, 0).repeat(scale, 1)
