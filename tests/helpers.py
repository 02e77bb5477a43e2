"""Shared test utilities that need neither torch nor diffusers / transformers (the unit tier
imports only these; the torch-based reference builders are in tests/torch_helpers.py)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The repository root (tests/ is one level below it): the working directory of CLI subprocesses.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The sharded toy run several tests share: `configs/toy.py:smoke` on a data=2 x fsdp=2 mesh of 4 devices
# (batch rows over both axes, parameters over fsdp). The in-process tests train it on jax.devices()[:4]
# and the CLI runs they compare with see 4 devices, so each side compiles its round once per session
# (the persistent compile cache is keyed on the devices a program sees).
SHARDED_MESH = {"mesh.data": 2, "mesh.fsdp": 2}
SHARDED_DEVICES = 4
SHARDED_FLAGS = tuple(f"--config.{k}={v}" for k, v in SHARDED_MESH.items())
# The rounds of `uninterrupted_smoke_run` (tests/conftest.py), which the SIGKILLed CLI run and the pre-empted
# SLURM job must end like; the smoke config checkpoints every 2, so an interruption after the first
# checkpoint lands rounds before the end.
UNINTERRUPTED_ROUNDS = 6


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, built by `build(folder)` once per test session whichever pytest-xdist
    worker asks first; the others wait for it under a file lock and read it. (A session fixture runs
    once per worker, so an expensive one -- a trained run, a pipeline -- would be built twice.) The
    folder is read-only by convention: a test that changes it works on a copy."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # basetemp/popen-gwN: the parent is this session's, shared by its workers
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            (base / f"{name}.done").touch()
    return folder


def optimized_jit(fn: Callable, **kw):
    """`jax.jit(fn)` with LLVM's optimisations on for this one program (tests/conftest.py turns them off,
    `--xla_backend_optimization_level=0`: most tests compile far more than they run). For a test that runs
    one program for many steps: the shipped toy UNet teacher's 54-image, 30-step guided draw takes 13.4
    CPU-s against 25.8 at level 0 (compile included), with the same images."""
    import jax

    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 2}, **kw)


def read_metrics(workdir) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per logged round)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def save_random_mmdit(folder, seed: int = 0, **arch):
    """A small random `MMDiT` (diffusers `SD3Transformer2DModel` config fields in `arch`) with every
    parameter perturbed (so zero-initialised ones are exercised too), written as a diffusers
    transformer folder by our exporter (`save_mmdit`): the checkpoint `load_mmdit` reads, built
    without torch. Returns the model."""
    import jax
    from flax import nnx

    from dpdmd_jax.models.mmdit import MMDiT, MMDiTConfig
    from dpdmd_jax.weights.sd3 import save_mmdit

    model = MMDiT(MMDiTConfig(**arch), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params))
    save_mmdit(model, folder)
    return model


def train_rounds(c, devices, rounds: int = 2):
    """`rounds` jitted rounds of the run `c` builds on `devices`: (run, host copies of the initial
    (state, frozen) -- the round donates the state --, the final state, per-round metrics, the round)."""
    import jax

    from dpdmd_jax.run import setup as setup_lib

    run = setup_lib.build(c, devices=devices)
    state, shardings = setup_lib.init_train_state(run)
    start = jax.tree.map(np.array, (state, run.frozen))
    fn = setup_lib.compile_round(run, shardings)
    history = []
    for r in range(rounds):
        state, metrics = fn(state, run.frozen, setup_lib.round_batch(run, r))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return run, start, state, history, fn
