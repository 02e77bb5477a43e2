"""MMDiT forward and forward+backward speed: our jitted Flax NNX port vs diffusers
`SD3Transformer2DModel` (eager, and `torch.compile` where it works), fp32 on CPU.

    python -m benchmarks.mmdit_forward            # full run (about 25 min on 2 cores)
    python -m benchmarks.mmdit_forward --quick    # smaller configs, fewer repeats (a few min)

What it does, per config:
  1. builds a random diffusers model (every parameter perturbed), `save_pretrained`s it to a temp
     dir and loads it with `load_mmdit`, so both sides hold identical weights;
  2. checks forward outputs and parameter gradients agree (relative error) before timing;
  3. times every implementation interleaved (A B C A B C ..., order reversed every other round)
     so background load hits all of them alike; reports medians and the median of the per-round
     ratios;
  4. counts model FLOPs with XLA's cost analysis and reports achieved FLOP/s as a fraction of
     this CPU's measured fp32 matmul peak (2048^3 matmul, JAX and torch, same thread count).
Then compile time (lower + compile wall) of a 24-layer model with and without `scan_layers`.

Thread counts: `--threads N` (default 2) sets torch.set_num_threads, OMP/MKL and XLA's
intra-op pool (`intra_op_parallelism_threads`) before jax and torch are imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback

from benchmarks.common import flops_of, host, table  # standard library only


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller mid config, fewer repeats, 8-layer compile test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for torch's OpenMP pool; 'unset' leaves libgomp's spinning default "
                        "(which collapses under a shared, oversubscribed CPU)")
    p.add_argument("--only", choices=["peak", "attention", "small", "mid", "compile"], action="append",
                   help="run only these sections (repeatable)")
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
_THREADS = str(ARGS.threads if ARGS else 2)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={_THREADS}"
)
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = _THREADS
_OMP_WAIT = ARGS.omp_wait_policy if ARGS else "PASSIVE"
if _OMP_WAIT.lower() != "unset":
    os.environ["OMP_WAIT_POLICY"] = _OMP_WAIT
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The thread / platform flags above must be set before jax and torch are imported.
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from dpdmd_jax.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from dpdmd_jax.weights import loader  # noqa: E402
from dpdmd_jax.weights.sd3 import key_map, load_mmdit  # noqa: E402
from tests.torch_helpers import nhwc, rel_err, save_random_sd3, sd3_torch_kwargs  # noqa: E402

# ----------------------------------------------------------------------------- configs

# SD3.5-Medium style block (dual attention on the first layers, qk RMSNorm, SD3 text widths).
MID = dict(
    arch=dict(sample_size=64, patch_size=2, in_channels=16, num_layers=8, attention_head_dim=64,
              num_attention_heads=12, joint_attention_dim=4096, caption_projection_dim=768,
              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=64,
              dual_attention_layers=(0, 1, 2), qk_norm="rms_norm"),
    latent=64, context_len=333, batch=1,
)
SMALL = dict(
    arch=dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=32,
              num_attention_heads=4, joint_attention_dim=4096, caption_projection_dim=128,
              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=16,
              dual_attention_layers=(0,), qk_norm="rms_norm"),
    latent=16, context_len=77, batch=2,
)
QUICK_MID = dict(MID, arch=dict(MID["arch"], num_layers=3, dual_attention_layers=(0,)), latent=32)


# ----------------------------------------------------------------------------- timing helpers


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Runs every fn `warmup` times, then `repeats` rounds of all fns (order reversed every other
    round); returns the wall times per fn. Each fn must block until its result is ready."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def med(xs):
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num_i / den_i (robust to load that changes between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den))


def fmt_ms(s: float | None) -> str:
    return "n/a" if s is None else (f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}")


def model_flops(fn, *args) -> float:
    """XLA cost-analysis FLOPs of `fn(*args)` traced with plain XLA attention. Cost analysis counts
    a loop body once, so on the CPU per-head attention path (`layers.attention_per_head`, a
    lax.map over heads) it would count one head; the maths is the same, so we count it unrolled."""
    from dpdmd_jax.models import layers

    saved, layers.CPU_PER_HEAD_MIN_LOGITS_BYTES = layers.CPU_PER_HEAD_MIN_LOGITS_BYTES, float("inf")
    try:  # a fresh jit of a fresh function: nothing cached from the per-head trace
        return flops_of(jax.jit(lambda *a: fn(*a)).lower(*args))
    finally:
        layers.CPU_PER_HEAD_MIN_LOGITS_BYTES = saved


# ----------------------------------------------------------------------------- peak


PEAK_N = 2048


def matmul_probes(n: int = PEAK_N) -> dict:
    """Two fns timing an n^3 fp32 matmul in JAX and torch (for the peak, also run inside every
    interleaved timing set so the peak is measured under the same background load)."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), np.float32)
    f = jax.jit(lambda x, y: x @ y)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return {"mm_jax": lambda: f(ja, jb).block_until_ready(), "mm_torch": lambda: torch.matmul(ta, tb)}


