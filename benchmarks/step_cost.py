"""Where a DP-DMD round's time goes: generator update, critic update and full round, fp32 on CPU.

    python -m benchmarks.step_cost            # toy + mid size, the full run
    python -m benchmarks.step_cost --quick    # toy + a shrunken mid (2 layers, batch 2), few repeats
    python -m benchmarks.step_cost --mid-batch 8   # the mid size at batch 8 (needs ~13 GiB free RAM)

For two sizes (the toy teacher's architecture with random weights, batch 16; a mid-size random
MMDiT, 8 layers of 8x64 heads (inner 512, dual attention in layers 0-2, qk RMSNorm), 32x32x16
latent = 256 tokens, 77 x 512 context, pooled 512, batch 4 by default, as batch 8 needs ~13 GiB
(memory: docs/benchmarks/step-cost.md)), both with
M = 5 critic updates per generator update, anchor K = 5 of a T = 30 teacher grid, N = 4 student
steps ("rollout" simulation, "line" target), on a single-CPU-device mesh (data=fsdp=tensor=1), it
jits and measures, each separately:

  * single model calls at the round's batch B, for reference: forward at B, forward at 2B (one CFG
    evaluation: cond and uncond batched), forward+backward at B (grads w.r.t. params); and the
    teacher anchor alone (K guided teacher steps);
  * `Distiller.critic_update`, `Distiller.generator_update` and `Distiller.train_round` (through
    `setup_lib.compile_round`, state donated as in training) for DP-DMD (lambda_div = 0.05) and plain
    DMD (lambda_div = 0).

Per function: compile time (lower + compile wall, one run), median wall time over interleaved
repeats (every function once per repeat, order reversed every other repeat, block_until_ready),
XLA cost-analysis FLOPs, achieved FLOP/s and the fraction of this CPU's fp32 matmul peak
(`matmul_probes` / `matmul_peak` of `benchmarks.mmdit_forward`, timed inside the same interleaved
repeats; peak = the faster of JAX and torch). XLA counts the body of a while loop once, whatever
its trip count (`lax.scan` of the critic updates and of the student's Euler steps, `fori_loop` of
the teacher anchor), so the FLOPs of the timed executables ("XLA GFLOP as compiled") undercount.
"GFLOP corrected" multiplies the loop bodies by their trip counts: it adds (trips - 1) x the FLOPs
of the body's model call, measured as its own executable (anchor: K - 1 more CFG forwards; critic
sample: N - 1 more forwards; generator rollout of steps 2..N, forward and backward scan: N - 2 more
forward+backwards; round: M critic updates + 1 generator update, each corrected). On the sizes in
`--unroll-check` (default: toy) every non-round function is also compiled a second time (never
run) with `jax.lax.scan` / static-bound `jax.lax.fori_loop` patched to `unroll=True`, so XLA sees
every iteration; the two counts are printed side by side as a check of the correction.

"model calls" counts what the method does per call, from the code (docs/DESIGN.md section 2):
  critic update   = N student forwards (fresh sample, no grad) + 1 fake forward+backward
  generator       = K teacher CFG forwards (2B, anchor; skipped when lambda_div = 0)
                    + N student forward+backward (rollout) + 1 teacher CFG forward (real score)
                    + 1 fake forward (fake score)
  round           = M critic updates + 1 generator update
"fwd-eq" expresses that in forwards at batch B (weights = the XLA FLOPs of each call kind), and
"pred ms" sums the measured median times of the single calls, so "meas/pred" > 1 is time spent
outside the model calls (optimizer, loop and glue code, lost fusion) or worse efficiency at the
scale of the whole program.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import time

# First: sets the XLA / OMP thread flags (2 threads) before jax is imported, and holds the peak probe.
from benchmarks import mmdit_forward as mf

import jax
import jax.numpy as jnp
import numpy as np

from configs import toy as toy_config
from dpdmd_jax.core import SD3Cond
from dpdmd_jax.distill import step as step_lib
from dpdmd_jax import core
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.models import layers
from dpdmd_jax.toy.teacher import TOY_ARCH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for its git revision


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shrunken mid size, fewer repeats (a few minutes)")
    p.add_argument("--sizes", default="toy,mid", help="comma list of sizes to run (toy, mid)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per size (default: by size)")
    p.add_argument("--unroll-check", default="toy",
                   help="sizes whose non-round functions are also compiled fully unrolled to check the FLOP "
                        "correction ('' for none; slow to compile)")
    p.add_argument("--dmd-sizes", default="toy,mid",
                   help="sizes that also measure plain DMD (lambda_div = 0) next to DP-DMD")
    p.add_argument("--mid-batch", type=int, default=None, help="batch of the mid size (default 4; quick 2)")
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None

# XLA's cost analysis counts a loop body once; the CPU per-head attention path (a lax.map over heads,
# taken for large logits such as the mid size's) would hide most attention FLOPs, so every function
# here runs plain XLA attention (the toy never takes the per-head path anyway).
layers.CPU_PER_HEAD_MIN_LOGITS_BYTES = float("inf")

MID_ARCH = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=8, num_attention_heads=8,
                attention_head_dim=64, caption_projection_dim=512, joint_attention_dim=512, pooled_projection_dim=512,
                pos_embed_max_size=16, dual_attention_layers=(0, 1, 2), qk_norm="rms_norm")
MID_CONTEXT_LEN = 77


# ----------------------------------------------------------------------------- configs


def size_config(name: str, quick: bool, mid_batch: int | None):
    """(config, context_len or None for the toy data source) of one benchmark size."""
    c = toy_config.get_config()
    c.model.source = "random"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.teacher.steps = 30
    c.distill.anchor_k = 5
    c.distill.fake_updates_per_student = 5
    c.distill.lambda_div = 0.05
    c.evals = {}
    if name == "toy":
        c.model.arch = dict(TOY_ARCH)
        c.data.latent_size = (TOY_ARCH["sample_size"],) * 2
        c.batch_size = 16
        return c, None
    arch = dict(MID_ARCH)
    if quick:
        arch.update(num_layers=2, dual_attention_layers=(0,))
    c.model.arch = arch
    c.data.latent_size = (arch["sample_size"],) * 2
    c.batch_size = mid_batch or (2 if quick else 4)
    return c, MID_CONTEXT_LEN


def with_lambda(c, lam: float):
    c = c.copy_and_resolve_references()
    c.distill.lambda_div = lam
    return c


def random_batch(c, context_len: int, seed: int = 0) -> core.RoundBatch:
    """A RoundBatch of random conditionings ([M + 1, B, L, D] and [M + 1, B, P]; uncond [B, ...])."""
    rng = np.random.default_rng(seed)
    a, b, rows = c.model.arch, c.batch_size, c.distill.fake_updates_per_student + 1
    f = lambda *shape: rng.standard_normal(shape, np.float32)
    cond = SD3Cond(f(rows, b, context_len, a["joint_attention_dim"]), f(rows, b, a["pooled_projection_dim"]))
    uncond = SD3Cond(np.zeros((b, context_len, a["joint_attention_dim"]), np.float32),
                     np.zeros((b, a["pooled_projection_dim"]), np.float32))
    return core.RoundBatch(cond=cond, uncond=uncond)


# ----------------------------------------------------------------------------- loop unrolling (FLOP count)


def unrolled_flops(fn, *args) -> float:
    from dpdmd_jax.run.plan import unrolled_loops

    with unrolled_loops():
        # a fresh lambda: jit's trace cache must not hand back the rolled trace
        return mf.flops_of(jax.jit(lambda *a: fn(*a)).lower(*args).compile())


# ----------------------------------------------------------------------------- one size


@dataclasses.dataclass
class Fn:
    name: str
    run: object  # () -> None, blocks
    compile_s: float
    flops_rolled: float  # XLA cost analysis of the timed executable (loop bodies once)
    flops: float  # loop bodies multiplied by their trip counts
    flops_unrolled: float | None  # check: XLA cost analysis of a fully unrolled compile (None: not run)
    calls: dict  # {"fwd": n, "fwd2": n, "fb": n}
    temp_gib: float


def calls_of(c, kind: str) -> dict:
    """Model calls one invocation makes, by kind (fwd at B, fwd at 2B = one CFG eval, fwd+bwd at B)."""
    n = len(c.student.sigmas)
    k, m, lam = c.distill.anchor_k, c.distill.fake_updates_per_student, c.distill.lambda_div
    assert c.dmd.simulation == "rollout" and c.distill.target == "line"
    critic = {"fwd": n, "fwd2": 0, "fb": 1}
    gen = {"fwd": 1, "fwd2": (k if lam > 0 else 0) + 1, "fb": n}
    if kind == "critic":
        return critic
    if kind == "gen":
        return gen
    if kind == "round":
        return {key: m * critic[key] + gen[key] for key in gen}
    raise ValueError(kind)


def loop_extra(c, kind: str, unit: dict) -> float:
    """FLOPs XLA's count misses: (trip count - 1) x the model call in each loop body."""
    n = len(c.student.sigmas)
    k, lam = c.distill.anchor_k, c.distill.lambda_div
    if kind == "anchor":
        return (k - 1) * unit["fwd2"]  # fori_loop over K guided teacher steps
    if kind == "critic":
        return (n - 1) * unit["fwd"]  # scan over the N student steps of the fresh sample
    if kind == "gen":  # anchor fori_loop (if any) + rollout scan over steps 2..N (forward and backward scans)
        return ((k - 1) * unit["fwd2"] if lam > 0 else 0.0) + (n - 2) * unit["fb"]
    raise ValueError(kind)


