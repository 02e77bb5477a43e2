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