def gflops(times: list[float], n: int = PEAK_N) -> float:
    return 2.0 * n**3 / med(times) / 1e9


def matmul_peak(repeats: int) -> dict[str, float]:
    times = interleaved(matmul_probes(), repeats, warmup=2)
    return {k: gflops(v) for k, v in times.items()}


# ----------------------------------------------------------------------------- one config


def make_inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    a, b, s = case["arch"], case["batch"], case["latent"]
    return dict(
        latents=rng.standard_normal((b, s, s, a["in_channels"]), np.float32),
        timesteps=np.linspace(999.0, 3.25, b).astype(np.float32),
        context=rng.standard_normal((b, case["context_len"], a["joint_attention_dim"]), np.float32),
        pooled=rng.standard_normal((b, a["pooled_projection_dim"]), np.float32),
    )


def pure_fns(graphdef):
    """The model as pure functions of (params, rest, *inputs): the forward and a mean-square loss."""

    def fwd(params, rest, *a):
        return nnx.merge(graphdef, params, rest)(*a)

    def loss(params, rest, *a):
        return jnp.mean(jnp.square(fwd(params, rest, *a)))

    return fwd, loss


def ours_fns(model: MMDiT, x: dict):
    """Jitted pure functions over split state (what a training step does): fwd and value_and_grad."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    args = tuple(jnp.asarray(x[k]) for k in ("latents", "timesteps", "context", "pooled"))
    fwd, loss = pure_fns(graphdef)
    fwd_j = jax.jit(fwd)
    fb_j = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    fwd_c = fwd_j.lower(params, rest, *args).compile()
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    fb_c = fb_j.lower(params, rest, *args).compile()
    t_fb = time.perf_counter() - t0
    return dict(
        fwd=lambda: fwd_c(params, rest, *args).block_until_ready(),
        fb=lambda: jax.block_until_ready(fb_c(params, rest, *args)),
        fwd_out=lambda: np.asarray(fwd_c(params, rest, *args)),
        grads=lambda: fb_c(params, rest, *args)[1],
        flops_fwd=model_flops(fwd, params, rest, *args),
        flops_fb=model_flops(jax.value_and_grad(loss), params, rest, *args),
        compile_fwd=t_fwd,
        compile_fb=t_fb,
    )


def torch_fns(module, ref_params, x: dict):
    kw = sd3_torch_kwargs(x)

    def fwd():
        with torch.inference_mode():
            return module(**kw)[0]

    def fb():
        for p in ref_params:
            p.grad = None
        loss = module(**kw)[0].square().mean()
        loss.backward()
        return loss

    return fwd, fb


def grad_check(cfg: MMDiTConfig, grads: nnx.State, ref, keys=key_map) -> tuple[float, float]:
    """(global rel err, worst per-tensor rel err) of our parameter grads vs torch's .grad;
    `keys(cfg, state)` is the model family's key map."""
    named = dict(ref.named_parameters())
    num = den = 0.0
    worst = 0.0
    for key, g in loader.export_tensors(grads, keys(cfg, grads)):
        t = named[key].grad.double().numpy()
        g = g.astype(np.float64)
        num += float(np.sum((g - t) ** 2))
        den += float(np.sum(t**2))
        if np.linalg.norm(t) > 0:
            worst = max(worst, float(np.linalg.norm(g - t) / np.linalg.norm(t)))
    return (num / den) ** 0.5, worst


