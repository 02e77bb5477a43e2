"""Real images for DMD2's GAN on real models: an image folder with captions (`data.image_folder`) read in
both layouts, images resized and centre-cropped, and an embedding cache that holds each image's latents on
the row of its caption, so every round's real images come with their own captions as conditionings (the
cache built through a pipeline's VAE and trained from: tests/integration/test_sd35_pipeline.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from configs import toy as toy_config
from dpdmd_jax import backbones
from dpdmd_jax.config import override
from dpdmd_jax.core import SD3Cond
from dpdmd_jax.data import problems
from dpdmd_jax.data.embeddings import EmbeddingSource, write_cache
from dpdmd_jax.data.image_folder import ImageFolderError, load_image, read_image_folder

N = 6


def _png(path, colour, size=(4, 4)):
    Image.new("RGB", size, colour).save(path)


def test_both_folder_layouts_and_what_is_missing_is_named(tmp_path):
    side = tmp_path / "side"
    side.mkdir()
    for i in (1, 0):
        _png(side / f"{i}.png", (i, 0, 0))
        (side / f"{i}.txt").write_text(f"caption {i}\n")
    (side / "notes.md").write_text("not an image")
    assert read_image_folder(str(side)) == [(str(side / "0.png"), "caption 0"), (str(side / "1.png"), "caption 1")]

    meta = tmp_path / "meta"
    (meta / "img").mkdir(parents=True)
    _png(meta / "img" / "a.jpg", (0, 0, 0))
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "img/a.jpg", "caption": "a cat"}) + "\n\n")
    assert read_image_folder(str(meta), "caption") == [(str(meta / "img" / "a.jpg"), "a cat")]
    with pytest.raises(ImageFolderError, match=r"needs 'file_name' and a string caption in 'text' .*--caption_column"):
        read_image_folder(str(meta))  # the default column is "text"

    with open(meta / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ImageFolderError, match="line 3 is not JSON"):
        read_image_folder(str(meta), "caption")

    _png(side / "2.png", (2, 0, 0))
    with pytest.raises(ImageFolderError, match=r"2.png has no caption: write it to .*2.txt"):
        read_image_folder(str(side))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="holds no images"):
        read_image_folder(str(tmp_path / "empty"))


def test_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
    im = np.zeros((8, 40, 3), np.uint8)  # wide: red on the left, green in the middle, blue on the right
    im[:, :12, 0] = im[:, 12:28, 1] = im[:, 28:, 2] = 255
    Image.fromarray(im).save(tmp_path / "wide.png")
    x = load_image(str(tmp_path / "wide.png"), 4)  # 8 x 40 -> 4 x 20 -> columns 8..12: the green's middle
    assert x.shape == (4, 4, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, np.broadcast_to([-1.0, 1.0, -1.0], (4, 4, 3)))  # all green, in [-1, 1]


class CaptionNumbers:
    """A text encoder that writes caption i's number into every value of its conditioning."""

    def __init__(self, spec: SD3Cond):
        self.spec = spec

    def _cond(self, values):
        v = np.asarray(values, np.float32)
        fill = lambda s: np.broadcast_to(v.reshape(-1, *[1] * (len(s.shape) - 1)), (len(v), *s.shape[1:])).copy()
        return SD3Cond(fill(self.spec.context), fill(self.spec.pooled))

    def empty(self):
        return self._cond([-1.0])

    def encode(self, prompts):
        return self._cond([float(p.split()[-1]) for p in prompts])

    def tokenize(self, prompts):
        return None, np.zeros(len(prompts), bool)


def test_a_cache_with_images_gives_each_round_real_latents_beside_their_captions(tmp_path):
    c = override(toy_config.get_config("smoke"), {
        "backbone": "tiny_flow", "model.source": "random", "data.kind": "embeddings", "data.latent_size": (4, 4),
        "data.cache_dir": str(tmp_path / "cache"), "gan.weight": 0.5, "gan.real": "data"})
    variant = lambda values: override(c.copy_and_resolve_references(), values)  # `override` sets in place
    backbone = backbones.get(c)
    captions = [f"caption {i}" for i in range(N)]
    image = lambda i: np.full((4, 4, 3), 10.0 + i, np.float32)  # image i's latents: 10 + i everywhere
    # `encode_images(start, stop)` gives the latents of the images whose captions are prompts start..stop.
    write_cache(c.data.cache_dir, captions, CaptionNumbers(backbone.cond_spec(1)), SD3Cond, meta={}, batch=4,
                dtype="float32", encode_images=lambda a, b: np.stack([image(i) for i in range(a, b)]))
    assert problems(c) == []
    source = EmbeddingSource(c, backbone)
    M = c.distill.fake_updates_per_student
    for r in range(3):
        batch = source.round(r, slice(1, 5))
        assert batch.real.shape == (M + 1, 4, 4, 4, 3)
        caption = batch.cond.pooled[..., 0]  # [M + 1, 4]: which caption each row holds
        np.testing.assert_array_equal(batch.real, np.broadcast_to((caption + 10.0)[..., None, None, None],
                                                                  batch.real.shape))
        assert set(caption.reshape(-1)) <= set(range(N))
    assert EmbeddingSource(variant({"gan.weight": 0.0}), backbone).round(0, slice(0, 2)).real is None

    write_cache(str(tmp_path / "text_only"), captions, CaptionNumbers(backbone.cond_spec(1)), SD3Cond, meta={},
                batch=4, dtype="float32")
    [problem] = problems(variant({"data.cache_dir": str(tmp_path / "text_only")}))
    assert "holds none: build one with --images=FOLDER" in problem and "--config.gan.real=teacher" in problem
    [problem] = problems(variant({"data.latent_size": (8, 8)}))
    assert "holds real latents of 4x4, and data.latent_size is (8, 8)" in problem
