"""The embedded toy problem: a procedurally rendered, text-conditioned image distribution.

Each image is 16x16x3, float32 in [-1, 1], NHWC, and is used directly as the diffusion latent
(no VAE). Background is -1 (black); there is one object per image. The prompt (a class id)
fixes the object's attributes (shape x colour, 6 classes); the layout (centre and size) is
drawn per sample from a continuous distribution with real spread, so the toy has exactly the
kind of per-prompt diversity that DP-DMD is meant to preserve, and that diversity can be read
back exactly by `dpdmd_jax.toy.metrics`.

Coordinates: pixel (row i, column j) covers [j, j+1] x [i, i+1]; its centre is
(x, y) = (j + 0.5, i + 0.5). `cx`, `cy` and `size` are in pixels in that frame.
"""

from __future__ import annotations

import functools

import numpy as np

IMAGE_SIZE = 16
SHAPES = ("square", "circle")
COLOURS = ("red", "green", "blue")
# class id = shape_index * len(COLOURS) + colour_index
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
NUM_CLASSES = len(CLASS_NAMES)
NULL_CLASS = -1  # the unconditional "prompt" used for CFG
SIZE_RANGE = (2.5, 5.0)  # square half-side / circle radius, pixels
# The object's extent stays this far inside the image edge, so its anti-aliased edge (pixels
# whose centre is within 0.5 px of the shape) is whole: the detector sees all of its area, and
# the outermost pixel ring is at most half covered, never foreground.
EDGE_MARGIN = 0.5


def class_shape(class_ids: np.ndarray) -> np.ndarray:
    """Shape index (0 square, 1 circle) of each class id."""
    return np.asarray(class_ids) // len(COLOURS)


def class_colour(class_ids: np.ndarray) -> np.ndarray:
    """Colour index (0 red, 1 green, 2 blue) of each class id."""
    return np.asarray(class_ids) % len(COLOURS)


def class_id(name: str) -> int:
    """Class id of a prompt such as "red square"."""
    return CLASS_NAMES.index(name.strip().lower())


def layout_stats() -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and std of the data's layout features (cx, cy, size).

    size ~ U[lo, hi]; given size s, the centre is uniform on an interval of length
    L = c - 2 s with c = IMAGE_SIZE - 2 * EDGE_MARGIN, so Var(cx) = E[L^2] / 12.
    """
    lo, hi = SIZE_RANGE
    c = IMAGE_SIZE - 2 * EDGE_MARGIN
    e_l2 = ((c - 2 * lo) ** 3 - (c - 2 * hi) ** 3) / (6 * (hi - lo))
    pos_std = np.sqrt(e_l2 / 12)
    mean = np.array([IMAGE_SIZE / 2, IMAGE_SIZE / 2, (lo + hi) / 2])
    std = np.array([pos_std, pos_std, (hi - lo) / np.sqrt(12)])
    return mean, std


def render(class_ids: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Render one object per image -> float32 [B, 16, 16, 3] in [-1, 1].

    Edges are anti-aliased with a 1-px linear ramp of the distance to the edge, so images are
    continuous functions of the layout (learnable by a small network). For squares the ramp is
    separable, which is the exact box-filtered pixel coverage: the foreground area sums to
    exactly (2 * size)^2. For circles, clip(0.5 - signed distance) is a close approximation.
    """
    class_ids = np.asarray(class_ids)
    b = class_ids.shape[0]
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    dx = np.abs(grid[None, None, :] - np.asarray(cx, np.float32)[:, None, None])  # [B, 1, W]
    dy = np.abs(grid[None, :, None] - np.asarray(cy, np.float32)[:, None, None])  # [B, H, 1]
    s = np.asarray(size, np.float32)[:, None, None]
    square = np.clip(s + 0.5 - dx, 0, 1) * np.clip(s + 0.5 - dy, 0, 1)
    circle = np.clip(s + 0.5 - np.sqrt(dx * dx + dy * dy), 0, 1)
    is_circle = (class_shape(class_ids) == 1)[:, None, None]
    coverage = np.where(is_circle, circle, square)  # [B, H, W]
    # Object pixels are the pure colour (+1 in one channel, -1 elsewhere); background is -1.
    onehot = np.eye(len(COLOURS), dtype=np.float32)[class_colour(class_ids)]  # [B, 3]
    images = -1.0 + 2.0 * coverage[..., None] * onehot[:, None, None, :]
    return images.astype(np.float32).reshape(b, IMAGE_SIZE, IMAGE_SIZE, 3)


