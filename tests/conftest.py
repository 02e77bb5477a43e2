"""Test environment: 8 virtual CPU devices stand in for a pod; model hubs are never contacted."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests compile many small graphs once each: cheap LLVM codegen halves XLA:CPU compile time
# (HLO-level optimisation, hence numerics, is unchanged).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA:CPU's MLIR fusion emitters run an MLIR pass pipeline per fusion, a third of a small round's
# compile; the older LLVM IR emitters need less CPU for the tests' programs (a script compiling the
# toy smoke round's generator update: 33.3 -> 24.8 CPU-s; the suite: user 39:44 -> 32:20), though
# more for SDXL's larger round (docs/benchmarks/scan-remat-compile.md, "XLA:CPU's two kernel
# emitters"). The suite is CPU-bound on 2 cores; the numbers tests compare are computed under the
# same flags (CLI subprocesses inherit them).
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Identical graphs compiled by several tests, workers or the CLI subprocesses tests start are
# compiled once (env vars, so subprocesses inherit them).
_cache = os.path.join(os.environ.get("TMPDIR", "/tmp"), "dpdmd_jax_test_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
# Parity tests compare fp32 numbers to 1e-5: no TF32-style shortcuts in matmuls. Set through the
# environment, so the CLI subprocesses tests start lower the same programs as the test process
# (the precision is in every dot's HLO: a jax.config.update here alone would make their compiles
# miss the persistent cache entries of the in-process ones, and the other way round).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import pytest  # noqa: E402  (after the environment above: nothing here imports jax at module level)


# Fixtures shared by tests of several tiers: session-scoped, so the tests of every tier that read
# them in one pytest process (one xdist worker) build them once. `run_dir` and `toy_samples` are
# torch-free (the unit tier uses them); `tiny_sd3_pipeline` needs torch (parity, integration).


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """The tiny VP run the sampler tests read (tests/unit/test_sample.py's `train_run`); no test
    writes into it."""
    from tests.helpers import built_once
    from tests.unit.test_sample import train_run

    return str(built_once(tmp_path_factory, "run_dir", lambda folder: train_run(str(folder))))


@pytest.fixture(scope="session")
def toy_samples(tmp_path_factory):
    """A toy sample folder of the tiny VP teacher (tests/unit/test_evaluate.py's `make_toy_samples`);
    `evaluate` writes its eval.json / eval.md into it, as it did when one module held these tests."""
    from tests.unit.test_evaluate import make_toy_samples

    return make_toy_samples(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory):
    """(root, pipeline): the tiny random SD3 pipeline folder of `dpdmd_jax.tools.tiny_pipeline` and the
    diffusers StableDiffusion3Pipeline it was saved from (parity and integration tiers: needs torch).
    Tests read it; the ones that break a pipeline copy it first."""
    from diffusers import StableDiffusion3Pipeline

    from dpdmd_jax.tools.tiny_pipeline import make_tiny_pipeline
    from tests.helpers import built_once

    root = str(built_once(tmp_path_factory, "tiny_sd3_pipeline", lambda folder: make_tiny_pipeline(str(folder))))
    return root, StableDiffusion3Pipeline.from_pretrained(root)


