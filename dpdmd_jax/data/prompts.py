"""Prompt sources: a UTF-8 text file (one prompt per line) or the DiffusionDB TFDS dataset, read in
an order that is a pure function of (seed, round), tokenized on each host for the rows it holds
and encoded on device by the backbone's text encoder.

Order: the global sample index of round r, batch m (of the M + 1), row b is
i = (r (M + 1) + m) B + b; it reads prompt perm_e[i mod N] of epoch e = i div N, where perm_e is a
permutation seeded by (seed, e). A resumed run therefore reads exactly what the uninterrupted one
would have, and no host needs more than the indices of its own rows.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dpdmd_jax.core import Cond, RoundBatch
from dpdmd_jax.parallel import mesh as mesh_lib


class PromptFileError(ValueError):
    """The prompt file is missing, empty or unreadable."""


def read_prompt_file(path: str) -> tuple[list[str], int]:
    """(prompts, number of lines skipped because they are not UTF-8). Blank lines are skipped."""
    if not os.path.isfile(path):
        raise PromptFileError(f"prompt file {path!r} does not exist")
    prompts, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                bad += 1
                continue
            if line:
                prompts.append(line)
    if not prompts:
        raise PromptFileError(f"prompt file {path!r} holds no prompts" + (f" ({bad} non-UTF-8 lines skipped)"
                                                                           if bad else ""))
    return prompts, bad


class PromptOrder:
    """Which prompt each (round, batch, row) reads; see the module docstring."""

    def __init__(self, num_prompts: int, seed: int, rows_per_round: int, batch: int):
        self.n, self.seed, self.rows, self.batch = num_prompts, seed, rows_per_round, batch

    @functools.lru_cache(maxsize=2)  # noqa: B019  (one source per run; a round spans <= 2 epochs)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def indices(self, r: int, rows: slice) -> np.ndarray:
        """Prompt indices [M + 1, len(rows)] of round r's global batch rows `rows`."""
        m = np.arange(self.rows)[:, None]
        b = np.arange(rows.start, rows.stop)[None, :]
        i = (r * self.rows + m) * self.batch + b
        epoch, j = np.divmod(i, self.n)
        out = np.empty_like(i)
        for e in np.unique(epoch):
            out[epoch == e] = self._perm(int(e))[j[epoch == e]]
        return out


class TextSource:
    """Prompts -> token ids on the host (this process's rows) -> conditionings on device."""

    def __init__(self, c: ml_collections.ConfigDict, prompts: Sequence[str], text_encoder, mesh: jax.sharding.Mesh):
        self.prompt_list, self.text, self.mesh = prompts, text_encoder, mesh
        self.order = PromptOrder(len(prompts), c.seed, c.distill.fake_updates_per_student + 1, c.batch_size)
        self.batch = c.batch_size
        self.truncated = 0  # prompts truncated so far by this process
        empty = text_encoder.empty()  # [1, ...]: the embedding of "", the unconditional branch
        sharded = lambda x: jax.jit(lambda e: jnp.broadcast_to(e, (self.batch, *e.shape[1:])),
                                    out_shardings=mesh_lib.batch_sharding(mesh, x.ndim))(x)
        self.global_uncond = jax.tree.map(sharded, empty)
        self.empty = jax.device_get(empty)

    def __len__(self) -> int:
        return len(self.prompt_list)

    def prompts(self) -> Sequence[str]:
        return self.prompt_list

    def prompt_problems(self, prompts: Sequence[str]) -> list[str]:
        return []

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Conditionings of `prompts` (device arrays, encoders sharded on the mesh)."""
        return self.text.encode(list(prompts))

    def uncond(self, n: int) -> Cond:
        """The embedding of "" for n rows (host arrays)."""
        return jax.tree.map(lambda e: np.broadcast_to(np.asarray(e), (n, *e.shape[1:])), self.empty)

    def round(self, r: int, rows: slice) -> RoundBatch:
        idx = self.order.indices(r, rows)
        tokens, truncated = self.text.tokenize([self.prompt_list[i] for i in idx.reshape(-1)])
        if truncated.any():
            self.truncated += int(truncated.sum())
            logging.log_every_n_seconds(
                logging.WARNING, "%d prompts so far were longer than the tokenizers' limits and were truncated "
                "(as the diffusers pipeline does)", 600, self.truncated)
        return RoundBatch(cond=jax.tree.map(lambda x: x.reshape(*idx.shape, *x.shape[1:]), tokens), uncond=None)

    def encode(self, batch: RoundBatch) -> RoundBatch:
        """Global token arrays -> global conditionings (device); the uncond is computed once."""
        return RoundBatch(cond=self.text.encode_tokens(batch.cond), uncond=self.global_uncond)

    def eval_cond(self, n: int):
        """Conditionings of the first n prompts (fixed sample grids), on device."""
        return self.encode_prompts([self.prompt_list[i] for i in range(min(n, len(self)))])


def text_file_prompts(c: ml_collections.ConfigDict) -> list[str]:
    prompts, bad = read_prompt_file(c.data.prompt_file)
    if bad:
        logging.warning("%s: skipped %d lines that are not valid UTF-8", c.data.prompt_file, bad)
        print(f"{c.data.prompt_file}: skipped {bad} lines that are not valid UTF-8; {len(prompts)} prompts remain")
    return prompts