def run_config(name: str, case: dict, repeats: int, use_compile: bool, log) -> dict:
    log(f"\n== {name}: {case['arch']['num_layers']} layers, {case['arch']['num_attention_heads']}x"
        f"{case['arch']['attention_head_dim']} heads, latent {case['latent']}^2, context {case['context_len']}, "
        f"batch {case['batch']}")
    x = make_inputs(case)
    with tempfile.TemporaryDirectory() as tmp:
        ref = save_random_sd3(tmp, seed=0, **case["arch"]).eval()
        model = load_mmdit(tmp, progress=False)
        model_scan = load_mmdit(tmp, scan_layers=True, progress=False)
    ref_params = list(ref.parameters())
    cfg = model.cfg

    ours = ours_fns(model, x)
    ours_scan = ours_fns(model_scan, x)
    t_fwd, t_fb = torch_fns(ref, ref_params, x)
    log(f"   XLA compile: loop fwd {ours['compile_fwd']:.1f}s, fwd+bwd {ours['compile_fb']:.1f}s; "
        f"scan fwd {ours_scan['compile_fwd']:.1f}s, fwd+bwd {ours_scan['compile_fb']:.1f}s")

    # --- parity before timing
    ref_out = nhwc(t_fwd())
    fwd_err = rel_err(ours["fwd_out"](), ref_out)
    scan_err = rel_err(ours_scan["fwd_out"](), ref_out)
    t_fb()
    g_err, g_worst = grad_check(cfg, ours["grads"](), ref)
    log(f"   parity: fwd rel err {fwd_err:.2e} (scan {scan_err:.2e}); grads rel err {g_err:.2e} "
        f"(worst tensor {g_worst:.2e})")

    # --- torch.compile
    compiled_note = "not tried"
    c_fwd = c_fb = None
    if use_compile:
        try:
            import torch._dynamo

            torch._dynamo.reset()
            cmod = torch.compile(ref)
            c_fwd, c_fb = torch_fns(cmod, ref_params, x)
            t0 = time.perf_counter()
            c_out = nhwc(c_fwd())
            tc_fwd = time.perf_counter() - t0
            t0 = time.perf_counter()
            c_fb()
            tc_fb = time.perf_counter() - t0
            compiled_note = (f"ok: first call (compile) fwd {tc_fwd:.0f}s, fwd+bwd {tc_fb:.0f}s; "
                             f"rel err vs eager {rel_err(c_out, ref_out):.1e}")
        except Exception as e:  # record why, keep going
            traceback.print_exc()
            compiled_note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            c_fwd = c_fb = None
    log(f"   torch.compile: {compiled_note}")

    results = {}
    probes = matmul_probes()
    for kind, flops in (("fwd", ours["flops_fwd"]), ("fb", ours["flops_fb"])):
        fns = {"ours": ours[kind], "ours_scan": ours_scan[kind], "eager": t_fwd if kind == "fwd" else t_fb}
        if c_fwd is not None:
            fns["compile"] = c_fwd if kind == "fwd" else c_fb
        fns.update(probes)
        times = interleaved(fns, repeats, warmup=2 if kind == "fwd" else 1)
        peak_here = max(gflops(times["mm_jax"]), gflops(times["mm_torch"]))
        results[kind] = dict(times=times, flops=flops, peak=peak_here)
        log(f"   {kind}: " + ", ".join(f"{k} {fmt_ms(med(v))} ms" for k, v in times.items())
            + f"; matmul peak during this set {peak_here:.0f} GFLOP/s")
    return dict(name=name, results=results, fwd_err=fwd_err, scan_err=scan_err, g_err=g_err, g_worst=g_worst,
                compiled_note=compiled_note, compile_fwd=ours["compile_fwd"], compile_fb=ours["compile_fb"])


