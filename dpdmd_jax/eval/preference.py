"""Preference scores on our CLIP towers: PickScore (a transformers `CLIPModel`) and HPSv2 / HPSv2.1
(an OpenCLIP ViT-H-14 state dict), each computed as its authors' reference code does.

  * PickScore (yuvalkirstain/PickScore_v1; its README): the processor of the model's folder
    (PickScore's README takes it from laion/CLIP-ViT-H-14-laion2B-s32B-b79K: CLIP's shortest side
    224 bicubic, centre crop 224, OpenAI mean / std; its CLIPTokenizer, 77 tokens), then
        image_embs = get_image_features / ||.||,  text_embs = get_text_features / ||.||
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)
    i.e. exp(logit_scale) * cos(image, prompt) per (image, prompt) pair (about 20 for a matching
    pair; the README's softmax over a prompt's images is left to the caller).
  * HPSv2 / HPSv2.1 (tgxs002/HPSv2, hpsv2/img_score.py): `create_model_and_transforms('ViT-H-14',
    light_augmentation=True)` and `HPS_v2(.1)_compressed.pt`, then
        image_features, text_features = model(image, text)   # both L2-normalised
        logits_per_image = image_features @ text_features.T;  hps_score = diagonal(...)
    i.e. cos(image, prompt), WITHOUT logit_scale (HPSv2's benchmark, evaluation.py, prints
    100 x this: the ~0.28 here is the ~28 in its tables).

Preprocessing:
  * PickScore: `dpdmd_jax.eval.preprocess.tower_preprocessing` with the processor folder's
    preprocessor_config.json: bit-exact with transformers' PIL image processor (its torchvision
    backend differs by at most one 8-bit level on some pixels, see that module).
  * HPSv2: img_score.py's `preprocess_val` is HPSv2's vendored open_clip `image_transform(224,
    is_train=False, resize_longest_max=True)`, NOT open_clip's default shortest-side resize and
    centre crop: ToTensor (uint8 / 255 in float32), then `ResizeMaxSize`: the LONGEST side to 224
    (each side `round(side * 224 / longest)`, bicubic, on the float tensor), zero padding (black,
    before normalisation) split floor / ceil on each axis, then OpenAI mean / std. A square image
    is just resized to 224 x 224. The resize is torchvision's tensor resize, i.e. torch
    `interpolate(mode="bicubic", align_corners=False, antialias=...)`: torchvision >= 0.17
    antialiases by default (`antialias=True` here, Pillow's filter in float32, equal to torch to
    ~1e-6); torchvision < 0.17, current when HPSv2 was released, did not (`antialias=False`:
    torch's plain bicubic, a = -0.75, clamped borders). The reference is fp16 under CUDA autocast;
    we compute in float32. One deliberate difference: ResizeMaxSize skips padding when the longest
    side is already 224, so a non-square image of that size would crash the reference; we pad it.
  * HPSv2's tokenizer is open_clip's: CLIP's BPE (the vocabulary of OpenAI CLIP's vocab.json /
    merges.txt, e.g. an SD3 pipeline's `tokenizer/` folder), text cleaned with ftfy + twice
    `html.unescape` + whitespace collapse + lower case, `[SOT] + tokens[:75] + [EOT]`, padded with
    0 (not the EOT id) to 77; the text tower pools at the largest id (EOT, 49407).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ftfy
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.eval import preprocess
from dpdmd_jax.models.clip import CLIPTextModel, CLIPVisionModel
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.text.tokenizers import check_vocabulary, load_tokenizer, tokenize
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.clip import FULL_CLASS_NAME, WEIGHTS_PREFIX, is_full_clip, load_clip_text, load_clip_vision
from dpdmd_jax.weights.open_clip import HF_WEIGHTS_NAME, VISION_PREFIX, load_open_clip
from dpdmd_jax.weights.safetensors_io import CheckpointError, index_checkpoint, read_header, read_tensor

PICKSCORE = "pickscore"
HPSV2 = "hpsv2"


def unit(x: jax.Array) -> jax.Array:
    """x / ||x|| along the last axis, in float32 (torch `F.normalize`: the norm floored at 1e-12)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class PreferenceModel(nnx.Module):
    """A CLIP pair of towers with their projections and the logit scale (as stored: its log).
    `__call__(pixel_values, input_ids)` scores row i of the images against row i of the prompts:
    exp(logit_scale) * cos (`scaled`, PickScore) or cos alone (HPSv2)."""

    def __init__(self, text: CLIPTextModel, vision: CLIPVisionModel, logit_scale: jax.Array, *, scaled: bool):
        if text.text_projection is None or vision.visual_projection is None:
            raise ValueError("a preference model needs both projections (text_projection, visual_projection)")
        self.text, self.vision = text, vision
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale, jnp.float32))
        self.scaled = scaled

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """[B, D] unit image embeddings of preprocessed NHWC pixel values."""
        return unit(self.vision(pixel_values).image_embeds)

    def text_embeds(self, input_ids: jax.Array) -> jax.Array:
        """[B, D] unit text embeddings of token ids [B, L]."""
        return unit(self.text(input_ids).text_embeds)

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array) -> jax.Array:
        cos = jnp.sum(self.image_embeds(pixel_values) * self.text_embeds(input_ids), axis=-1)
        return jnp.exp(self.logit_scale[...]) * cos if self.scaled else cos


