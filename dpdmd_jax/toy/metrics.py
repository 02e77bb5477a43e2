"""Analytic, exact metrics for the toy problem (numpy, no learned feature extractor).

Every toy image should hold one object whose attributes the prompt fixes (shape, colour) and
whose layout (cx, cy, size) is free. A hand-written detector reads all of these back from
pixels (exact to ~0.01-0.1 px on clean renders), so diversity and quality are measured in
the units the data was generated in, rather than through a network's features.

Samples are grouped as the paper's protocol: P prompts x R seeds, the R samples of a prompt
consecutive (`images.reshape(P, R, ...)`).
"""

from __future__ import annotations

import numpy as np

from dpdmd_jax.diversity import diversity
from dpdmd_jax.toy import data

SQUARE_FILL_THRESHOLD = 0.9  # a square fills 1.0 of its bounding box, a circle pi/4 (~0.79-0.83)
# One object's foreground pixel count must lie between half the smallest clean object's area
# (a circle of radius 2.5: 19.6 px) and 1.5x the largest (a square of half-side 5: 100 px):
# fewer is a speck, more is a smear (noise above mid-grey forms one huge "component").
MIN_OBJECT_PIXELS = 10
MAX_OBJECT_PIXELS = 150
# Values beyond the data's range [-1, 1] by more than this margin count as saturated.
SATURATION_MARGIN = 0.1
# Size of the fresh data sample the Frechet distance compares against (fixed seed).
REFERENCE_SIZE = 4096
REFERENCE_SEED = 1234


def _box3(x: np.ndarray, op: np.ufunc, fill) -> np.ndarray:
    """3x3 neighbourhood reduction (min / max / or) of every pixel of [B, H, W], padded with
    `fill`; separable, as a box reduction is, so 4 elementwise ops instead of 8."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    p = op(op(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])


def _count_components(mask: np.ndarray) -> np.ndarray:
    """Number of 8-connected components of each boolean mask [B, H, W] (vectorised min-label
    propagation: every pixel takes the smallest label in its neighbourhood until stable)."""
    b = mask.shape[0]
    big = np.iinfo(np.int32).max
    own = np.arange(mask[0].size, dtype=np.int32).reshape(mask.shape[1:])
    labels = np.where(mask, own[None], big)
    while True:
        new = np.where(mask, _box3(labels, np.minimum, big), big)
        if np.array_equal(new, labels):
            break
        labels = new
    return (mask & (labels == own[None])).reshape(b, -1).sum(1)


def detect(images: np.ndarray) -> dict[str, np.ndarray]:
    """The analytic detector, per image [B, 16, 16, 3] -> dict of [B] arrays.

    Keys: colour (0..2, -1 if empty), shape (0 square, 1 circle), cx, cy, size, area, fill,
    n_components, n_foreground, valid.

    coverage = (max channel + 1) / 2 inverts the renderer; foreground = max channel > 0
    (coverage > 1/2). Centre and area use the coverage over the foreground dilated by one
    pixel: that ring holds all of a clean object's anti-aliased edge, yet excludes faint
    background noise of generated samples, which would pull the centre of mass towards the
    image centre. Shape: area / (width * height), where width and height are the largest
    row / column sums of coverage (exactly 2 * half-side for a square). Empty images get the
    image centre and size 0 so that downstream statistics stay finite; `valid` flags them.
    """
    images = np.asarray(images, np.float32)
    m = np.maximum(np.maximum(images[..., 0], images[..., 1]), images[..., 2])
    fg = m > 0
    region = _box3(fg, np.logical_or, False)
    w = np.clip((m + 1) / 2, 0, 1) * region
    area = w.sum((1, 2))
    safe = np.maximum(area, 1e-6)
    grid = np.arange(images.shape[2], dtype=np.float32) + 0.5
    cx = np.where(area > 0, (w.sum(1) * grid).sum(1) / safe, data.IMAGE_SIZE / 2)
    cy = np.where(area > 0, (w.sum(2) * grid).sum(1) / safe, data.IMAGE_SIZE / 2)
    width, height = w.sum(2).max(1), w.sum(1).max(1)
    fill = area / np.maximum(width * height, 1e-6)
    shape = np.where(fill > SQUARE_FILL_THRESHOLD, 0, 1)
    size = np.where(shape == 0, np.sqrt(area) / 2, np.sqrt(area / np.pi))
    n_fg = fg.sum((1, 2))
    mean_fg = (images * fg[..., None]).sum((1, 2)) / np.maximum(n_fg, 1)[:, None]
    colour = np.where(n_fg > 0, mean_fg.argmax(-1), -1)
    n_comp = _count_components(fg)
    return dict(
        colour=colour, shape=shape, cx=cx, cy=cy, size=size, area=area, fill=fill,
        n_components=n_comp, n_foreground=n_fg,
        valid=(n_comp == 1) & (n_fg >= MIN_OBJECT_PIXELS) & (n_fg <= MAX_OBJECT_PIXELS),
    )


def pairwise_cosine_diversity(features: np.ndarray) -> float:
    """Paper's diversity (`dpdmd_jax.diversity.diversity`): 1 - mean pairwise cosine similarity among the
    R samples of each prompt (pairs i != j), averaged over prompts. features: [P, R, F], R >= 2."""
    return diversity(features)


def layout_of(det: dict[str, np.ndarray]) -> np.ndarray:
    """The detected layout (cx, cy, size) of each image, [N, 3] px."""
    return np.stack([det["cx"], det["cy"], det["size"]], -1)


def layout_spread(layout: np.ndarray, R: int) -> np.ndarray:
    """Per coordinate: std over each prompt's R consecutive samples (ddof 1), averaged over prompts."""
    return layout.reshape(-1, R, layout.shape[-1]).std(1, ddof=1).mean(0)


