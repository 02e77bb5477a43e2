"""DMD v1's regression pairs, precomputed: a pair cache is a teacher sample folder of
`python -m dpdmd_jax.sample --sampler=teacher --pairs` (`sampling.sampler.sample_with`), which
beside each image keeps what the regression needs:

  latents/p{p:05d}_s{s:03d}.npy   the teacher's guided T-step sample of (prompt p, seed s), in latents
  cond/p{p:05d}.npz               prompt p's conditioning (one array per field of the backbone's Cond)
  samples.jsonl, run.json         the rows (prompt index, seed) and what made them (grid, CFG, root seed)

The noise of (p, s) is not stored: it is a pure function of the root seed and (p, s)
(`diffusion.sampler.image_key`), as the sampler drew it, so the cache maps "noise seed -> latent" as
DMD v1's does. Storing the conditionings makes the cache independent of the run's data source (an
embedding cache cannot encode new prompts, and a run from one may still regress on pairs).

Each round's generator update regresses on `batch_size` pairs drawn from the cache by (seed, round),
a pure function of them like every data source's rounds, so a resumed run draws the same pairs.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from dpdmd_jax.core import Backbone, Pairs, RoundBatch
from dpdmd_jax.diffusion.sampler import image_noise

LATENTS, CONDS = "latents", "cond"
# Folded into the round's generator seed for the pairs it draws (the data sources use (seed, r)).
_PAIR_SEED = 0x50414952


def latent_path(out: str, name: str) -> str:
    return str(epath.Path(out) / LATENTS / f"{name}.npy")


def cond_path(out: str, p: int) -> str:
    return str(epath.Path(out) / CONDS / f"p{p:05d}.npz")


def read_run(folder: str) -> dict:
    """A pair cache's run.json, or FileNotFoundError saying what the folder lacks."""
    path = epath.Path(folder) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a pair cache (no run.json): write one with python -m "
                                "dpdmd_jax.sample --sampler=teacher --pairs --out=FOLDER")
    return json.loads(path.read_text())


def _load(path: str) -> np.ndarray | dict:
    """A .npy / .npz file (local or gs://, through etils.epath)."""
    loaded = np.load(io.BytesIO(epath.Path(path).read_bytes()))
    return dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded


def problems(c: ml_collections.ConfigDict, teacher_grid: Sequence[float]) -> list[str]:
    """Why regression.pairs cannot serve this run, one sentence each (before anything loads): the
    folder, and that its pairs were made by this config's teacher (model, grid, CFG)."""
    folder = c.regression.pairs
    try:
        made = read_run(folder)
    except FileNotFoundError as e:
        return [f"regression.pairs: {e}"]
    if made.get("sampler") != "teacher" or not made.get("pairs"):
        return [f"regression.pairs={folder!r} holds {made.get('sampler')} samples without pairs; write a pair cache "
                "with python -m dpdmd_jax.sample --sampler=teacher --pairs"]
    wanted = dict(backbone=c.backbone, cfg_scale=float(c.teacher.cfg_scale),
                  grid=[round(float(x), 6) for x in teacher_grid])
    have = dict(backbone=made.get("backbone"), cfg_scale=made.get("cfg_scale"),
                grid=[round(float(x), 6) for x in made.get("grid", [])])
    diff = [f"{k}: {have[k]} in the cache, {v} in this run" for k, v in wanted.items() if have[k] != v]
    if diff:
        return [f"regression.pairs={folder!r} was made by another teacher ({'; '.join(diff)}); write it with this "
                "run's config"]
    return []


@dataclasses.dataclass
class PairCache:
    """The pairs of a cache folder; `pairs(r, rows)` gives round r's host arrays."""

    folder: str
    jobs: list[tuple[int, int, str]]  # (prompt index, seed, file name stem), sorted
    root_seed: int
    latent_shape: tuple[int, ...]
    cond_type: type
    batch: int
    seed: int

    @classmethod
    def open(cls, c: ml_collections.ConfigDict, backbone: Backbone) -> PairCache:
        folder = c.regression.pairs
        made = read_run(folder)
        text = (epath.Path(folder) / "samples.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        jobs = sorted({(r["prompt_index"], r["seed"], r["file"].rsplit(".", 1)[0]) for r in rows})
        missing = [name for _, _, name in jobs if not epath.Path(latent_path(folder, name)).is_file()]
        if not jobs or missing:
            raise FileNotFoundError(f"regression.pairs={folder!r}: {len(missing)} of {len(jobs)} pairs have no latents "
                                    f"(e.g. {missing[:3]}); rerun the sample command that wrote it to finish it")
        return cls(folder, jobs, int(made["seed"]), tuple(backbone.latent_shape()), backbone.cond_type,
                   c.batch_size, c.seed)

    def __len__(self) -> int:
        return len(self.jobs)

    def indices(self, r: int) -> np.ndarray:
        """Round r's pairs for the whole global batch [batch] (cheap ints: every process draws the same)."""
        return np.random.default_rng([self.seed, r, _PAIR_SEED]).integers(0, len(self.jobs), size=self.batch)

    def pairs(self, r: int, rows: slice) -> Pairs:
        jobs = [self.jobs[i] for i in self.indices(r)[rows]]
        conds = [_load(cond_path(self.folder, p)) for p, _, _ in jobs]
        cond = self.cond_type(**{f.name: np.stack([c[f.name] for c in conds]).astype(np.float32)
                                 for f in dataclasses.fields(self.cond_type)})
        target = np.stack([_load(latent_path(self.folder, name)) for _, _, name in jobs]).astype(np.float32)
        p, s = (np.array([j[k] for j in jobs], np.int32) for k in (0, 1))
        return Pairs(cond=cond, noise=np.asarray(pair_noise(self.root_seed, p, s, self.latent_shape)), target=target)


# The sampler's noise of images (p, s), computed where the cache is read.
pair_noise = jax.jit(image_noise, static_argnums=(0, 3))


class PairedSource:
    """A data source whose rounds also carry the regression's cached pairs (`RoundBatch.pairs`) for
    the generator update; everything else is the wrapped source's."""

    def __init__(self, source, cache: PairCache):
        self.source, self.cache = source, cache

    def __getattr__(self, name):
        return getattr(self.source, name)

    def round(self, r: int, rows: slice) -> RoundBatch:
        return self.source.round(r, rows).replace(pairs=self.cache.pairs(r, rows))

    def encode(self, batch: RoundBatch) -> RoundBatch:
        return self.source.encode(batch).replace(pairs=batch.pairs)