@dataclasses.dataclass
class PreferenceScorer:
    """A loaded preference model with its own image preprocessing and tokenization; `score` is
    one jitted program (towers, preprocessing and the score) per batch shape."""

    name: str  # PICKSCORE or HPSV2
    model: PreferenceModel
    preprocess: Callable[[jax.Array], jax.Array]  # NHWC uint8 / [0, 1] float -> pixel values
    output_size: Callable[[int, int], tuple[int, int]]  # (h, w) -> the pixel values' (h, w)
    token_ids: Callable[[Sequence[str]], np.ndarray]  # prompts -> int32 [N, L]
    description: str
    mesh: Mesh | None = None
    per_device_batch: int = 8

    def __post_init__(self):
        graph, self._state = nnx.split(self.model)
        out = mesh_lib.replicated(self.mesh) if self.mesh is not None else None
        self._run = jax.jit(lambda st, x, ids: nnx.merge(graph, st)(self.preprocess(x), ids), out_shardings=out)

    def check_input(self, height: int, width: int) -> None:
        """The vision tower's position table is for image_size only (no interpolation)."""
        size = self.model.vision.cfg.image_size
        got = tuple(self.output_size(height, width))
        if got != (size, size):
            raise ValueError(f"{self.name}: {height}x{width} images become {got[0]}x{got[1]} pixel values, but "
                             f"the tower takes {size}x{size} (its image_size)")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[N] float64 scores of images[i] (NHWC uint8, or float in [0, 1]) against prompts[i]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC RGB [N, H, W, 3], got {list(images.shape)}")
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        self.check_input(*images.shape[1:3])
        ids = self.token_ids(prompts)
        div = mesh_lib.batch_divisor(self.mesh) if self.mesh is not None else 1
        batch = min(self.per_device_batch * div, math.ceil(len(images) / div) * div)  # one shape for every chunk
        out = []
        for start in range(0, len(images), batch):
            x, t = images[start:start + batch], ids[start:start + batch]
            n = len(x)
            x, t = (np.concatenate([a, np.repeat(a[:1], batch - n, 0)]) for a in (x, t))
            if self.mesh is not None:
                x, t = mesh_lib.global_batch(self.mesh, x), mesh_lib.global_batch(self.mesh, t)
            s = self._run(self._state, x, t)
            out.append(np.asarray(s.addressable_data(0) if self.mesh is not None else s, np.float64)[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float64)


# ---------------------------------------------------------------------------- PickScore


def transformers_clip_folder(path: str) -> dict[str, Any]:
    """The config.json of a full transformers CLIPModel folder; an open_clip file or folder, or a
    single-tower folder, is refused naming what loads it."""
    open_clip_file = path.endswith(".safetensors") and os.path.isfile(path) and any(
        k.startswith((VISION_PREFIX, "transformer.resblocks.")) for k in read_header(path))
    if open_clip_file or os.path.isfile(os.path.join(path, HF_WEIGHTS_NAME)):
        raise CheckpointError(f"{path} is an open_clip checkpoint (HPSv2's format), not a transformers CLIPModel "
                              "folder; load it with dpdmd_jax.eval.preference.load_hpsv2")
    if os.path.isfile(path):
        raise CheckpointError(f"{path} is a file; PickScore loads a transformers CLIPModel folder (config.json + "
                              "model.safetensors, e.g. PickScore_v1). An open_clip checkpoint (HPSv2's format) "
                              "loads with dpdmd_jax.eval.preference.load_hpsv2")
    raw = loader.read_folder_config(path, (FULL_CLASS_NAME,), "transformers CLIPModel (both towers, e.g. PickScore_v1)")
    if not is_full_clip(raw):
        raise CheckpointError(f"{path}/config.json is not a full CLIPModel (model_type 'clip'); PickScore needs both "
                              "towers, both projections and logit_scale")
    return raw


def read_logit_scale(folder: str) -> np.ndarray:
    """A transformers CLIPModel folder's stored `logit_scale` (the log of the scale)."""
    tensors = index_checkpoint(folder, WEIGHTS_PREFIX)
    if "logit_scale" not in tensors:
        raise CheckpointError(f"{folder}: its weights have no logit_scale; not a full CLIPModel checkpoint")
    return read_tensor(tensors["logit_scale"]).astype(np.float32)


def load_pickscore(
    model: str | os.PathLike,
    processor: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    per_device_batch: int = 8,
    progress: bool = False,
) -> PreferenceScorer:
    """PickScore: exp(logit_scale) * cos(image, prompt) with a transformers CLIPModel.

    Args:
      model: the CLIPModel folder (PickScore_v1: config.json + model.safetensors).
      processor: the folder with its CLIPTokenizer files and preprocessor_config.json (PickScore's
        README uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor); default: `model`.
      dtype: compute and storage dtype of the towers.
      mesh: shard the parameters (and each batch) over this mesh.
    """
    folder = os.fspath(model)
    proc = os.fspath(processor) if processor is not None else folder
    transformers_clip_folder(folder)  # before any weights file is opened
    tokenizer = load_tokenizer(proc, "clip")
    kw = dict(dtype=dtype, mesh=mesh, rules=rules, progress=progress)
    text, vision = load_clip_text(folder, **kw), load_clip_vision(folder, **kw)
    problems = check_vocabulary(tokenizer, text.cfg.vocab_size, f"PickScore tokenizer {proc}", text.cfg.eos_token_id)
    if problems:
        raise CheckpointError("; ".join(problems))
    where = os.path.join(proc, preprocess.PROCESSOR_CONFIG)
    prep = preprocess.tower_preprocessing("clip", vision.cfg.image_size, preprocess.read_processor_config(proc),
                                          where=where)
    length = text.cfg.max_position_embeddings
    return PreferenceScorer(
        PICKSCORE, PreferenceModel(text, vision, read_logit_scale(folder), scaled=True), prep, prep.output_size,
        lambda prompts: tokenize(tokenizer, prompts, length).ids,
        f"PickScore {folder}: exp(logit_scale) * cos, images {prep.describe()}", mesh, per_device_batch)


# ---------------------------------------------------------------------------- HPSv2


def open_clip_clean(text: str) -> str:
    """open_clip's `basic_clean`: ftfy.fix_text, html.unescape twice, strip. (CLIPTokenizer then
    collapses whitespace and lower-cases, as open_clip's `whitespace_clean(...).lower()`.)"""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def open_clip_token_ids(tokenizer: Any, prompts: Sequence[str], context_length: int = 77) -> np.ndarray:
    """int32 [N, context_length] ids as open_clip's tokenizer gives them from a transformers
    CLIPTokenizer of the same BPE: [SOT] + tokens + [EOT], truncated to keep the EOT, padded with 0."""
    rows = tokenizer([open_clip_clean(p) for p in prompts], truncation=True, max_length=context_length,
                     add_special_tokens=True).input_ids
    ids = np.zeros((len(rows), context_length), np.int32)  # open_clip pads with 0, not the EOT id
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids


@functools.cache
def torch_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 weights of torch `interpolate(mode="bicubic", align_corners=False,
    antialias=False)`: source x = (i + 0.5) * in / out - 0.5, Keys' cubic with a = -0.75 on the
    4 taps floor(x) - 1 .. floor(x) + 2, indices clamped to the image (torch's CPU kernel, float32)."""
    f, a = np.float32, np.float32(-0.75)
    scale = f(in_size) / f(out_size)
    out = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        x = scale * (f(i) + f(0.5)) - f(0.5)
        idx = min(int(np.floor(x)), in_size - 1)
        t = min(max(x - f(idx), f(0.0)), f(1.0))
        near = lambda d: ((a + f(2)) * d - (a + f(3))) * d * d + f(1)  # |d| <= 1
        far = lambda d: ((a * d - f(5) * a) * d + f(8) * a) * d - f(4) * a  # 1 < |d| < 2
        for j, w in enumerate((far(t + f(1)), near(t), near(f(1) - t), far(f(2) - t))):
            out[i, min(max(idx - 1 + j, 0), in_size - 1)] += w
    return out


def hpsv2_output_size(height: int, width: int, size: int = 224) -> tuple[int, int]:
    """ResizeMaxSize's resized (h, w): each side round(side * size / longest) (Python's round)."""
    scale = size / float(max(height, width))
    return (round(height * scale), round(width * scale)) if scale != 1.0 else (height, width)


def hpsv2_preprocess(images: jax.Array, size: int = 224, *, antialias: bool = True) -> jax.Array:
    """HPSv2's `preprocess_val` (module docstring) on NHWC uint8 or [0, 1] float images: float32
    [B, size, size, 3] pixel values, the longest side resized to `size`, zero-padded, normalised."""
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [batch, height, width, channels], got {list(images.shape)}")
    _, h, w, _ = images.shape
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)  # ToTensor
    nh, nw = hpsv2_output_size(h, w, size)
    if (nh, nw) != (h, w):
        weights = preprocess.torch_float_weights if antialias else (lambda i, o, _: torch_bicubic_weights(i, o))
        mh, mw = (jnp.asarray(weights(i, o, "bicubic")) for i, o in ((h, nh), (w, nw)))
        x = jnp.einsum("bhwc,oh,pw->bopc", x, mh, mw, precision=jax.lax.Precision.HIGHEST)
    ph, pw = size - nh, size - nw  # torchvision F.pad([left, top, right, bottom]) with fill 0
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    return preprocess.normalize(x, preprocess.OPENAI_CLIP_MEAN, preprocess.OPENAI_CLIP_STD)


def load_hpsv2(
    weights: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    antialias: bool = True,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    per_device_batch: int = 8,
    progress: bool = False,
) -> PreferenceScorer:
    """HPSv2 / HPSv2.1: cos(image, prompt) (no logit_scale) with OpenCLIP ViT-H-14 towers.

    Args:
      weights: the open_clip checkpoint as .safetensors (HPS_v2(.1)_compressed.pt converted once
        with `python -m dpdmd_jax.weights.open_clip --pt=... --out=...`).
      tokenizer: a transformers CLIPTokenizer folder with OpenAI CLIP's BPE (vocab.json +
        merges.txt), e.g. an SD3 / SDXL pipeline's `tokenizer/` folder.
      config: the open_clip model config (default: ViT-H-14, see `weights.open_clip`).
      antialias: the resize of torchvision >= 0.17 (True) or of older torchvision (False).
      dtype: compute and storage dtype of the towers.
      mesh: shard the parameters (and each batch) over this mesh.
    """
    tok = load_tokenizer(os.fspath(tokenizer), "clip")
    towers = load_open_clip(weights, config, dtype=dtype, mesh=mesh, rules=rules, progress=progress)
    what = f"HPSv2 tokenizer {os.fspath(tokenizer)}"
    problems = check_vocabulary(tok, towers.text.cfg.vocab_size, what)
    if tok.eos_token_id != len(tok) - 1:  # open_clip pools at argmax(ids): the EOT must be the largest id
        problems.append(f"{what}: its end-of-text id {tok.eos_token_id} is not its largest id ({len(tok) - 1}); "
                        "not CLIP's BPE tokenizer")
    if problems:
        raise CheckpointError("; ".join(problems))
    size, length = towers.vision.cfg.image_size, towers.text.cfg.max_position_embeddings
    prep = functools.partial(hpsv2_preprocess, size=size, antialias=antialias)
    return PreferenceScorer(
        HPSV2, PreferenceModel(towers.text, towers.vision, towers.logit_scale, scaled=False), prep,
        lambda h, w: (size, size), lambda prompts: open_clip_token_ids(tok, prompts, length),
        f"HPSv2 {os.fspath(weights)}: cos (no logit scale), images: longest side {size} "
        f"({'antialiased ' if antialias else ''}bicubic), zero-padded to {size}x{size}", mesh, per_device_batch)