def layout_features(det: dict[str, np.ndarray]) -> np.ndarray:
    """Feature vectors for diversity_layout: [(cx, cy, size) standardised by the data, 1].

    Standardising by the data's exact mean/std makes the three coordinates comparable and
    measures a layout relative to the typical one; colour and shape are left out (the prompt
    fixes them). The constant last coordinate (one data std) anchors the vectors: without it,
    cosine sees only the direction from the mean layout, so a student whose layouts all shrink
    towards the mean by any factor would keep the data's diversity. With it, the cosine of two
    layouts rises as they approach the typical layout, as DINO/CLIP features (which share a
    large common component) do in the paper's metric; a fully collapsed set scores 0.
    """
    mean, std = data.layout_stats()
    z = (layout_of(det) - mean) / std
    return np.concatenate([z, np.ones_like(z[..., :1])], -1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, F] and b [M, F]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(A B) = sum sqrt(eig(sqrt(A) B sqrt(A))): symmetric PSD, so eigh suffices (no scipy).
    ev, vec = np.linalg.eigh(cov_a)
    sqrt_a = (vec * np.sqrt(np.clip(ev, 0, None))) @ vec.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def toy_metrics(images: np.ndarray, class_ids: np.ndarray, R: int) -> dict[str, float]:
    """All toy metrics for samples grouped as P prompts x R consecutive seeds.

    Diversity (paper: 1 - mean pairwise cosine within a prompt, averaged over prompts):
      diversity_layout: on `layout_features` (see there for why these features).
      diversity_pixel: on raw pixel vectors. Not centred per prompt: centring R vectors by
        their own mean forces their mean pairwise cosine to ~-1/(R-1) whatever the samples.
        Raw [-1, 1] pixels share the black background (a common component, as DINO features
        share one); for two clean objects 1 - cos = 2 |A xor B| / (3 * 256), the normalised
        area where they do not overlap.
    Layout spread: spread_cx / spread_cy / spread_size = std over a prompt's R samples
      (ddof 1), averaged over prompts, in px; divide by the teacher's for the spread ratio.
    Quality: adherence = colour and shape both match the prompt (colour_acc, shape_acc
      separately); valid = exactly one connected object, MIN_OBJECT_PIXELS..MAX_OBJECT_PIXELS pixels;
      frechet_layout = Frechet distance (px^2) between detected (cx, cy, size) of the samples
      and of REFERENCE_SIZE fresh data samples with the same classes (fixed seed; the detector
      runs on both, so its small bias cancels); render_residual = mean |image - clean render
      of the prompt's object at the detected layout| (ragged or off-palette objects);
      saturation = fraction of values outside [-1, 1] by more than SATURATION_MARGIN.
    """
    images = np.asarray(images, np.float32)
    class_ids = np.asarray(class_ids)
    n = images.shape[0]
    if R < 2 or n % R or class_ids.shape != (n,):
        raise ValueError(f"need P * R images (R >= 2), one class id each; got {n} images, R={R}")
    p = n // R
    if np.any(class_ids.reshape(p, R) != class_ids.reshape(p, R)[:, :1]):
        raise ValueError("the R consecutive samples of each prompt must share a class id")

    det = detect(images)
    layout = layout_of(det)
    spread = layout_spread(layout, R)

    ref_ids = np.resize(class_ids, max(n, REFERENCE_SIZE))
    ref = detect(data.sample_batch(REFERENCE_SEED, ref_ids.size, ref_ids)["images"])
    ref_layout = layout_of(ref)

    rerender = data.render(class_ids, det["cx"], det["cy"], det["size"])
    colour_ok = det["colour"] == data.class_colour(class_ids)
    shape_ok = det["shape"] == data.class_shape(class_ids)
    return dict(
        n_images=float(n),
        n_prompts=float(p),
        diversity_layout=pairwise_cosine_diversity(layout_features(det).reshape(p, R, -1)),
        diversity_pixel=pairwise_cosine_diversity(images.reshape(p, R, -1)),
        spread_cx=float(spread[0]),
        spread_cy=float(spread[1]),
        spread_size=float(spread[2]),
        adherence=float((colour_ok & shape_ok).mean()),
        colour_acc=float(colour_ok.mean()),
        shape_acc=float(shape_ok.mean()),
        valid=float(det["valid"].mean()),
        frechet_layout=frechet_distance(layout, ref_layout),
        render_residual=float(np.abs(images - rerender).mean()),
        saturation=float((np.abs(images) > 1 + SATURATION_MARGIN).mean()),
    )


def spread_ratio(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """Layout spread ratio student / teacher (1.0 = the teacher's layout diversity kept)."""
    return {f"spread_ratio_{k}": student[f"spread_{k}"] / teacher[f"spread_{k}"]
            for k in ("cx", "cy", "size")}
