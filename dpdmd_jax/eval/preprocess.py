"""Image preprocessing of the evaluation towers, as pure JAX functions on NHWC images (float in
[0, 1], or uint8), matching the transformers image processors these checkpoints ship with:

  * CLIP (openai/clip-vit-large-patch14, `CLIPImageProcessor`): resize the shortest side to 224
    (bicubic), centre crop 224 x 224, rescale 1/255, normalise with OpenAI CLIP's mean / std;
  * DINOv2 (facebook/dinov2-*, `BitImageProcessor` with the checkpoints' preprocessor_config:
    shortest side 256 bicubic, centre crop 224, ImageNet mean / std; the class defaults,
    shortest side 224 and CLIP's statistics, are not what the DINOv2 checkpoints use);
  * DINOv3 (facebook/dinov3-*, `DINOv3ViTImageProcessor`): rescale 1/255 first, then resize to
    224 x 224 (bilinear, antialiased, aspect ratio not kept, no crop), ImageNet mean / std.

Resampling is a separable matmul with the antialiased filter weights of Pillow's
`ImagingResample` (torch's `interpolate(..., antialias=True)` uses the same ones): for a
downscale by s the filter is stretched by s, the window is [centre - support, centre + support],
weights are normalised to sum to one; bicubic is Keys' cubic with a = -0.5, bilinear the triangle.

Two modes for CLIP and DINOv2:
  * `exact_uint8=True` (default): the image is taken to 8 bits (uint8 input as is, float input
    rounded from [0, 1] * 255) and resampled with Pillow's 8-bit fixed-point arithmetic (22-bit
    integer coefficients, horizontal pass then vertical pass, each rounded and clipped to
    0..255), in int32. This is bit-exact with the transformers PIL backend
    (`CLIPImageProcessorPil`, `BitImageProcessorPil`: what transformers uses without
    torchvision, and the PIL path of OpenAI's own CLIP preprocessing); tests/test_vision.py
    checks it to float32 rounding.
    transformers' torchvision backend (the default when torchvision is installed) resizes uint8
    tensors with torch's own uint8 kernel, whose fixed-point rounding differs from Pillow's by
    at most one 8-bit level on some pixels; that cannot be matched here.
  * `exact_uint8=False`: float resampling without quantisation or clipping, with the float32
    weights torch's `interpolate(antialias=True)` computes for float tensors (the torchvision
    backend fed floats): equal to it to float32 summation order (~1e-6).

DINOv3's processor resamples floats (it rescales before resizing), so `dinov3_preprocess` is
the float path; float inputs are used unquantised, uint8 inputs are rescaled first.

The sizes above are the published checkpoints'. A tower folder is preprocessed by
`tower_preprocessing`: as its own `preprocessor_config.json` says (what
`AutoImageProcessor.from_pretrained` reads for that checkpoint), or, without one, at the tower
config's `image_size` (a ViT's position table is made for it; CLIP cannot run at another size).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's 8-bit resampling: coefficients in fixed point with this many fractional bits.
PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@functools.cache
def resize_weights(in_size: int, out_size: int, filter: str = "bicubic") -> np.ndarray:
    """[out_size, in_size] float64 antialiased resampling weights (Pillow `precompute_coeffs`)."""
    fn, support = FILTERS[filter]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    out = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C casts truncate toward zero, as int() does
        hi = min(int(center + support + 0.5), in_size)
        w = fn((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = w.sum()
        out[i, lo:hi] = w / total if total != 0.0 else w
    return out


def _torch_filter(filter: str, x: np.float32) -> np.float32:
    """torch's `aa_filter` in float32 (bicubic a = -0.5, the Pillow-compatible antialias filter)."""
    f, one = np.float32, np.float32(1.0)
    x = abs(f(x))
    if filter == "bilinear":
        return one - x if x < one else f(0.0)
    a = f(-0.5)
    if x < one:
        return ((a + f(2)) * x - (a + f(3))) * x * x + one
    if x < f(2):
        return ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a
    return f(0.0)


