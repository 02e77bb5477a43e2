"""Gaussian conditionings of the backbone's own shapes: any backbone trains without text encoders
(tests, benchmarks). Zero unconditional conditioning."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dpdmd_jax import core
from dpdmd_jax.core import Cond, RoundBatch
from dpdmd_jax.data.base import HostSource


class RandomSource(HostSource):
    no_prompts = "data.kind='random' draws conditionings, not prompts"

    def __init__(self, c: ml_collections.ConfigDict, backbone: core.Backbone, mesh=None, rules=None):
        self.seed, self.batch = c.seed, c.batch_size
        self.rows = c.distill.fake_updates_per_student + 1
        self.spec = backbone.cond_spec(self.batch)

    def round(self, r: int, rows: slice) -> RoundBatch:
        # Drawn whole and sliced: these are small test inputs (a real source builds only its rows).
        rng = np.random.default_rng([self.seed, r])
        cond = jax.tree.map(lambda s: rng.standard_normal((self.rows, *s.shape), np.float32)[:, rows], self.spec)
        return RoundBatch(cond=cond, uncond=self.uncond(rows.stop - rows.start))

    def uncond(self, n: int) -> Cond:
        return jax.tree.map(lambda s: np.zeros((n, *s.shape[1:]), s.dtype), self.spec)
