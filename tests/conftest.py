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



# ---------------------------------------------------------------------------- scheduling on 2 workers

# Seconds the longest tests take on the 2-core dev VM (`pytest -n 2 --durations`, cold compile cache),
# by node id prefix. xdist's worksteal gives each worker a contiguous half of the collection and lets an
# idle worker steal the tail of the other's queue; a long test near the end of a queue can run while the
# other worker idles. So the long tests go first, dealt alternately to the two halves (longest first),
# and the short ones fill both halves behind them, where stealing balances the rest.
LONG_TESTS = {
    "tests/integration/test_slurm.py::test_sbatch_two_processes": 246,
    "tests/integration/test_real_configs.py::test_shipped_setting_trains_resumes_and_gives_the_plain_rounds_losses[sdxl]": 159,  # noqa: E501
    "tests/integration/test_trainer_runs.py::test_sigkill_resume": 143,
    "tests/integration/test_sdxl_pipeline.py::test_sdxl_config_trains": 117,
    "tests/integration/test_sd35_pipeline.py::test_sd35_config_trains": 101,
    "tests/integration/test_trainer_runs.py::test_sharded_rounds": 83,
    "tests/integration/test_trainer_runs.py::test_sigterm_saves": 74,
    "tests/integration/test_real_configs.py::test_shipped_setting_trains_resumes_and_gives_the_plain_rounds_losses[sd3]": 73,  # noqa: E501
    "tests/integration/test_lora_export_run.py::test_lora_run_exports": 67,
    "tests/integration/test_real_configs.py::test_every_remat_policy_and_scan_trace_inside_the_rounds_loops[sdxl]": 65,
    "tests/integration/test_sd35_pipeline.py::test_diffusiondb_builder": 57,
    "tests/integration/test_real_configs.py::test_every_remat_policy_and_scan_trace_inside_the_rounds_loops[sd3]": 48,
    "tests/integration/test_evaluate_run.py::test_the_trainers_toy_metrics": 45,
    "tests/integration/test_trainer_runs.py::test_corrupt_checkpoint": 45,
    "tests/integration/test_plan_cli.py::test_a_tiny_run_is_planned": 36,
    "tests/integration/test_trainer_runs.py::test_checkpoint_restores": 30,
    "tests/integration/test_sample_pipelines.py::test_two_processes_sample_a_pipeline": 27,
    "tests/integration/test_toy_teacher.py::test_shipped_unet_teacher_samples": 26,
    "tests/integration/test_plan_cli.py::test_exit_codes_and_the_plan_file": 25,
    "tests/unit/test_workdir_paths.py::test_a_run_its_samples_and_their_evaluation_in_a_bucket": 23,
}


def _weight(item) -> float:
    return max((s for prefix, s in LONG_TESTS.items() if item.nodeid.startswith(prefix)), default=0.0)


def pytest_collection_modifyitems(config, items):
    workers = getattr(config, "workerinput", {}).get("workercount", 1)  # set in xdist's workers, who collect
    if workers < 2:
        return
    long = sorted((i for i in items if _weight(i)), key=_weight, reverse=True)
    rest = [i for i in items if not _weight(i)]
    heads = [long[w::workers] for w in range(workers)]
    queues, start = [], 0
    for w, head in enumerate(heads):  # each worker's queue: its long tests, then its share of the rest
        size = (len(items) - sum(map(len, queues))) // (workers - w)
        take = max(0, size - len(head))
        queues.append(head + rest[start:start + take])
        start += take
    queues[-1] += rest[start:]
    items[:] = [i for q in queues for i in q]
