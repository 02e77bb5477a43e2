"""Data sources: where each round's conditionings come from (`config.data.kind`).

One protocol: `round(r, rows)` returns the host (numpy) `RoundBatch` of round r restricted to
the global batch rows `rows` (a slice): conditionings [M + 1, len(rows), ...] for the M critic
updates and the generator update, and the unconditional conditioning [len(rows), ...]. A source
is a pure function of (config.seed, r), so a resumed run replays the same data, and each process
builds only the rows its devices hold (the trainer asks for exactly those).
"""

from __future__ import annotations

import importlib
import os
from typing import Protocol

import ml_collections

from dpdmd_jax.backbones import Backbone
from dpdmd_jax.distill.step import RoundBatch


class DataSource(Protocol):
    def round(self, r: int, rows: slice) -> RoundBatch: ...


SOURCES = {
    "toy": "dpdmd_jax.data.toy:ToySource",  # the toy's class prompts
    "random": "dpdmd_jax.data.random:RandomSource",  # Gaussian conditionings of the backbone's shapes (tests)
    "prompts": None,  # a text file of prompts, through the text encoders (not ported yet)
}


def problems(c: ml_collections.ConfigDict) -> list[str]:
    """Cheap checks of the data config and inputs, one sentence each, before anything is loaded."""
    if c.data.kind not in SOURCES:
        return [f"data.kind={c.data.kind!r}; choose one of {tuple(SOURCES)}."]
    if c.data.kind != "prompts":
        return []
    if not c.data.prompt_file or not os.path.isfile(c.data.prompt_file):
        return [f"data.prompt_file={c.data.prompt_file!r} does not exist; point it at a text file with one "
                "prompt per line (--config.data.prompt_file=prompts.txt)."]
    with open(c.data.prompt_file, encoding="utf-8") as f:
        if not any(line.strip() for line in f):
            return [f"data.prompt_file={c.data.prompt_file!r} holds no prompts."]
    return ["data.kind='prompts' needs the SD3 text encoders (CLIP-L, OpenCLIP-bigG, T5-XXL) to turn prompts "
            "into `context`/`pooled` embeddings, and they are not ported yet (tracked in the text-encoder "
            "issue). Until then only the toy (--config=configs/toy.py) can train."]


def make_source(c: ml_collections.ConfigDict, backbone: Backbone) -> DataSource:
    module, name = SOURCES[c.data.kind].split(":")
    return getattr(importlib.import_module(module), name)(c, backbone)
