"""GPU check of the MMDiT port: cuDNN flash attention vs XLA attention, and full-size bf16 throughput.

    python -m benchmarks.gpu_check            # on a machine with one NVIDIA GPU (H100 / H200)

1. Parity: a 4-layer SD3.5-style model (dual attention, qk RMSNorm), 64x64 latent, 333 context
   tokens, bf16 compute: `attention_impl="cudnn"` and `"xla"` against an fp32 XLA reference of the
   same weights (relative error), so the cuDNN switch is shown to compute the same model.
2. Throughput: the full-size SD3.5-Medium structure (random bf16 weights, 2.24B params, scan over
   layers), 1024^2 images (128x128x16 latent = 4096 image tokens + 333 context), forward and
   forward+backward (grads w.r.t. all params, remat "dots_no_batch"), with each attention
   implementation. Model FLOPs from XLA's cost analysis of the unscanned forward (3x for
   forward+backward); the peak is an 8192^3 bf16 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpdmd_jax.models.mmdit import PRESETS, MMDiT, MMDiTConfig

BASE = dict(PRESETS["sd3.5-medium"])
LATENT = 128  # 1024^2 images
IMPLS = ("xla", "cudnn")
# --dry-run: the same code path at a tiny width, to check the script on a CPU before a GPU lease.
TINY = dict(BASE, num_layers=3, num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=64,
            pooled_projection_dim=32, dual_attention_layers=(0,), pos_embed_max_size=16)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (blocks on its result) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def inputs(cfg: MMDiTConfig, batch: int, latent: int, context_len: int, dtype):
    k = jax.random.split(jax.random.key(1), 3)
    return (jax.random.normal(k[0], (batch, latent, latent, cfg.in_channels), dtype),
            jnp.linspace(999.0, 20.0, batch).astype(jnp.float32),
            jax.random.normal(k[1], (batch, context_len, cfg.joint_attention_dim), dtype),
            jax.random.normal(k[2], (batch, cfg.pooled_projection_dim), dtype))


def build(cfg: MMDiTConfig):
    """(graphdef, params, rest) with the params created on the device, never on the host."""
    make = lambda: nnx.split(MMDiT(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    graphdef = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(graphdef, nnx.Param, ...)[0]
    params, rest = jax.jit(lambda: make()[1:])()
    return graphdef, params, rest


def pure(graphdef):
    fwd = lambda p, r, *a: nnx.merge(graphdef, p, r)(*a)
    loss = lambda p, r, *a: jnp.mean(jnp.square(fwd(p, r, *a).astype(jnp.float32)))
    return fwd, loss


def parity(impls: tuple[str, ...]) -> list[str]:
    """bf16 forward and parameter gradients of each attention implementation vs fp32 XLA."""
    arch = dict(BASE, num_layers=min(4, BASE["num_layers"]), dual_attention_layers=(0, 1), pos_embed_max_size=64)
    graphdef, params, rest = build(MMDiTConfig(**arch))
    x = inputs(MMDiTConfig(**arch), 2, min(64, LATENT), 333, jnp.float32)
    fwd, loss = pure(graphdef)
    ref = np.asarray(jax.jit(fwd)(params, rest, *x), np.float64)
    ref_g = jax.jit(jax.grad(loss))(params, rest, *x)
    to16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    x16 = (x[0].astype(jnp.bfloat16), x[1], x[2].astype(jnp.bfloat16), x[3].astype(jnp.bfloat16))
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                             / np.linalg.norm(np.asarray(b, np.float64)))
    lines = []
    for impl in impls:
        cfg = MMDiTConfig(**arch, dtype="bfloat16", param_dtype="bfloat16", attention_impl=impl)
        gd = nnx.split(nnx.eval_shape(lambda cfg=cfg: MMDiT(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
        f16, l16 = pure(gd)
        out = jax.jit(f16)(to16(params), to16(rest), *x16).astype(jnp.float32)
        g16 = jax.jit(jax.grad(l16))(to16(params), to16(rest), *x16)
        g_err = rel(np.concatenate([np.ravel(a.astype(jnp.float32)) for a in jax.tree.leaves(g16)]),
                    np.concatenate([np.ravel(a) for a in jax.tree.leaves(ref_g)]))
        lines.append(f"| parity, 4 layers, 1024+333 tokens, bf16, attention_impl={impl} | fwd rel err vs fp32 XLA "
                     f"{rel(out, ref):.2e} | param-grad rel err {g_err:.2e} | finite {bool(np.isfinite(out).all())} |")
        print(lines[-1], flush=True)
    return lines


def model_flops(batch: int) -> float:
    """Forward FLOPs of the unscanned model from XLA's cost analysis of the lowered HLO (no compile);
    with scan_layers, cost analysis would count the scanned block once, and likewise the CPU
    per-head attention loop, so this counts with plain XLA attention."""
    from dpdmd_jax.models import layers

    saved, layers.CPU_PER_HEAD_MIN_LOGITS_BYTES = layers.CPU_PER_HEAD_MIN_LOGITS_BYTES, float("inf")
    try:
        return _model_flops(batch)
    finally:
        layers.CPU_PER_HEAD_MIN_LOGITS_BYTES = saved


def _model_flops(batch: int) -> float:
    cfg = MMDiTConfig(**BASE, dtype="bfloat16", param_dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    x = jax.eval_shape(lambda: inputs(cfg, batch, LATENT, 333, jnp.bfloat16))
    lowered = jax.jit(pure(graphdef)[0]).lower(params, rest, *x)
    ca = lowered.cost_analysis()  # None on GPU backends: then count on the compiled executable
    ca = ca if ca is not None else lowered.compile().cost_analysis()
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


def throughput(batch: int, repeats: int, peak: float, fwd_flops: float | None) -> list[str]:
    """Scanned model; fwd+bwd with remat "dots_no_batch" (saves the weight matmuls, recomputes attention:
    with "dots" the saved [B, N, T, T] logits of XLA attention need > 140 GB at batch 2)."""
    fwd_flops = fwd_flops or model_flops(batch)
    rows = []
    for impl in IMPLS:
        cfg = MMDiTConfig(**BASE, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                          remat_policy="dots_no_batch", attention_impl=impl)
        graphdef, params, rest = build(cfg)
        x = inputs(cfg, batch, LATENT, 333, jnp.bfloat16)
        fwd, loss = pure(graphdef)
        # Model FLOPs: forward, and 3x forward for forward+backward (recompute not counted).
        for label, fn, fl in (("fwd", fwd, fwd_flops), ("fwd+bwd", jax.grad(loss), 3 * fwd_flops)):
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(params, rest, *x).compile()
            t_compile = time.perf_counter() - t0
            t = timed(lambda c=compiled, p=params, r=rest, x=x: c(p, r, *x), repeats)
            rows.append(f"| SD3.5-M, {LATENT * 8}^2, batch {batch}, {label}, attention_impl={impl} | "
                        f"{t * 1e3:.1f} ms | {fl / 1e12:.1f} model TFLOP | {fl / t / 1e12:.0f} TFLOP/s | "
                        f"{fl / t / peak:.0%} of measured peak | compile {t_compile:.0f} s |")
            print(rows[-1], flush=True)
    return rows


def matmul_peak(n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    return 2.0 * n**3 / timed(lambda: f(a, b), 20)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--impls", default="xla,cudnn", help="attention implementations to time")
    p.add_argument("--fwd-tflop", type=float, default=None,
                   help="forward model TFLOP if already counted (e.g. on a CPU: `model_flops`); skips the count")
    p.add_argument("--dry-run", action="store_true", help="tiny widths (checks the script on a CPU)")
    args = p.parse_args()
    import flax

    global BASE, LATENT, IMPLS
    if args.dry_run:
        BASE, LATENT = TINY, 16
    IMPLS = tuple(args.impls.split(","))
    if jax.default_backend() != "gpu":
        IMPLS = ("xla",)  # cuDNN needs an NVIDIA GPU

    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, flax {flax.__version__}",
          flush=True)
    peak = matmul_peak(512 if args.dry_run else 8192)
    print(f"measured bf16 matmul peak (8192^3): {peak / 1e12:.0f} TFLOP/s", flush=True)
    on_gpu = jax.default_backend() == "gpu"
    lines = [] if args.skip_parity else parity(("xla", "cudnn") if on_gpu else ("xla",))
    print("\n".join(lines), flush=True)
    lines += throughput(args.batch, args.repeats, peak, args.fwd_tflop * 1e12 if args.fwd_tflop else None)
    print("\n# summary\n" + f"device {dev.device_kind}, jax {jax.__version__}, flax {flax.__version__}, "
          f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
