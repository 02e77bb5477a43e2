"""Per-device memory of the full-size SD3.5-Medium (or SDXL) distillation state on an 8-device mesh,
with the text encoders on device vs training from an embedding cache (`data.kind="embeddings"`),
next to holding everything replicated on every device (data parallelism alone).

    python -m benchmarks.memory_plan [--family sd35|sdxl] [--fsdp 8] [--batch 32]

Nothing is allocated: every model is built with `nnx.eval_shape`, placed by our sharding rules
(`parallel.mesh.state_shardings`, fsdp over all devices) and summed per device. Rows:
  - teacher (frozen, with its position-embedding buffer) + student + fake score, each in
    `model.param_dtype` (configs/sd35.py: fp32 master weights), and Adam's two moments for the
    student and the fake score;
  - CLIP-L, OpenCLIP-bigG (and T5-XXL for SD3.5) in `text.dtype` (bf16), sharded like the teacher;
  - the VAE in fp32 (the sample grids decode with it);
  - the round's conditioning batch ([M + 1, B, ...] + uncond, fp32), split over the batch.
Activations are not counted (they depend on remat and XLA; see docs/benchmarks/step-cost.md).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import host, table  # noqa: E402

GiB = 2**30


def components(family: str):
    """(name, builder, copies, needed when training from an embedding cache, params only)."""
    from dpdmd_jax.models.clip import PRESETS as CLIP, CLIPTextConfig, CLIPTextModel
    from dpdmd_jax.models.vae import PRESETS as VAE, AutoencoderKL, VAEConfig

    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
    clip = lambda name, **kw: (lambda r: CLIPTextModel(CLIPTextConfig(**{**CLIP[name], **bf16, **kw}), rngs=r))
    if family == "sd35":
        from dpdmd_jax.models.mmdit import PRESETS as MMDIT, MMDiT, MMDiTConfig
        from dpdmd_jax.models.t5 import PRESETS as T5, T5Config, T5Encoder

        mm = MMDiTConfig(**MMDIT["sd3.5-medium"], param_dtype="float32", scan_layers=True)
        net, label = (lambda r: MMDiT(mm, rngs=r)), "MMDiT SD3.5-M"
        text = [("CLIP-L text + projection (bf16)", clip("clip-l")),
                ("OpenCLIP-bigG text + projection (bf16)", clip("clip-bigg")),
                ("T5-XXL encoder (bf16)", lambda r: T5Encoder(T5Config(**{**T5["t5-v1_1-xxl"], **bf16}), rngs=r))]
        vae = "sd3"
    else:
        from dpdmd_jax.models.unet import PRESETS as UNET, UNet2DConditionModel, UNetConfig

        un = UNetConfig(**UNET["sdxl-base"], param_dtype="float32", scan_layers=True)
        net, label = (lambda r: UNet2DConditionModel(un, rngs=r)), "UNet SDXL"
        text = [("CLIP-L text (bf16)", clip("clip-l", with_projection=False)),
                ("OpenCLIP-bigG text + projection (bf16)", clip("clip-bigg"))]
        vae = "sdxl"
    rows = [(f"{label} fp32 teacher (frozen, with buffers)", net, 1, True, False),
            (f"{label} fp32 student, fake score", net, 2, True, True),
            ("Adam moments (student, fake: 2 each)", net, 4, True, True)]
    rows += [(name, build, 1, False, False) for name, build in text]
    rows.append(("VAE fp32 (sample grids)", lambda r: AutoencoderKL(VAEConfig(**VAE[vae]), rngs=r), 1, True, False))
    return rows


def main():
    from dpdmd_jax.parallel.mesh import make_mesh, sharding_plan
    from dpdmd_jax.weights.loader import abstract_model

    p = argparse.ArgumentParser()
    p.add_argument("--family", choices=("sd35", "sdxl"), default="sd35")
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fake_updates", type=int, default=5)
    args = p.parse_args()
    mesh = make_mesh(fsdp=args.fsdp, devices=jax.devices()[: args.fsdp])

    rows, totals = [], {"encoders": 0, "cache": 0, "unsharded": 0}
    for name, build, copies, with_cache, params_only in components(args.family):
        state = nnx.state(abstract_model(build), nnx.Param if params_only else ...)
        plan = sharding_plan(state, mesh)
        dev, rep, total = plan["per_device_bytes"], plan["replicated_bytes"], plan["total_bytes"]
        rows.append([name, f"{copies}", f"{dev * copies / GiB:.2f}", f"{rep * copies / 2**20:.1f}",
                     f"{total * copies / GiB:.2f}"])
        totals["encoders"] += dev * copies
        totals["unsharded"] += total * copies
        totals["cache"] += dev * copies if with_cache else 0
    ctx, pooled = ((333, 4096), 2048) if args.family == "sd35" else ((77, 2048), 1280 + 6)
    cond = (args.fake_updates + 2) * args.batch * (int(np.prod(ctx)) + pooled) * 4  # M + 1 batches + uncond
    rows.append(["round conditionings (fp32)", "1", f"{cond / args.fsdp / GiB:.2f}", "0", f"{cond / GiB:.2f}"])
    for k in ("encoders", "cache"):
        totals[k] += cond // args.fsdp
    totals["unsharded"] += cond // args.fsdp  # data-parallel: each device still holds only its rows
    print(f"# per-device state memory, {args.family} DP-DMD on fsdp={args.fsdp}, batch {args.batch} ({host()})\n")
    print(table(["component", "copies", "GiB / device", "replicated MiB / device", "GiB unsharded"], rows))
    print()
    print(table(["layout", "GiB / device (state, no activations)"],
                [["ours, prompts (encoders on device, sharded)", f"{totals['encoders'] / GiB:.2f}"],
                 ["ours, embedding cache (no encoders)", f"{totals['cache'] / GiB:.2f}"],
                 ["everything replicated on every device (data-parallel only)", f"{totals['unsharded'] / GiB:.2f}"]]))


if __name__ == "__main__":
    main()
