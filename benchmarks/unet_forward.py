"""UNet forward and forward+backward speed: our jitted Flax NNX `UNet2DConditionModel` vs diffusers
(torch eager), fp32 on CPU, at a mid-size SDXL-layout config, in one run.

    python -m benchmarks.unet_forward            # mid config (about 5 min on 2 cores)
    python -m benchmarks.unet_forward --quick    # a smaller config, fewer rounds (about 1 min)

Mid config: SDXL base's block layout and conditioning at a third of its width and depth: blocks
(DownBlock2D, CrossAttnDownBlock2D x 2) of (128, 256, 512) channels with 64-wide heads (2, 4, 8),
transformer depth (1, 2, 4) (mid block 4), 2 resnets per block, linear projections, GEGLU, the
`text_time` add-embedding (1280 pooled + 6 x 256), cross-attention width 2048 over 77 tokens;
a 32 x 32 latent, batch 2 (the CFG pair), different timesteps.

Protocol (the MMDiT benchmark's): a random diffusers model with every parameter perturbed is
`save_pretrained`ed and loaded with `load_unet`, so both hold the same weights; outputs and
parameter gradients are compared before timing; the implementations and a 2048^3 fp32 matmul in
JAX and torch are timed interleaved (order reversed every other round); medians and the median of
per-round ratios (> 1: ours faster); %peak = XLA-counted FLOPs / median time / the faster matmul's
rate in the same rounds. Ours runs jitted pure functions of split state (what a train step does);
`scan` rows scan the transformer blocks of each Transformer2DModel (`scan_layers=True`).
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import table
# The same timing protocol and thread / platform set-up (imports jax and torch with 2 threads).
from benchmarks.mmdit_forward import (fmt_ms, gflops, grad_check, interleaved, machine, matmul_probes, med,
                                      model_flops, paired_ratio, pure_fns)

import jax  # noqa: E402  (after the flags benchmarks.mmdit_forward sets)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from dpdmd_jax.weights.unet import key_map, load_unet  # noqa: E402
from tests.torch_helpers import rel_err, save_random_unet, unet_torch_kwargs  # noqa: E402

_DOWN, _CA_DOWN, _UP, _CA_UP = "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
MID = dict(
    arch=dict(in_channels=4, out_channels=4, block_out_channels=(128, 256, 512), layers_per_block=2,
              down_block_types=(_DOWN, _CA_DOWN, _CA_DOWN), up_block_types=(_CA_UP, _CA_UP, _UP),
              transformer_layers_per_block=(1, 2, 4), attention_head_dim=(2, 4, 8), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=1280 + 6 * 256),
    latent=(32, 32), batch=2, context_len=77, text_embeds=1280,
)
QUICK = dict(MID, arch=dict(MID["arch"], block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 1, 2),
                            attention_head_dim=(1, 2, 4)), latent=(16, 16))


def make_inputs(case, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = case["arch"], case["batch"]
    return dict(
        sample=rng.standard_normal((b, *case["latent"], a["in_channels"]), np.float32),
        timesteps=np.linspace(999.0, 250.0, b).astype(np.float32),
        context=rng.standard_normal((b, case["context_len"], a["cross_attention_dim"]), np.float32),
        text_embeds=rng.standard_normal((b, case["text_embeds"]), np.float32),
        time_ids=np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (b, 1)),
    )


def ours_fns(model, x: dict) -> dict:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    args = tuple(jnp.asarray(x[k]) for k in ("sample", "timesteps", "context", "text_embeds", "time_ids"))
    fwd, loss = pure_fns(graphdef)
    fwd_c = jax.jit(fwd).lower(params, rest, *args).compile()
    fb_c = jax.jit(jax.value_and_grad(loss)).lower(params, rest, *args).compile()
    return dict(
        fwd=lambda: fwd_c(params, rest, *args).block_until_ready(),
        fb=lambda: jax.block_until_ready(fb_c(params, rest, *args)),
        out=lambda: np.asarray(fwd_c(params, rest, *args)),
        grads=lambda: fb_c(params, rest, *args)[1],
        flops_fwd=model_flops(fwd, params, rest, *args),
        flops_fb=model_flops(jax.value_and_grad(loss), params, rest, *args),
    )


def torch_fns(ref, x: dict):
    kw = unet_torch_kwargs(x)
    params = list(ref.parameters())

    def fwd():
        with torch.inference_mode():
            return ref(**kw)[0]

    def fb():
        for p in params:
            p.grad = None
        loss = ref(**kw)[0].square().mean()
        loss.backward()
        return loss

    return fwd, fb


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per pass (default 7; --quick 3)")
    args = p.parse_args()
    torch.set_num_threads(2)
    case = QUICK if args.quick else MID
    repeats = args.repeats or (3 if args.quick else 7)
    log = lambda s: print(s, flush=True)
    log(machine())
    x = make_inputs(case)
    with tempfile.TemporaryDirectory() as tmp:
        ref = save_random_unet(tmp, case["arch"])
        model = load_unet(tmp, progress=False)
        model_scan = load_unet(tmp, scan_layers=True, progress=False)
    n_params = sum(p.numel() for p in ref.parameters())
    log(f"config: {case['arch']['block_out_channels']} channels, transformer depth "
        f"{case['arch']['transformer_layers_per_block']}, latent {case['latent']}, batch {case['batch']}; "
        f"{n_params / 1e6:.1f} M parameters")
    ours, ours_scan = ours_fns(model, x), ours_fns(model_scan, x)
    t_fwd, t_fb = torch_fns(ref, x)
    ref_out = t_fwd().numpy().transpose(0, 2, 3, 1)
    fwd_err, scan_err = rel_err(ours["out"](), ref_out), rel_err(ours_scan["out"](), ref_out)
    t_fb()
    g_err, g_worst = grad_check(model.cfg, ours["grads"](), ref, keys=key_map)
    log(f"parity: fwd rel err {fwd_err:.1e} (scan {scan_err:.1e}); grads rel err {g_err:.1e} "
        f"(worst tensor {g_worst:.1e})")

    rows = []
    passes = (("fwd", "fwd", ours["flops_fwd"], t_fwd), ("fb", "fwd+bwd", ours["flops_fb"], t_fb))
    for kind, label, flops, ref_fn in passes:
        fns = {"ours": ours[kind], "ours_scan": ours_scan[kind], "eager": ref_fn, **matmul_probes()}
        t = interleaved(fns, repeats, warmup=1)
        peak = max(gflops(t["mm_jax"]), gflops(t["mm_torch"]))
        frac = [f"{flops / med(t[k]) / (peak * 1e9):.0%}" for k in ("ours", "eager")]
        rows.append([label, f"{flops / 1e9:.1f}", fmt_ms(med(t["ours"])), fmt_ms(med(t["ours_scan"])),
                     fmt_ms(med(t["eager"])), f"{paired_ratio(t['eager'], t['ours']):.2f}",
                     f"{paired_ratio(t['eager'], t['ours_scan']):.2f}", f"{peak:.0f}", *frac])
        log(f"{label}: " + ", ".join(f"{k} {fmt_ms(med(v))} ms" for k, v in t.items()))
    summary = table(["pass", "GFLOP", "ours ms", "ours scan ms", "torch eager ms", "eager/ours", "eager/ours scan",
                     "peak GFLOP/s", "ours %peak", "eager %peak"], rows)
    print(f"\n# ===== summary =====\n{machine()}\n{'quick' if args.quick else 'mid'} config, {n_params / 1e6:.1f} M "
          f"parameters, {repeats} interleaved rounds; parity fwd {fwd_err:.1e} (scan {scan_err:.1e}), grads "
          f"{g_err:.1e} (worst tensor {g_worst:.1e})\n\n{summary}")


if __name__ == "__main__":
    main()