def measure_size(name: str, args, log) -> dict:
    c, context_len = size_config(name, args.quick, args.mid_batch)
    a = c.model.arch
    b = c.batch_size
    check = name in args.unroll_check.split(",")
    log(f"\n== {name}: {a['num_layers']} layers, {a['num_attention_heads']}x{a['attention_head_dim']} heads, latent "
        f"{a['sample_size']}^2x{a['in_channels']} (patch {a['patch_size']}), context "
        f"{context_len or 'toy'} x {a['joint_attention_dim']}, batch {b}, M={c.distill.fake_updates_per_student} "
        f"K={c.distill.anchor_k} T={c.teacher.steps} N={len(c.student.sigmas)}")
    setup = setup_lib.build(c, devices=jax.devices()[:1])
    n_params = sum(x.size for x in jax.tree.leaves(setup.frozen.teacher))
    state, state_sh = setup_lib.init_train_state(setup)
    if context_len is None:
        batch = setup_lib.round_batch(setup, 0)
    else:
        batch = setup_lib.put_batch(setup, random_batch(c, context_len))
    frozen = setup.frozen
    m = c.distill.fake_updates_per_student
    cond_critic = jax.tree.map(lambda x: x[0], batch.cond)
    cond_gen = jax.tree.map(lambda x: x[m], batch.cond)
    uncond = batch.uncond
    key = jax.random.PRNGKey(1)
    d = setup.distiller
    holder = {"state": state}
    fns: list[Fn] = []
    unit: dict[str, float] = {}
    corrected: dict[str, float] = {}

    def add(label, jitted, fn_for_check, args_, calls, mutates_state, extra=0.0, flops=None):
        t0 = time.perf_counter()
        compiled = jitted.lower(*args_).compile()
        t_compile = time.perf_counter() - t0
        rolled = mf.flops_of(compiled)
        total = rolled + extra if flops is None else flops
        unrolled = unrolled_flops(fn_for_check, *args_) if check and fn_for_check is not None else None
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")
        rest = args_[1:]
        if mutates_state:
            def run():
                out = compiled(holder["state"], *rest)
                jax.block_until_ready(out)
                holder["state"] = out[0]
        else:
            def run():
                jax.block_until_ready(compiled(*args_))
        fns.append(Fn(label, run, t_compile, rolled, total, unrolled, calls, temp))
        check_txt = "" if unrolled is None else f", fully unrolled {unrolled / 1e9:.2f}"
        log(f"   {label}: compile {t_compile:.1f}s, GFLOP as compiled {rolled / 1e9:.2f}, corrected "
            f"{total / 1e9:.2f}{check_txt}, temp {temp:.2f} GiB")
        return total

    # --- single model calls at the round's batch (no loops: as compiled = corrected)
    params, buffers = frozen.teacher, frozen.buffers
    eps = jax.random.normal(jax.random.PRNGKey(2), (b, *d.latent_shape), jnp.float32)
    sigma = jnp.full((b,), 0.6, jnp.float32)
    fwd = lambda p, bu, z, s, cnd: d.predict(p, bu, z, s, cnd)
    both = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), cond_gen, uncond)
    fb = jax.value_and_grad(lambda p, bu, z, s, cnd: jnp.mean(jnp.square(d.predict(p, bu, z, s, cnd))))
    unit["fwd"] = add("model fwd B", jax.jit(fwd), None, (params, buffers, eps, sigma, cond_gen), {"fwd": 1}, False)
    unit["fwd2"] = add("model fwd 2B (1 CFG eval)", jax.jit(fwd), None,
                       (params, buffers, jnp.concatenate([eps, eps]), jnp.concatenate([sigma, sigma]), both),
                       {"fwd2": 1}, False)
    unit["fb"] = add("model fwd+bwd B", jax.jit(fb), None, (params, buffers, eps, sigma, cond_gen), {"fb": 1}, False)
    anchor = lambda fr, e, cnd, unc: d.teacher_anchor(fr, e, cnd, unc)[0]
    add(f"teacher anchor (K={c.distill.anchor_k})", jax.jit(anchor), anchor, (frozen, eps, cond_gen, uncond),
        {"fwd2": c.distill.anchor_k}, False, extra=loop_extra(c, "anchor", unit))

    # --- updates and rounds, DP-DMD and plain DMD
    variants = [(c.distill.lambda_div, "DP-DMD")] + ([(0.0, "DMD")] if name in args.dmd_sizes.split(",") else [])
    for lam, tag in variants:
        cv = with_lambda(c, lam)
        dv = step_lib.Distiller(cv, setup.backbone, d.graphdef)
        sv = dataclasses.replace(setup, config=cv, distiller=dv)
        if lam > 0:  # the critic update does not depend on lambda_div
            corrected["critic"] = add(
                "critic update", jax.jit(dv.critic_update, donate_argnums=(0,)), dv.critic_update,
                (holder["state"], frozen, cond_critic, key), calls_of(cv, "critic"), True,
                extra=loop_extra(cv, "critic", unit))
        gen_flops = add(f"generator update {tag}", jax.jit(dv.generator_update, donate_argnums=(0,)),
                        dv.generator_update, (holder["state"], frozen, cond_gen, uncond, key), calls_of(cv, "gen"),
                        True, extra=loop_extra(cv, "gen", unit))
        add(f"round {tag} (lambda={lam:g})", setup_lib.compile_round(sv, state_sh), None,
            (holder["state"], frozen, batch), calls_of(cv, "round"), True, flops=m * corrected["critic"] + gen_flops)

    repeats = args.repeats or {"toy": 5 if args.quick else 9, "mid": 1 if args.quick else 3}[name]
    warmup = 1 if name == "toy" or args.quick else 0
    timed = {f.name: f.run for f in fns}
    timed.update(mf.matmul_probes())
    log(f"   timing: {repeats} interleaved repeats, warmup {warmup}")
    times = mf.interleaved(timed, repeats, warmup=warmup)
    peak = max(mf.gflops(times["mm_jax"]), mf.gflops(times["mm_torch"]))
    log(f"   matmul peak during this set: JAX {mf.gflops(times['mm_jax']):.0f}, torch "
        f"{mf.gflops(times['mm_torch']):.0f} GFLOP/s")
    for f in fns:
        log(f"   {f.name}: " + ", ".join(mf.fmt_ms(x) for x in times[f.name]) + " ms")
    return dict(name=name, config=c, fns=fns, times=times, peak=peak, repeats=repeats, n_params=n_params,
                context_len=context_len)