@functools.cache
def torch_float_weights(in_size: int, out_size: int, filter: str = "bicubic") -> np.ndarray:
    """[out_size, in_size] float32 weights of torch `interpolate(mode=filter, antialias=True,
    align_corners=False)` on float32 tensors: Pillow's scheme (`resize_weights`) evaluated as
    torch's CPU kernel does, in float32 (the window centre, the filter and the normalisation),
    which differs from the float64 weights by up to ~1e-5 at large coordinates."""
    f = np.float32
    scale = f(in_size) / f(out_size)
    support = f((FILTERS[filter][1]) * (float(scale) if scale >= 1.0 else 1.0))
    invscale = f(1.0 / float(scale)) if scale >= 1.0 else f(1.0)
    max_size = int(np.ceil(support)) * 2 + 1
    out = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = f(float(scale) * (i + 0.5))
        lo = max(int(float(center) - float(support) + 0.5), 0)
        size = min(max(min(int(float(center) + float(support) + 0.5), in_size) - lo, 0), max_size)
        w = [_torch_filter(filter, f((float(f(j + lo) - center) + 0.5) * float(invscale))) for j in range(size)]
        total = f(0.0)
        for v in w:
            total = f(total + v)
        out[i, lo : lo + size] = [v / total for v in w] if total != 0.0 else w
    return out


@functools.cache
def pil_int_weights(in_size: int, out_size: int, filter: str = "bicubic") -> np.ndarray:
    """`resize_weights` as Pillow's 8-bit fixed-point coefficients (`normalize_coeffs_8bpc`:
    w * 2**22 rounded half away from zero), int32."""
    w = resize_weights(in_size, out_size, filter) * (1 << PRECISION_BITS)
    return np.trunc(w + np.where(w < 0, -0.5, 0.5)).astype(np.int32)


