"""Compile time of one tiny round, plain against the shipped configs' scan + remat (issue 18).

Builds the tiny random pipeline of a family (`dpdmd_jax.tools.tiny_pipeline`), then for each
setting builds the run on one CPU device (random conditionings of the pipeline's shapes, a 2-step
teacher, K = 1, one critic update), compiles one round with a fresh compilation cache and runs it
once. Prints a table: build, state init, round compile and round times, and the round's loss (the
same for every setting: scan and remat change how the round is computed, not what).

  python -m benchmarks.scan_remat_compile --family sd3    # or sdxl
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

SETTINGS = [(False, "none"), (True, "dots_no_batch")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd3", "sdxl"), default="sd3")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="scan_remat_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(work, "cache")  # every compile is real
    import jax

    from benchmarks.common import host, table
    from configs import sd35, sdxl
    from dpdmd_jax.config import override
    from dpdmd_jax.run import setup as setup_lib
    from dpdmd_jax.tools.tiny_pipeline import make_tiny_pipeline

    root = os.path.join(work, "pipe")
    make_tiny_pipeline(root, family=args.family)
    module = {"sd3": sd35, "sdxl": sdxl}[args.family]
    rows = []
    for scan, remat in SETTINGS:
        c = override(module.get_config("tiny"), {
            "model.source": root, "data.kind": "random", "evals": {}, "teacher.steps": 2, "distill.anchor_k": 1,
            "model.scan_layers": scan, "model.remat_policy": remat})
        t0 = time.time()
        setup = setup_lib.build(c, devices=jax.devices()[:1])
        t1 = time.time()
        state, shardings = setup_lib.init_train_state(setup)
        t2 = time.time()
        fn, batch = setup_lib.compile_round(setup, shardings), setup_lib.round_batch(setup, 0)
        fn.compile(state, setup.frozen, batch)
        t3 = time.time()
        _, metrics = fn(state, setup.frozen, batch)
        jax.block_until_ready(metrics)
        t4 = time.time()
        rows.append([f"scan={scan}, remat={remat}", f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", f"{t3 - t2:.1f}",
                     f"{t4 - t3:.1f}", f"{float(metrics['loss']):.8f}"])
    print(f"{args.family} tiny pipeline, one CPU device; {host()}")
    print(table(["setting", "build s", "init s", "round compile s", "round s", "loss"], rows))


if __name__ == "__main__":
    main()