def size_rows(res: dict) -> list[list[str]]:
    fns, times, peak = res["fns"], res["times"], res["peak"] * 1e9
    unit_flops = {"fwd": fns[0].flops, "fwd2": fns[1].flops, "fb": fns[2].flops}
    unit_time = {k: mf.med(times[f.name]) for k, f in zip(("fwd", "fwd2", "fb"), fns[:3])}
    rows = []
    for f in fns:
        t = mf.med(times[f.name])
        calls = "/".join(str(f.calls.get(k, 0)) for k in ("fwd", "fwd2", "fb"))
        fwd_eq = sum(n * unit_flops[k] for k, n in f.calls.items()) / unit_flops["fwd"]
        pred = sum(n * unit_time[k] for k, n in f.calls.items())
        rows.append([
            res["name"], f.name, calls, f"{fwd_eq:.1f}", f"{f.compile_s:.1f}", mf.fmt_ms(t),
            f"{f.flops_rolled / 1e9:.2f}", f"{f.flops / 1e9:.2f}",
            "-" if f.flops_unrolled is None else f"{f.flops_unrolled / 1e9:.2f}",
            f"{f.flops / t / 1e9:.1f}", f"{f.flops / t / peak:.0%}", mf.fmt_ms(pred), f"{t / pred:.2f}",
        ])
    return rows


