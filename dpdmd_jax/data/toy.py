"""The toy's prompts: class ids drawn from a generator seeded by (seed, round)."""

from __future__ import annotations

import ml_collections
import numpy as np

from dpdmd_jax import backbones
from dpdmd_jax.distill.step import RoundBatch
from dpdmd_jax.toy import data as toy_data


class ToySource:
    """Class-conditioned toy prompts embedded by the toy's fixed "text encoder"
    (`toy.data.class_embedding`); the unconditional branch is its NULL class (zeros)."""

    def __init__(self, c: ml_collections.ConfigDict, backbone: backbones.Backbone, mesh=None, rules=None):
        if backbone.cond_type is not backbones.SD3Cond:
            raise ValueError(f"the toy data source makes SD3-shaped conditioning; backbone {c.backbone!r} "
                             f"takes {backbone.cond_type.__name__}")
        spec = backbone.cond_spec(1)
        self.context_len, self.context_dim = spec.context.shape[1:]
        self.pooled_dim = spec.pooled.shape[1]
        self.seed, self.batch = c.seed, c.batch_size
        self.rows = c.distill.fake_updates_per_student + 1

    def embed(self, class_ids: np.ndarray) -> backbones.SD3Cond:
        """Class ids of any shape (NULL_CLASS = -1: unconditional) -> SD3Cond with that leading shape."""
        ids = np.asarray(class_ids)
        context, pooled = toy_data.class_embedding(ids.reshape(-1), self.context_dim, self.pooled_dim,
                                                   self.context_len)
        return backbones.SD3Cond(context.reshape(*ids.shape, *context.shape[1:]),
                                 pooled.reshape(*ids.shape, -1))

    def class_ids(self, r: int) -> np.ndarray:
        """Round r's class ids [M + 1, batch] (all of the global batch: ints, cheap)."""
        ids = np.random.default_rng([self.seed, r]).integers(0, toy_data.NUM_CLASSES, size=self.rows * self.batch)
        return ids.reshape(self.rows, self.batch)

    def round(self, r: int, rows: slice) -> RoundBatch:
        ids = self.class_ids(r)[:, rows]
        return RoundBatch(cond=self.embed(ids), uncond=self.embed(np.full(ids.shape[1], toy_data.NULL_CLASS)))
