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


# The modules that take longest in the README's command (seconds of one pytest-xdist worker on the 2-core
# dev VM, `--durations=0`, 2026-12-07): scheduled first and spread over the workers (below).
LONG_MODULES = {
    "tests/integration/test_trainer_runs.py": 219, "tests/integration/test_real_configs.py": 184,
    "tests/integration/test_slurm.py": 131, "tests/integration/test_sd35_pipeline.py": 84,
    "tests/integration/test_plan_compile.py": 56, "tests/integration/test_toy_teacher.py": 48,
    "tests/integration/test_lora_export_run.py": 44, "tests/integration/test_sample_cli.py": 36,
    "tests/integration/test_plan_cli.py": 34, "tests/integration/test_resume_exact.py": 33,
    "tests/integration/test_first_hour_cli.py": 33, "tests/parity/test_lpips_regression.py": 32,
    "tests/parity/test_unet.py": 30, "tests/unit/test_lora.py": 29, "tests/integration/test_sample_pipelines.py": 29,
}


def pytest_collection_modifyitems(config, items):
    """Under `-n N`: the long modules first, whole (their module fixtures are built once), dealt to the N
    workers' first shares longest first, each to the share with the least so far; the rest follows in
    collection order. xdist hands each worker a contiguous share of the list first and balances what is
    left by stealing from queues' tails, so every worker starts on long modules and ends on short tests.
    (With the collection order, all the long modules fell to one worker's share and the last of them
    ran while the other worker idled: 777 s in pytest for 1365 s of tests on 2 workers.) One process
    keeps the collection order."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers < 2:
        return
    module = lambda item: item.nodeid.split("::")[0]
    # Sorted by name too: every worker must build the same list (xdist refuses differing ones), and a set's
    # order of equal-time names changes with each process's string hash seed.
    long = sorted({module(i) for i in items} & set(LONG_MODULES), key=lambda m: (-LONG_MODULES[m], m))
    shares, load = [[] for _ in range(workers)], [0] * workers
    for m in long:
        w = load.index(min(load))
        shares[w] += [i for i in items if module(i) == m]
        load[w] += LONG_MODULES[m]
    rest = [i for i in items if module(i) not in LONG_MODULES]
    ordered, left = [], len(items)
    for w in range(workers):  # the share xdist's worksteal sends worker w first: what is left // workers left
        size = max(left // (workers - w), len(shares[w]))
        take = size - len(shares[w])
        ordered += shares[w] + rest[:take]
        rest, left = rest[take:], left - size
    items[:] = ordered + rest


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With `-n N`, idle workers take queued tests from busy ones (xdist's worksteal: the tests' lengths
    vary from 0.1 s to minutes). A hook rather than `--dist worksteal` in pyproject.toml's addopts, so a
    plain `python -m pytest tests/unit` works where pytest-xdist is not installed (the unit tier needs
    only requirements.txt and pytest)."""
    from xdist.scheduler import WorkStealingScheduling

    return WorkStealingScheduling(config, log)


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


@pytest.fixture(scope="session")
def uninterrupted_smoke_run(tmp_path_factory):
    """`configs/toy.py:smoke` trained without interruption for 6 rounds (a checkpoint every 2) on the
    shared sharded mesh (tests.helpers.SHARDED_MESH on jax.devices()[:4]), once per session: the
    reference that a SIGKILLed and resumed CLI run (test_trainer_runs.py) and a pre-empted and
    requeued two-process SLURM job (test_slurm.py) must end like. Returns its metrics.jsonl rows."""

    import jax

    from configs import toy as toy_config
    from dpdmd_jax.config import override
    from dpdmd_jax.run import train as run_train
    from tests.helpers import SHARDED_DEVICES, SHARDED_MESH, UNINTERRUPTED_ROUNDS, built_once, read_metrics

    c = override(toy_config.get_config("smoke"), {"num_rounds": UNINTERRUPTED_ROUNDS, "checkpoint_every": 2,
                                                  **SHARDED_MESH})
    train = lambda folder: run_train.train(c, str(folder), devices=jax.devices()[:SHARDED_DEVICES])
    return read_metrics(built_once(tmp_path_factory, "uninterrupted_smoke_run", train))


@pytest.fixture(scope="session")
def sdxl_tiny_run(tmp_path_factory):
    """A folder with `pipe/` (the tiny random SDXL pipeline), `prompts.txt` and `run/`: `configs/sdxl.py:tiny`
    (the shipped setting: scan + full remat) trained for 2 rounds by the CLI, once per session.
    tests/integration/test_sdxl_pipeline.py checks the run and its export; test_real_configs.py
    compares its first round with the plain round. Needs torch (the pipeline is saved by diffusers)."""
    import re
    import subprocess
    import sys

    from dpdmd_jax.tools.tiny_pipeline import make_tiny_pipeline
    from tests.helpers import REPO, built_once
    from tests.parity.test_sdxl_encoding import PROMPTS

    def build(folder):
        folder.mkdir()
        make_tiny_pipeline(str(folder / "pipe"), family="sdxl")
        (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        cmd = [sys.executable, "-m", "dpdmd_jax.main", "--config=configs/sdxl.py:tiny", f"--workdir={folder / 'run'}",
               f"--config.model.source={folder / 'pipe'}", f"--config.data.prompt_file={folder / 'prompts.txt'}",
               "--config.num_rounds=2"]
        # The CLI trains on one device with XLA:CPU's fusion emitters: the SDXL round compiles in 79 CPU-s
        # so, against 141 on the 8 virtual devices with the LLVM emitters the rest of the suite uses
        # (the flags above; for SDXL's large round those emit each kernel in time that grows with the
        # module).
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+|--xla_cpu_use_fusion_emitters=\w+", "",
                       os.environ.get("XLA_FLAGS", ""))
        env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=1 "
                                         "--xla_cpu_use_fusion_emitters=true")
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, out.stderr[-3000:]

    return built_once(tmp_path_factory, "sdxl_tiny_run", build)

