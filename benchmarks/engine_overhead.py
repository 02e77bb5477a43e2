"""Cost of the engine's interfaces: a toy round and its compile time, this tree vs a git revision.

Each measurement is a fresh child process (no persistent compilation cache, so compiles are
real) that builds the README's toy default (`configs/toy.py`, shipped teacher, batch 8, one CPU
device as `python -m dpdmd_jax.main` uses), compiles one round with the tree's own public trainer
API, runs one warm-up round and times `--rounds` more. Children of the two trees alternate
(`--pairs` times), so machine noise hits both alike. Reports median and minimum round times and the
FLOPs XLA counts in the compiled round (the same work on both sides). Results go in docs/benchmarks/engine-overhead.md.

  python -m benchmarks.engine_overhead --baseline d6f9ac5 [--pairs 4] [--rounds 20]

The baseline is checked out with `git worktree` into a temporary folder (removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(rounds: int, lockstep: bool = False) -> None:
    """Runs in the tree on PYTHONPATH; prints one JSON line (lockstep: one "@@" line per round asked
    for on stdin, after an "@@ready" line)."""
    import time

    import jax

    from configs import toy as toy_config
    from dpdmd_jax.run import setup as setup_lib

    c = toy_config.get_config()
    setup = setup_lib.build(c)
    state, shardings = setup_lib.init_train_state(setup)
    # The interface-based trainer builds each process's rows and takes batch shapes from the
    # backbone; the earlier one took host batches and an example batch.
    new_api = hasattr(setup_lib, "round_batch")
    batch = (lambda r: setup_lib.round_batch(setup, r)) if new_api else (
        lambda r: setup_lib.put_batch(setup.mesh, setup.data.round(r)))
    b0 = batch(0)
    t0 = time.perf_counter()
    jitted = setup_lib.compile_round(setup, shardings) if new_api else setup_lib.compile_round(setup, shardings, b0)
    compiled = jitted.lower(state, setup.frozen, b0).compile()
    t_compile = time.perf_counter() - t0
    state, m = compiled(state, setup.frozen, b0)
    jax.block_until_ready(m)
    if lockstep:
        print(f"@@ready {t_compile}", flush=True)
        r = 0
        for line in sys.stdin:
            if line.strip() != "go":
                break
            r += 1
            b = batch(r)
            t0 = time.perf_counter()
            state, m = compiled(state, setup.frozen, b)
            jax.block_until_ready((state, m))
            print(f"@@{time.perf_counter() - t0}", flush=True)
        return
    times = []
    for r in range(1, rounds + 1):
        b = batch(r)
        t0 = time.perf_counter()
        state, m = compiled(state, setup.frozen, b)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(json.dumps({"compile_s": t_compile, "round_s": statistics.median(times), "round_min_s": min(times),
                      "gflop": cost.get("flops", float("nan")) / 1e9, "loss": float(m["loss"])}))


def run_child(tree: str, rounds: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(PYTHONPATH=tree, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", f"--rounds={rounds}"], cwd=tree,
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def lockstep(trees: dict[str, str], rounds: int) -> dict[str, list[float]]:
    """Both trees' children alive at once, warmed up, running one round each in turn (the order
    alternating every round), so that slow phases of the machine hit both alike."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    procs = {}
    for name, tree in trees.items():  # compile one at a time: compiles would compete for the cores
        procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", "--lockstep"], cwd=tree,
                                       env={**env, "PYTHONPATH": tree}, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        while not (line := procs[name].stdout.readline()).startswith("@@ready"):
            if not line:
                raise RuntimeError(f"{name} child ended before it was ready")
    times = {name: [] for name in trees}
    names = list(trees)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            procs[name].stdin.write("go\n")
            procs[name].stdin.flush()
            while not (line := procs[name].stdout.readline()).startswith("@@"):
                pass
            times[name].append(float(line[2:]))
    for p in procs.values():
        p.stdin.write("stop\n")
        p.stdin.flush()
        p.wait()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="HEAD", help="git revision to compare against")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--lockstep", action="store_true",
                   help="one child per tree, both alive, alternating single rounds (--rounds of them)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.rounds, args.lockstep)
        return
    from benchmarks.common import host, table

    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "baseline")
        subprocess.run(["git", "worktree", "add", "--detach", base, rev], cwd=ROOT, check=True, capture_output=True)
        try:
            if args.lockstep:
                t = lockstep({"baseline": base, "this tree": ROOT}, args.rounds)
                paired = [a / b for a, b in zip(t["this tree"], t["baseline"])]
                print(f"\n{host()}; baseline {rev}; toy default round, batch 8, 1 CPU device; lockstep, "
                      f"{args.rounds} alternating rounds")
                print(table(["tree", "round median (ms)", "round min (ms)"],
                            [[n, f"{1e3 * statistics.median(v):.1f}", f"{1e3 * min(v):.1f}"] for n, v in t.items()]))
                print(f"ratio of medians {statistics.median(t['this tree']) / statistics.median(t['baseline']):.3f}, "
                      f"of minima {min(t['this tree']) / min(t['baseline']):.3f}, median paired ratio "
                      f"{statistics.median(paired):.3f}")
                return
            res = {"baseline": [], "this tree": []}
            for i in range(args.pairs):
                for name, tree in (("baseline", base), ("this tree", ROOT)):
                    res[name].append(run_child(tree, args.rounds))
                    print(f"pair {i + 1}/{args.pairs} {name}: {res[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base], cwd=ROOT, capture_output=True)
    keys = ("compile_s", "round_s", "round_min_s", "gflop")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in res.items()}
    rows = [[n, f"{med[n]['compile_s']:.2f}", f"{1e3 * med[n]['round_s']:.1f}", f"{1e3 * med[n]['round_min_s']:.1f}",
             f"{med[n]['gflop']:.3f}", " ".join(f"{1e3 * r['round_s']:.0f}" for r in res[n])] for n in res]
    ratio = {k: med["this tree"][k] / med["baseline"][k] for k in keys}
    rows.append(["ratio (this / baseline)", *(f"{ratio[k]:.3f}" for k in keys), ""])
    # Paired ratios (child i of this tree against child i of the baseline, run next to each other).
    paired = [a["round_s"] / b["round_s"] for a, b in zip(res["this tree"], res["baseline"])]
    print(f"paired round ratios: {' '.join(f'{x:.3f}' for x in paired)} (median {statistics.median(paired):.3f})")
    print(f"\n{host()}; baseline {rev}; toy default round, batch 8, 1 CPU device; "
          f"median of {args.pairs} interleaved children x {args.rounds} rounds")
    print(table(["tree", "compile (s)", "round median (ms)", "round min (ms)", "GFLOP / round (XLA)",
                 "per-child round medians (ms)"], rows))


if __name__ == "__main__":
    main()