HEADER = ["size", "what", "model calls fwd/fwd2B/fwd+bwd", "fwd-eq", "compile s", "median ms",
          "XLA GFLOP as compiled", "GFLOP corrected", "GFLOP unrolled (check)", "GFLOP/s", "%peak", "pred ms",
          "meas/pred"]


def derived(res: dict) -> list[str]:
    """Sentences computed from the measurements: anchor share, critic share, round vs parts."""
    t = {f.name: mf.med(res["times"][f.name]) for f in res["fns"]}
    fl = {f.name: f.flops for f in res["fns"]}
    c = res["config"]
    m, k = c.distill.fake_updates_per_student, c.distill.anchor_k
    rd, rp = "round DMD (lambda=0)", f"round DP-DMD (lambda={c.distill.lambda_div:g})"
    gd, gp = "generator update DMD", "generator update DP-DMD"
    anc = f"teacher anchor (K={k})"
    critic = t["critic update"]
    vs_dmd = [] if rd not in t else [
        f"{res['name']}: round DP-DMD / DMD time {t[rp] / t[rd]:.2f}x (FLOPs {fl[rp] / fl[rd]:.2f}x); generator "
        f"DP-DMD - DMD = {mf.fmt_ms(t[gp] - t[gd])} ms vs anchor alone {mf.fmt_ms(t[anc])} ms; "
        f"round FLOPs DP-DMD - DMD = {(fl[rp] - fl[rd]) / 1e9:.2f} GFLOP vs anchor {fl[anc] / 1e9:.2f} GFLOP."]
    return [
        f"{res['name']}: {res['n_params'] / 1e6:.2f}M params; matmul peak in-set {res['peak']:.0f} GFLOP/s; "
        f"{res['repeats']} repeats.",
        *vs_dmd,
        f"{res['name']}: in the DP-DMD round, {m} critic updates ~ {m * critic / t[rp]:.0%} of the time "
        f"({m} x {mf.fmt_ms(critic)} ms), generator ~ {t[gp] / t[rp]:.0%}, anchor ~ {t[anc] / t[rp]:.0%}; "
        f"round vs {m} critic + 1 generator measured separately: {t[rp] / (m * critic + t[gp]):.2f}x.",
    ]


