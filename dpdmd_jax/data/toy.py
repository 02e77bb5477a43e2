"""The toy's prompts: class ids drawn from a generator seeded by (seed, round)."""

from __future__ import annotations

import ml_collections
import numpy as np

from collections.abc import Sequence

from dpdmd_jax import core
from dpdmd_jax.config import gan_on_real_data
from dpdmd_jax.core import Cond, RoundBatch
from dpdmd_jax.data.base import HostSource
from dpdmd_jax.toy import data as toy_data
from dpdmd_jax.toy import teacher as toy_teacher


# Folded into the round's generator seed for the GAN's real images (the class ids use (seed, r)).
_REAL_SEED = 0x5245414C


class ToySource(HostSource):
    """Class-conditioned toy prompts embedded by the toy's fixed "text encoder"
    (`toy.data.class_embedding`) into the backbone's conditioning (SD3Cond, or SDXLCond with the
    toy's time ids); the unconditional branch is its NULL class (zeros; SDXL keeps its time ids).
    With the GAN on real data (gan.weight > 0, gan.real="data") each round also carries real toy
    images of its class ids, the data's own layouts, in the [-1, 1] scale the toy teachers were
    trained on (their latents are the images)."""

    def __init__(self, c: ml_collections.ConfigDict, backbone: core.Backbone, mesh=None, rules=None):
        if backbone.cond_type not in (core.SD3Cond, core.SDXLCond):
            raise ValueError(f"the toy data source makes SD3- or SDXL-shaped conditioning; backbone {c.backbone!r} "
                             f"takes {backbone.cond_type.__name__}")
        self.cond_type = backbone.cond_type
        spec = backbone.cond_spec(1)
        self.context_dim = spec.context.shape[2]
        self.pooled_dim = (spec.pooled if self.cond_type is core.SD3Cond else spec.text_embeds).shape[1]
        if spec.context.shape[1] != toy_teacher.CONTEXT_LEN:
            raise ValueError(f"backbone {c.backbone!r} with model.source={c.model.source!r} takes "
                             f"{spec.context.shape[1]} context tokens; the toy's text encoder makes "
                             f"{toy_teacher.CONTEXT_LEN} (use model.source='toy' or 'random')")
        self.seed, self.batch = c.seed, c.batch_size
        self.rows = c.distill.fake_updates_per_student + 1
        self.with_real = gan_on_real_data(c)
        image_shape = (toy_data.IMAGE_SIZE, toy_data.IMAGE_SIZE, 3)
        if self.with_real and tuple(backbone.latent_shape()) != image_shape:
            raise ValueError(f"gan.real='data' gives the toy's images {image_shape} as latents; backbone "
                             f"{c.backbone!r} takes {tuple(backbone.latent_shape())} (use gan.real='teacher')")

    def embed(self, class_ids: np.ndarray):
        """Class ids of any shape (NULL_CLASS = -1: unconditional) -> the backbone's cond with that
        leading shape."""
        return toy_teacher.toy_cond(class_ids, self.cond_type, self.context_dim, self.pooled_dim)

    def class_ids(self, r: int) -> np.ndarray:
        """Round r's class ids [M + 1, batch] (all of the global batch: ints, cheap)."""
        ids = np.random.default_rng([self.seed, r]).integers(0, toy_data.NUM_CLASSES, size=self.rows * self.batch)
        return ids.reshape(self.rows, self.batch)

    def real_images(self, r: int) -> np.ndarray:
        """Round r's real images [M + 1, batch, 16, 16, 3] of its class ids (all of the global batch, so
        every process draws the same layouts: a 16x16 image is cheap to render)."""
        ids = self.class_ids(r)
        rng = np.random.default_rng([self.seed, r, _REAL_SEED])
        images = toy_data.sample_batch(rng, ids.size, ids.reshape(-1))["images"]
        return images.reshape(*ids.shape, *images.shape[1:])

    def round(self, r: int, rows: slice) -> RoundBatch:
        ids = self.class_ids(r)[:, rows]
        real = self.real_images(r)[:, rows] if self.with_real else None
        return RoundBatch(cond=self.embed(ids), uncond=self.uncond(ids.shape[1]), real=real)

    def prompts(self) -> list[str]:
        """The class names ("red square", ...), the only prompts the toy's text encoder knows."""
        return list(toy_data.CLASS_NAMES)

    def prompt_problems(self, prompts: Sequence[str]) -> list[str]:
        unknown = sorted({p for p in prompts if p not in toy_data.CLASS_NAMES})
        if unknown:
            return [f"the toy's prompts are its class names {toy_data.CLASS_NAMES}; unknown: {unknown[:5]}"]
        return []

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        return self.embed(np.array([toy_data.class_id(p) for p in prompts]))

    def eval_cond(self, n: int) -> Cond:
        return self.encode_prompts(self.prompts()[:n])

    def uncond(self, n: int) -> Cond:
        # NULL_CLASS: zero embeddings (SDXLCond keeps the toy's time ids in both branches).
        return self.embed(np.full(n, toy_data.NULL_CLASS))