def output_size_shortest_edge(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers `get_resize_output_image_size(default_to_square=False)`: the short side
    becomes `shortest_edge`, the long side int(shortest_edge * long / short)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop_box(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of transformers' centre crop ((size - crop) // 2 per axis)."""
    if crop[0] > height or crop[1] > width:
        raise ValueError(f"centre crop {crop[0]}x{crop[1]} is larger than the resized image {height}x{width}")
    return (height - crop[0]) // 2, (width - crop[1]) // 2


def to_uint8_levels(images: jax.Array) -> jax.Array:
    """uint8 images as int32, or float images in [0, 1] rounded to the nearest of 0..255."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.int32)
    return jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.int32)


def _clip8(acc: jax.Array) -> jax.Array:
    return jnp.clip(jnp.right_shift(acc, PRECISION_BITS), 0, 255)


def _taps(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A banded [out, in] weight matrix as (index, weight) [out, taps] pairs: each output's
    window of nonzero weights (padded with zero weights), so a pass is `taps` gathers and
    multiply-adds instead of an integer matmul (which XLA:GPU runs untiled, slowly)."""
    nonzero = weights != 0
    lo = np.where(nonzero.any(1), nonzero.argmax(1), 0)
    hi = np.where(nonzero.any(1), weights.shape[1] - nonzero[:, ::-1].argmax(1), 0)
    taps = max(int((hi - lo).max()), 1)
    index = np.minimum(lo[:, None] + np.arange(taps)[None], weights.shape[1] - 1)
    weight = np.where(np.arange(taps)[None] < (hi - lo)[:, None], np.take_along_axis(weights, index, 1), 0)
    return index.astype(np.int32), weight.astype(weights.dtype)


def _pil_pass(x: jax.Array, weights: np.ndarray, axis: int) -> jax.Array:
    """One Pillow 8-bit pass along `axis` (1: H, 2: W) of int32 [B, H, W, C] levels:
    (2**21 + sum x * k) >> 22 clipped to 0..255, in exact int32 arithmetic (Pillow accumulates
    in int32 too; its coefficient bound keeps the sums in range)."""
    index, weight = _taps(weights)
    shape = [1] * x.ndim
    shape[axis] = weight.shape[0]
    acc = jnp.full((), 1 << (PRECISION_BITS - 1), jnp.int32)
    for t in range(weight.shape[1]):
        acc = acc + jnp.take(x, jnp.asarray(index[:, t]), axis=axis) * jnp.asarray(weight[:, t]).reshape(shape)
    return _clip8(acc)


def _rows(weights: np.ndarray, start: int, size: int) -> np.ndarray:
    return weights[start : start + size]


def resize_crop(
    images: jax.Array,
    size: tuple[int, int],
    crop: tuple[int, int] | None = None,
    *,
    filter: str = "bicubic",
    exact_uint8: bool = True,
) -> jax.Array:
    """Resizes NHWC images to `size` (h, w) with antialiased `filter`, then centre-crops to `crop`
    (the crop is folded into the weights: only kept rows / columns are computed).

    exact_uint8: Pillow's 8-bit arithmetic (returns float32 levels 0..255, see the module
    docstring); else float resampling of the input as is (float32 out).
    """
    _, h, w, _ = images.shape
    crop = crop or size
    top, left = center_crop_box(size[0], size[1], crop)
    if exact_uint8:
        kh = _rows(pil_int_weights(h, size[0], filter), top, crop[0])
        kw = _rows(pil_int_weights(w, size[1], filter), left, crop[1])
        x = to_uint8_levels(images)
        return _pil_pass(_pil_pass(x, kw, 2), kh, 1).astype(jnp.float32)  # Pillow: horizontal pass first
    mh = _rows(torch_float_weights(h, size[0], filter), top, crop[0])
    mw = _rows(torch_float_weights(w, size[1], filter), left, crop[1])
    x = images.astype(jnp.float32)
    return jnp.einsum("bhwc,oh,pw->bopc", x, jnp.asarray(mh), jnp.asarray(mw), precision=jax.lax.Precision.HIGHEST)


# uint8 level -> float32 as transformers' rescale computes it (float64 v * (1/255), then float32).
_RESCALE_LUT = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(x - mean) / std per channel, in float32 (transformers `normalize`)."""
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _rescale_levels(levels: jax.Array) -> jax.Array:
    return jnp.take(jnp.asarray(_RESCALE_LUT), levels.astype(jnp.int32))


def resize_shortest_crop_normalize(
    images: jax.Array, shortest_edge: int, crop_size: int, mean: Sequence[float], std: Sequence[float],
    *, exact_uint8: bool = True,
) -> jax.Array:
    """The CLIPImageProcessor / BitImageProcessor pipeline: shortest side -> `shortest_edge`
    (bicubic), centre crop `crop_size` square, rescale 1/255, normalise. NHWC in, float32 out."""
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [batch, height, width, channels], got {list(images.shape)}")
    _, h, w, _ = images.shape
    size = output_size_shortest_edge(h, w, shortest_edge)
    x = resize_crop(images, size, (crop_size, crop_size), filter="bicubic", exact_uint8=exact_uint8)
    if exact_uint8:
        x = _rescale_levels(x)
    elif images.dtype == jnp.uint8:
        x = x / 255.0
    return normalize(x, mean, std)


def clip_preprocess(images: jax.Array, *, size: int = 224, crop_size: int = 224, exact_uint8: bool = True) -> jax.Array:
    """CLIP ViT-L/14 pixel values ([B, 224, 224, 3] float32) from NHWC images."""
    return resize_shortest_crop_normalize(images, size, crop_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                          exact_uint8=exact_uint8)


def dinov2_preprocess(
    images: jax.Array, *, size: int = 256, crop_size: int = 224, exact_uint8: bool = True
) -> jax.Array:
    """DINOv2 pixel values ([B, 224, 224, 3] float32) from NHWC images (facebook/dinov2-*'s
    preprocessor_config: shortest side 256, centre crop 224, ImageNet statistics)."""
    return resize_shortest_crop_normalize(images, size, crop_size, IMAGENET_MEAN, IMAGENET_STD,
                                          exact_uint8=exact_uint8)


def dinov3_preprocess(images: jax.Array, *, size: tuple[int, int] = (224, 224)) -> jax.Array:
    """DINOv3 pixel values ([B, 224, 224, 3] float32) from NHWC images: rescale to [0, 1] (uint8
    input), bilinear antialiased resize to `size` in float, ImageNet statistics."""
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [batch, height, width, channels], got {list(images.shape)}")
    x = _rescale_levels(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    x = resize_crop(x, tuple(size), filter="bilinear", exact_uint8=False)
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------- a tower's own processor

PROCESSOR_CONFIG = "preprocessor_config.json"
# PIL resample codes (transformers' `PILImageResampling`) of the filters implemented here.
RESAMPLE = {2: "bilinear", 3: "bicubic"}
# Per tower family: (statistics, filter, centre crop, resample floats). The CLIP and DINOv2
# processors resize 8-bit images (Pillow), DINOv3's rescales to float first (module docstring).
FAMILIES = {
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", True, False),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD, "bicubic", True, False),
    "dinov3": (IMAGENET_MEAN, IMAGENET_STD, "bilinear", False, True),
}


class PreprocessingError(ValueError):
    """A preprocessor_config.json this module cannot reproduce; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """One tower's image processor: resize (the shortest side to `shortest_edge`, or to exactly
    `size`), optional centre crop, rescale 1/255, normalise; NHWC uint8 or [0, 1] float in,
    float32 pixel values out. `source` says where the sizes came from (for the report)."""

    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    filter: str = "bicubic"
    float_resample: bool = False
    source: str = ""

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.shortest_edge is not None:
            return output_size_shortest_edge(height, width, self.shortest_edge)
        return self.size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the pixel values an image of `height` x `width` becomes: what the tower sees."""
        return self.crop or self.resized_size(height, width)

    def describe(self) -> str:
        """E.g. "224x224 pixels (shortest side 256, centre crop), from preprocessor_config.json"."""
        how = f"shortest side {self.shortest_edge}" if self.shortest_edge is not None else "resized"
        if self.crop:
            return f"{self.crop[0]}x{self.crop[1]} pixels ({how}, centre crop), from {self.source}"
        if self.size:
            return f"{self.size[0]}x{self.size[1]} pixels (resized), from {self.source}"
        return f"{how} (no crop), from {self.source}"

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC [batch, height, width, channels], got {list(images.shape)}")
        size = self.resized_size(*images.shape[1:3])
        if self.float_resample:  # rescale, then resample floats (DINOv3ViTImageProcessor's order)
            x = _rescale_levels(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
            x = resize_crop(x, size, self.crop, filter=self.filter, exact_uint8=False)
        else:  # 8-bit resampling as Pillow, then rescale (the PIL processors)
            x = _rescale_levels(resize_crop(images, size, self.crop, filter=self.filter))
        return normalize(x, self.mean, self.std)


def read_processor_config(folder: str) -> dict[str, Any] | None:
    """The folder's preprocessor_config.json, or None when it has none."""
    path = os.path.join(folder, PROCESSOR_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise PreprocessingError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise PreprocessingError(f"{path}: not a JSON object")
    return raw


def _pair(value: Any, what: str) -> tuple[int, int]:
    """A transformers size ({"height", "width"} or one int for a square) as (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict) and {"height", "width"} <= set(value):
        return int(value["height"]), int(value["width"])
    raise PreprocessingError(f"{what}={value!r}: expected {{'height': H, 'width': W}} or an integer")


def _check_supported(raw: dict[str, Any], where: str) -> None:
    """Refuses the processor options that are not implemented (rather than silently ignoring them)."""
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if raw.get(key, True) is False:
            raise PreprocessingError(f"{where}: {key}=false is not supported by the evaluator's preprocessing")
    factor = raw.get("rescale_factor", 1 / 255)
    if not np.isclose(factor, 1 / 255, rtol=1e-6):
        raise PreprocessingError(f"{where}: rescale_factor={factor} is not supported (only 1/255)")
    if "resample" in raw and raw["resample"] not in RESAMPLE:
        raise PreprocessingError(f"{where}: resample={raw['resample']!r} is not supported "
                                 f"(2 = bilinear or 3 = bicubic)")


def tower_preprocessing(family: str, image_size: int, processor: dict[str, Any] | None = None,
                        where: str = PROCESSOR_CONFIG) -> Preprocessing:
    """The preprocessing of a `family` ("clip" | "dinov2" | "dinov3") tower whose config's
    image_size is `image_size`: as its preprocessor_config.json (`processor`) says when given,
    as transformers would for that checkpoint; otherwise at `image_size`, the resolution the
    tower was built for (CLIP: shortest side and crop `image_size`; DINOv2: crop `image_size`
    from a shortest side 256/224 of it, the published checkpoints' ratio; DINOv3: `image_size`
    square). transformers' class defaults (224 whatever the tower) are deliberately not used."""
    mean, std, filter, crops, float_resample = FAMILIES[family]
    if processor is None:
        square = (image_size, image_size)
        if family == "dinov3":
            return Preprocessing(None, square, None, mean, std, filter, float_resample, "its config's image_size")
        edge = image_size * 256 // 224 if family == "dinov2" else image_size
        return Preprocessing(edge, None, square, mean, std, filter, float_resample, "its config's image_size")
    _check_supported(processor, where)
    size = processor.get("size", {"height": 224, "width": 224} if family == "dinov3" else {"shortest_edge": 224})
    shortest, exact = None, None
    if isinstance(size, dict) and "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
    elif isinstance(size, int) and not isinstance(size, bool) and family != "dinov3":
        shortest = size  # transformers reads a bare int as the shortest edge for these processors
    else:
        exact = _pair(size, f"{where}: size")
    crop = None
    if processor.get("do_center_crop", crops):
        crop = _pair(processor.get("crop_size", {"height": 224, "width": 224}), f"{where}: crop_size")
    filter = RESAMPLE.get(processor.get("resample"), filter)
    mean = tuple(processor.get("image_mean", mean))
    std = tuple(processor.get("image_std", std))
    return Preprocessing(shortest, exact, crop, mean, std, filter, float_resample, PROCESSOR_CONFIG)
