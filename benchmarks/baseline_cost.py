"""What the paper's baselines cost against DP-DMD on the toy: one training round of each arm, timed
interleaved in one process (docs/benchmarks/baselines.md).

    python -m benchmarks.baseline_cost                    # flow toy (configs/toy.py), 9 repeats
    python -m benchmarks.baseline_cost --variant unet     # the epsilon toy
    python -m benchmarks.baseline_cost --repeats 3        # quicker
    python -m benchmarks.baseline_cost --only "DMD;DP-DMD K=7;DMD + regression w=0.25;\
        DMD + regression w=0.25, pair cache"    # the regression online and from a pair cache

Arms (the toy study's, `benchmarks.toy_diversity`): DMD, DP-DMD (K fixed at what the auto anchor
chooses on that toy, so no arm pays for the teacher pass that picks it), DMD + regression (DMD v1:
the teacher's full T-step guided ODE sample from the generator's noise, every round, L2 on the toy's
images; and from a pair cache, DMD v1's precomputed pairs), DMD + GAN and DP-DMD + GAN (DMD2's head
on the fake score's features, the toy's real images).
Each arm's round is built as training builds it (`run.setup`: the shipped toy teacher, one CPU device,
the toy's batch, M critic updates + 1 generator update) and jitted with its state donated. Per arm:
compile seconds, the median wall time of a round over repeats that run every arm once in an order
reversed every other repeat, XLA's memory analysis of the compiled round (arguments = state + frozen
teacher + batch; temporaries) and its FLOPs as compiled (loop bodies counted once: the critic scan, the
sampler's and the anchor's steps; so they undercount, the more the longer an arm's loops).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from benchmarks import common
from configs import toy
from dpdmd_jax.config import override
from dpdmd_jax.run import setup as setup_lib

PAIRS = "{pairs}"  # replaced by the pair cache's folder (main)
AUTO_K = {"": 7, "unet": 10}  # what distill.anchor_k="auto" chose on each toy (docs/benchmarks/toy-study.md)


def arms(variant: str) -> dict[str, dict]:
    k = AUTO_K[variant]
    return {
        "DMD": {"distill.lambda_div": 0.0},
        f"DP-DMD K={k}": {"distill.anchor_k": k},
        "DMD + regression w=0.25": {"distill.lambda_div": 0.0, "regression.weight": 0.25},
        # DMD v1's precomputed pairs (`--pairs`, made by the teacher sampler before any arm is built).
        "DMD + regression w=0.25, pair cache": {"distill.lambda_div": 0.0, "regression.weight": 0.25,
                                                "regression.pairs": PAIRS},
        "DMD + GAN w=0.005": {"distill.lambda_div": 0.0, "gan.weight": 5e-3},
        f"DP-DMD K={k} + GAN w=0.005": {"distill.anchor_k": k, "gan.weight": 5e-3},
    }


def build(variant: str, overrides: dict):
    c = override(toy.get_config(variant or None), {"evals": {}, "compare_with_dmd": False, "mesh.fsdp": 1,
                                                   **overrides})
    run = setup_lib.build(c, devices=jax.devices()[:1])
    state, shardings = setup_lib.init_train_state(run)
    batch = setup_lib.round_batch(run, 0)
    t = time.perf_counter()
    compiled = jax.jit(run.distiller.train_round, donate_argnums=(0,)).lower(state, run.frozen, batch).compile()
    seconds = time.perf_counter() - t
    state, metrics = compiled(state, run.frozen, batch)  # the first call (allocation) is not timed
    jax.block_until_ready(metrics)
    return {"run": run, "fn": compiled, "state": state, "batch": batch, "compile_s": seconds, "times": []}


def make_pairs(variant: str) -> str:
    """A pair cache of the toy teacher (its 6 prompts x 16 seeds) in a temporary folder."""
    import tempfile

    from dpdmd_jax.run import sample as run_sample

    out = tempfile.mkdtemp(prefix="toy_pairs_") + "/pairs"
    c = override(toy.get_config(variant or None), {"evals": {}, "mesh.fsdp": 1})
    print(f"writing a pair cache to {out} ...", flush=True)
    run_sample.sample(c, out, sampler="teacher", pairs=True, seeds=16, devices=jax.devices()[:1])
    return out


def time_round(arm: dict) -> None:
    t = time.perf_counter()
    arm["state"], metrics = arm["fn"](arm["state"], arm["run"].frozen, arm["batch"])
    jax.block_until_ready(metrics)
    arm["times"].append(time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="", help="toy config variant: '' (flow default) or unet")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--only", default=None, metavar="ARM[;ARM]", help="these arms only (the first two are the "
                   "ratios' denominators: keep DMD and DP-DMD first)")
    p.add_argument("--pairs", default=None, help="the pair cache arm's folder (default: the toy teacher's samples "
                   "of its 6 prompts x 16 seeds, written to a temporary folder first)")
    args = p.parse_args()
    todo = arms(args.variant)
    if args.only:
        todo = {n: todo[n] for n in (n.strip() for n in args.only.split(";"))}
    if any(o.get("regression.pairs") == PAIRS for o in todo.values()):
        folder = args.pairs or make_pairs(args.variant)
        todo = {n: {**o, "regression.pairs": folder} if "regression.pairs" in o else o for n, o in todo.items()}
    built = {}
    for name, overrides in todo.items():
        print(f"compiling {name} ...", flush=True)
        built[name] = build(args.variant, overrides)
    names = list(built)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            time_round(built[name])
    dmd, dpdmd = (statistics.median(built[n]["times"]) for n in names[:2])
    rows = []
    for name, arm in built.items():
        ms = statistics.median(arm["times"])
        mem = arm["fn"].memory_analysis()
        rows.append([name, f"{arm['compile_s']:.1f}", f"{1e3 * ms:.0f}", f"{ms / dmd:.2f}", f"{ms / dpdmd:.2f}",
                     f"{mem.argument_size_in_bytes / 2**20:.1f}", f"{mem.temp_size_in_bytes / 2**20:.1f}",
                     f"{common.flops_of(arm['fn']) / 1e9:.1f}"])
    c = built[names[0]]["run"].config
    print(f"\n{'epsilon' if args.variant else 'flow'} toy: batch {c.batch_size}, M = "
          f"{c.distill.fake_updates_per_student}, teacher T = {c.teacher.steps}, student N = {len(c.student.sigmas)}; "
          f"median of {args.repeats} interleaved repeats; {common.host()}; jax {jax.__version__}")
    print(common.table(["arm", "compile s", "round ms", "x DMD", "x DP-DMD", "arguments MiB", "temporaries MiB",
                        "XLA GFLOP (loops once)"], rows))
    spread = {n: f"{1e3 * min(a['times']):.0f}-{1e3 * max(a['times']):.0f}" for n, a in built.items()}
    print("round ms, min-max:", spread)


if __name__ == "__main__":
    main()