def config_rows(res: dict) -> list[list[str]]:
    rows = []
    for kind, label in (("fwd", "fwd"), ("fb", "fwd+bwd")):
        r = res["results"][kind]
        t, fl, peak = r["times"], r["flops"], r["peak"] * 1e9
        ms = {k: fmt_ms(med(t[k])) if k in t else "n/a" for k in ("ours", "ours_scan", "eager", "compile")}
        frac = {k: f"{fl / med(t[k]) / peak:.0%}" if k in t else "n/a" for k in ("ours", "eager", "compile")}
        ratio = {k: f"{paired_ratio(t[k], t['ours']):.2f}" if k in t else "n/a" for k in ("eager", "compile")}
        rows.append([
            res["name"], label, f"{fl / 1e9:.1f}", ms["ours"], ms["ours_scan"], ms["eager"], ms["compile"],
            ratio["eager"], ratio["compile"], f"{r['peak']:.0f}", frac["ours"], frac["eager"], frac["compile"],
        ])
    return rows


# ----------------------------------------------------------------------------- attention alone


def attention_bench(repeats: int, log, shape=(1, 1357, 12, 64)) -> str:
    """Joint attention of the mid config alone: `jax.nn.dot_product_attention` (XLA) vs our
    `layers.attention` (per-head on CPU at this size) vs torch SDPA (what diffusers calls), fwd and
    grad of sum(out^2) wrt q, k, v."""
    from dpdmd_jax.models.layers import attention

    b, t, n, h = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape, np.float32) for _ in range(3))
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous().requires_grad_() for a in (q, k, v))
    impls = {"xla": jax.nn.dot_product_attention, "ours": attention}
    fwd = {name: jax.jit(f) for name, f in impls.items()}
    fb = {name: jax.jit(jax.grad(lambda a, b_, c, f=f: jnp.sum(jnp.square(f(a, b_, c))), argnums=(0, 1, 2)))
          for name, f in impls.items()}
    ref_o = np.asarray(fwd["xla"](jq, jk, jv))
    ref_g = fb["xla"](jq, jk, jv)
    errs = {name: (rel_err(fwd[name](jq, jk, jv), ref_o),
                   max(rel_err(a, c) for a, c in zip(fb[name](jq, jk, jv), ref_g))) for name in impls}

    def t_fwd():
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    def t_fb():
        for a in (tq, tk, tv):
            a.grad = None
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).square().sum().backward()

    rows = []
    runners = {
        "fwd": {name: (lambda f=f: jax.block_until_ready(f(jq, jk, jv))) for name, f in fwd.items()},
        "fwd+bwd": {name: (lambda f=f: jax.block_until_ready(f(jq, jk, jv))) for name, f in fb.items()},
    }
    for kind, fns in runners.items():
        fns["torch_sdpa"] = t_fwd if kind == "fwd" else t_fb
        times = interleaved(fns, repeats, warmup=1)
        flops = 4.0 * b * n * t * t * h * (1 if kind == "fwd" else 3)
        for name, ts in times.items():
            rows.append([kind, name, fmt_ms(med(ts)), f"{flops / med(ts) / 1e9:.1f}",
                         f"{paired_ratio(ts, times['torch_sdpa']):.2f}",
                         f"{errs[name][0 if kind == 'fwd' else 1]:.1e}" if name in errs else "-"])
        log(f"   attention {kind}: " + ", ".join(f"{k_} {fmt_ms(med(v_))} ms" for k_, v_ in times.items()))
    return (f"Joint attention alone, [B,T,N,H] = {list(shape)}, fp32, {repeats} interleaved rounds; GFLOP/s counts "
            f"4*B*N*T^2*H (x3 for fwd+bwd); rel err vs xla:\n"
            + table(["pass", "impl", "median ms", "GFLOP/s", "time / torch SDPA", "rel err"], rows))


# ----------------------------------------------------------------------------- compile time


