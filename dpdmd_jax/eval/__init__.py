"""Evaluators: sample writers and metrics the trainer runs, chosen by the config.

In the style of big_vision, each entry of `config.evals` is `name: dict(type=..., every=..., **kw)`:
`every` > 0 runs it every that many rounds and after the last round; `every` = 0 only once training
has finished (not after a pre-emption). The trainer knows nothing of what an evaluator does:

    class Evaluator(Protocol):
        def __init__(self, setup, workdir, **kw): ...
        def run(self, step: int, state: TrainState, writer: clu MetricWriter) -> dict | None: ...

Results returned by `every = 0` evaluators make up the run's summary (what `train` returns).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import ml_collections
import numpy as np

EVALUATORS = {
    "toy_grid": "dpdmd_jax.eval.toy:ToyGrid",  # student sample grid (6 classes x 8 seeds) to TensorBoard
    "toy_metrics": "dpdmd_jax.eval.toy:ToyMetrics",  # analytic toy metrics, student vs teacher, summary.json
    "samples": "dpdmd_jax.eval.samples:SampleGrid",  # VAE-decoded student samples, fixed prompts x seeds
}


class Evaluator(Protocol):
    def run(self, step: int, state: Any, writer: Any) -> dict | None: ...


def problems(c: ml_collections.ConfigDict) -> list[str]:
    p = []
    for name, e in c.get("evals", {}).items():
        if e.get("type") not in EVALUATORS:
            p.append(f"evals.{name}.type={e.get('type')!r}; choose one of {tuple(EVALUATORS)}.")
        if not isinstance(e.get("every", None), int) or e.every < 0:
            p.append(f"evals.{name}.every={e.get('every')!r} must be an integer >= 0 (0: once, after training).")
    return p


def make_evaluators(c: ml_collections.ConfigDict, setup: Any, workdir: str) -> dict[str, tuple[int, Evaluator]]:
    """{name: (every, evaluator)} for every entry of `config.evals`."""
    out = {}
    for name, e in c.get("evals", {}).items():
        kw = {k: v for k, v in e.items() if k not in ("type", "every")}
        module, cls = EVALUATORS[e.type].split(":")
        out[name] = (e.every, getattr(importlib.import_module(module), cls)(setup, workdir, **kw))
    return out


def image_grid(images: np.ndarray, cols: int, scale: int = 4) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one [rows*H*scale, cols*W*scale, C] image in [0, 1]."""
    images = np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)
    n, h, w, ch = images.shape
    rows = -(-n // cols)
    images = np.concatenate([images, np.zeros((rows * cols - n, h, w, ch), np.float32)])
    grid = images.reshape(rows, cols, h, w, ch).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, ch)
    return grid.repeat(scale, 0).repeat(scale, 1)