def git_state() -> str:
    try:
        rev = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True).strip()
        dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "dpdmd_jax"]).returncode != 0
        return f"git {rev}" + (" (dpdmd_jax/ has uncommitted changes)" if dirty else "")
    except Exception:  # not a checkout
        return "git n/a"


def main():
    args = ARGS
    log = lambda s: print(s, flush=True)
    machine = f"{mf.machine()}; {git_state()}"
    log(machine)
    peak = mf.matmul_peak(5 if args.quick else 15)
    log(f"standalone fp32 matmul peak ({mf.PEAK_N}^3): JAX {peak['mm_jax']:.0f}, torch {peak['mm_torch']:.0f} GFLOP/s")
    results = [measure_size(name, args, log) for name in args.sizes.split(",")]
    rows = [r for res in results for r in size_rows(res)]
    notes = [s for res in results for s in derived(res)]
    out = (
        f"{machine}\nstandalone fp32 matmul peak ({mf.PEAK_N}^3): JAX {peak['mm_jax']:.0f}, torch "
        f"{peak['mm_torch']:.0f} GFLOP/s; %peak below uses the faster of the two timed inside each size's "
        f"interleaved repeats.\n\n" + mf.table(HEADER, rows) + "\n\n" + "\n".join(f"- {s}" for s in notes)
    )
    print("\n\n# ===== summary =====\n" + out)


if __name__ == "__main__":
    main()
