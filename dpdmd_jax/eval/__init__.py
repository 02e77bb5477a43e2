"""Evaluators: sample writers and metrics the trainer runs, chosen by the config.

In the style of big_vision, each entry of `config.evals` is `name: dict(type=..., every=..., **kw)`:
`every` > 0 runs it every that many rounds and after the last round; `every` = 0 only once training
has finished (not after a pre-emption). The loop knows nothing of what an evaluator does (`core.Evaluator`):

    class MyEvaluator:
        def __init__(self, run: sampling.sampler.SamplingRun, workdir, **kw): ...
        def run(self, step: int, state: TrainState, writer: distill.writers.MetricWriter) -> dict | None: ...

An evaluator reads of the run only what sampling reads (`SamplingRun`: the mesh, the distiller's
sample functions, the frozen buffers, the data source's prompt encoding, the backbone's VAE).

Results returned by `every = 0` evaluators make up the run's summary (what `train` returns).
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

from dpdmd_jax.core import Evaluator

EVALUATORS = {
    "toy_grid": "dpdmd_jax.eval.toy:ToyGrid",  # student sample grid (6 classes x 8 seeds) to TensorBoard
    "toy_metrics": "dpdmd_jax.eval.toy:ToyMetrics",  # analytic toy metrics, student vs teacher, summary.json
    "samples": "dpdmd_jax.eval.samples:SampleGrid",  # VAE-decoded student samples, fixed prompts x seeds
}


def problems(c: ml_collections.ConfigDict) -> list[str]:
    p = []
    for name, e in c.get("evals", {}).items():
        if e.get("type") not in EVALUATORS:
            p.append(f"evals.{name}.type={e.get('type')!r}; choose one of {tuple(EVALUATORS)}.")
        if not isinstance(e.get("every", None), int) or e.every < 0:
            p.append(f"evals.{name}.every={e.get('every')!r} must be an integer >= 0 (0: once, after training).")
    return p


def make_evaluators(c: ml_collections.ConfigDict, run: Any, workdir: str) -> dict[str, tuple[int, Evaluator]]:
    """{name: (every, evaluator)} for every entry of `config.evals`."""
    out = {}
    for name, e in c.get("evals", {}).items():
        kw = {k: v for k, v in e.items() if k not in ("type", "every")}
        module, cls = EVALUATORS[e.type].split(":")
        out[name] = (e.every, getattr(importlib.import_module(module), cls)(run, workdir, **kw))
    return out