def sample_layout(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw (cx, cy, size): size uniform in SIZE_RANGE, centre uniform where the object fits."""
    size = rng.uniform(*SIZE_RANGE, batch)
    lo = size + EDGE_MARGIN
    hi = IMAGE_SIZE - lo
    cx = lo + (hi - lo) * rng.uniform(size=batch)
    cy = lo + (hi - lo) * rng.uniform(size=batch)
    return cx.astype(np.float32), cy.astype(np.float32), size.astype(np.float32)


def sample_batch(
    rng: np.random.Generator | int, batch: int, class_ids: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """A batch of data: dict(images [B,16,16,3] f32, class_ids [B] i32, cx, cy, size [B] f32).

    `class_ids` None draws classes uniformly. An int `rng` is a seed (same seed, same batch).
    """
    rng = np.random.default_rng(rng)
    if class_ids is None:
        class_ids = rng.integers(0, NUM_CLASSES, batch)
    class_ids = np.asarray(class_ids, np.int32)
    if class_ids.shape != (batch,) or class_ids.min() < 0 or class_ids.max() >= NUM_CLASSES:
        raise ValueError(f"class_ids must be {batch} ids in [0, {NUM_CLASSES}), got {class_ids}")
    cx, cy, size = sample_layout(rng, batch)
    images = render(class_ids, cx, cy, size)
    return dict(images=images, class_ids=class_ids, cx=cx, cy=cy, size=size)


@functools.lru_cache(maxsize=8)
def _embedding_tables(context_len: int, context_dim: int, pooled_dim: int, seed: int):
    rng = np.random.default_rng(seed)
    # Unit-variance entries: comparable in scale to normalised text-encoder outputs, and each
    # class vector has norm ~sqrt(D), far from the all-zero null embedding.
    context = rng.standard_normal((NUM_CLASSES, context_len, context_dim)).astype(np.float32)
    pooled = rng.standard_normal((NUM_CLASSES, pooled_dim)).astype(np.float32)
    # Row NUM_CLASSES is the null embedding; index -1 (NULL_CLASS) selects it.
    context = np.concatenate([context, np.zeros((1, context_len, context_dim), np.float32)])
    pooled = np.concatenate([pooled, np.zeros((1, pooled_dim), np.float32)])
    context.setflags(write=False)
    pooled.setflags(write=False)
    return context, pooled


def class_embedding(
    class_ids: np.ndarray,
    context_dim: int,
    pooled_dim: int,
    context_len: int = 4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The toy's text encoder: class ids -> (context [B, L, D_ctx], pooled [B, D_pool]), f32.

    Fixed seeded random vectors per class, standing in for a frozen text encoder. NULL_CLASS
    (-1) maps to all zeros, like SDXL's zeroed negative prompt: zeros are a conditioning no
    class can produce, need no learned parameter, and the same constant is available to the
    teacher's CFG-dropout training, its CFG sampling and DMD's real-score uncond branch.
    """
    ids = np.asarray(class_ids)
    if ids.size and (ids.min() < NULL_CLASS or ids.max() >= NUM_CLASSES):
        raise ValueError(f"class ids must be in [{NULL_CLASS}, {NUM_CLASSES}), got {ids}")
    context, pooled = _embedding_tables(context_len, context_dim, pooled_dim, seed)
    # -1 indexes the last row (the null embedding); fancy indexing returns fresh arrays.
    return context[ids], pooled[ids]