def compile_times(layers: int, heads: int, log) -> list[list[str]]:
    """lower+compile wall of fwd and fwd+bwd, scan_layers False/True, on shape-only inputs."""
    dual = tuple(range(min(13, layers - 1)))
    arch = dict(sample_size=64, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
                num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=heads * 64,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96,
                dual_attention_layers=dual, qk_norm="rms_norm")
    sds = jax.ShapeDtypeStruct
    args = (sds((1, 64, 64, 16), jnp.float32), sds((1,), jnp.float32), sds((1, 333, 4096), jnp.float32),
            sds((1, 2048), jnp.float32))
    rows = []
    for scan in (False, True):
        cfg = MMDiTConfig(**arch, scan_layers=scan)
        abstract = nnx.eval_shape(lambda cfg=cfg: MMDiT(cfg, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        fwd, loss = pure_fns(graphdef)
        for label, fn in (("fwd", fwd), ("fwd+bwd", jax.value_and_grad(loss))):
            t0 = time.perf_counter()
            lowered = jax.jit(fn).lower(params, rest, *args)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            row = [f"{layers}", f"{heads}x64", str(scan), label, f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", f"{t2 - t0:.1f}"]
            log(f"   compile {row}")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- main


def machine() -> str:
    return (f"{host()}; jax {jax.__version__}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()} (torch) / "
            f"intra_op_parallelism_threads={_THREADS} (XLA), "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def main():
    args = ARGS
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sections = set(args.only or ["peak", "attention", "small", "mid", "compile"])
    log = lambda s: print(s, flush=True)
    log(machine())
    out = []

    if sections & {"peak", "small", "mid"}:
        peak = matmul_peak(5 if args.quick else 15)
        out.append(f"fp32 matmul peak, {PEAK_N}^3, median GFLOP/s (standalone, before the model runs):\n" + table(
            ["", "JAX (XLA:CPU)", "torch (MKL)"], [["GFLOP/s", f"{peak['mm_jax']:.0f}", f"{peak['mm_torch']:.0f}"]]))
        log(out[-1])

    if "attention" in sections:
        out.append(attention_bench(3 if args.quick else 7, log))
        log("\n" + out[-1])

    results = []
    use_compile = not args.no_torch_compile
    if "small" in sections:
        results.append(run_config("small", SMALL, 15 if args.quick else 60, use_compile, log))
    if "mid" in sections:
        results.append(run_config("mid" if not args.quick else "mid(quick)", QUICK_MID if args.quick else MID,
                                  3 if args.quick else 9, use_compile and not args.quick, log))
    if results:
        hdr = ["config", "pass", "GFLOP", "ours ms", "ours scan ms", "torch eager ms", "torch.compile ms",
               "eager/ours", "compile/ours", "peak GFLOP/s", "ours %peak", "eager %peak", "compile %peak"]
        rows = [r for res in results for r in config_rows(res)]
        notes = "\n".join(
            f"- {r['name']}: fwd rel err {r['fwd_err']:.1e} (scan {r['scan_err']:.1e}), grad rel err "
            f"{r['g_err']:.1e} (worst tensor {r['g_worst']:.1e}); ours XLA compile fwd {r['compile_fwd']:.1f}s, "
            f"fwd+bwd {r['compile_fb']:.1f}s; torch.compile {r['compiled_note']}"
            for r in results
        )
        n = {r["name"]: len(r["results"]["fwd"]["times"]["ours"]) for r in results}
        out.append(
            f"Medians over interleaved rounds ({', '.join(f'{k}: {v}' for k, v in n.items())} rounds); ratios are "
            f"medians of per-round ratios (>1: ours faster); %peak = XLA-counted FLOPs / median time / peak, "
            f"peak = the faster of JAX's and torch's {PEAK_N}^3 matmul timed inside the same interleaved rounds."
            f"\n" + table(hdr, rows) + "\n" + notes
        )
        log("\n" + out[-1])

    if "compile" in sections:
        layers, heads = (8, 4) if args.quick else (24, 6)
        log(f"\n== compile time, {layers} layers")
        rows = compile_times(layers, heads, log)
        out.append(
            f"Compile time (s), {layers}-layer SD3.5-M structure (dual attention on layers 0..12, qk RMSNorm), "
            f"64^2 latent, 333 context, single run each:\n"
            + table(["layers", "heads", "scan_layers", "pass", "lower s", "compile s", "total s"], rows)
        )
        log("\n" + out[-1])

    print("\n\n# ===== summary =====\n" + machine() + "\n\n" + "\n\n".join(out))


if __name__ == "__main__":
    main()
