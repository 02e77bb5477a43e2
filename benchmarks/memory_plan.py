"""Per-device memory of the full-size SD3.5-Medium distillation state on an 8-device mesh, with the
text encoders on device vs training from an embedding cache (`data.kind="embeddings"`).

    python -m benchmarks.memory_plan [--fsdp 8] [--batch 32]

Nothing is allocated: every model is built with `nnx.eval_shape`, placed by our sharding rules
(`parallel.mesh.state_shardings`, fsdp over all devices) and summed per device. Rows:
  - teacher (frozen, with its position-embedding buffer) + student + fake score, each in
    `model.param_dtype` (configs/sd35.py: fp32 master weights), and Adam's two moments for the
    student and the fake score;
  - CLIP-L, OpenCLIP-bigG and T5-XXL in `text.dtype` (bf16), sharded like the teacher;
  - the round's conditioning batch ([M + 1, B, 333, 4096] + uncond, fp32), split over the batch.
Activations are not counted (they depend on remat and XLA; see BENCHMARKS.md, step cost).
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


def per_device_bytes(abstract_state, mesh) -> tuple[int, int]:
    """(bytes on one device, bytes replicated on every device) of a placed abstract state."""
    from dpdmd_jax.parallel.mesh import state_shardings

    shardings = state_shardings(abstract_state, mesh)
    dev = rep = 0
    for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings), strict=True):
        nbytes = int(np.prod(x.shape)) * x.dtype.itemsize
        shard = int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
        dev += shard
        rep += nbytes if shard == nbytes else 0
    return dev, rep


def main():
    from dpdmd_jax.models.clip import PRESETS as CLIP, CLIPTextConfig, CLIPTextModel
    from dpdmd_jax.models.mmdit import PRESETS as MMDIT, MMDiT, MMDiTConfig
    from dpdmd_jax.models.t5 import PRESETS as T5, T5Config, T5Encoder
    from dpdmd_jax.parallel.mesh import make_mesh

    p = argparse.ArgumentParser()
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fake_updates", type=int, default=5)
    args = p.parse_args()
    mesh = make_mesh(fsdp=args.fsdp, devices=jax.devices()[: args.fsdp])

    def state(build, params_only):
        return nnx.state(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param if params_only else ...)

    rows, totals = [], {"encoders": 0, "cache": 0}

    def add(name, build, copies, both=True, params_only=True):
        dev, rep = per_device_bytes(state(build, params_only), mesh)
        rows.append([name, f"{copies}", f"{dev * copies / GiB:.2f}", f"{rep * copies / 2**20:.1f}"])
        totals["encoders"] += dev * copies
        if both:
            totals["cache"] += dev * copies

    mm = MMDiTConfig(**MMDIT["sd3.5-medium"], param_dtype="float32", scan_layers=True)
    add("MMDiT SD3.5-M fp32 teacher (+ pos-embed buffer)", lambda r: MMDiT(mm, rngs=r), 1, params_only=False)
    add("MMDiT SD3.5-M fp32 student, fake", lambda r: MMDiT(mm, rngs=r), 2)
    add("Adam moments (student, fake: 2 each)", lambda r: MMDiT(mm, rngs=r), 4)
    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
    add("CLIP-L text (bf16)", lambda r: CLIPTextModel(CLIPTextConfig(**{**CLIP["clip-l"], **bf16}), rngs=r), 1, False)
    add("OpenCLIP-bigG text (bf16)",
        lambda r: CLIPTextModel(CLIPTextConfig(**{**CLIP["clip-bigg"], **bf16}), rngs=r), 1, False)
    add("T5-XXL encoder (bf16)", lambda r: T5Encoder(T5Config(**{**T5["t5-v1_1-xxl"], **bf16}), rngs=r), 1, False)
    cond = (args.fake_updates + 2) * args.batch * (333 * 4096 + 2048) * 4 // args.fsdp  # M + 1 batches + uncond
    rows.append(["round conditionings (fp32)", "1", f"{cond / GiB:.2f}", "0"])
    for k in totals:
        totals[k] += cond
    print(f"# per-device state memory, SD3.5-M DP-DMD on fsdp={args.fsdp}, batch {args.batch} ({host()})\n")
    print(table(["component", "copies", "GiB / device", "replicated MiB / device"], rows))
    print()
    print(table(["data source", "GiB / device (state, no activations)"],
                [["prompts (encoders on device)", f"{totals['encoders'] / GiB:.2f}"],
                 ["embedding cache (no encoders)", f"{totals['cache'] / GiB:.2f}"]]))


if __name__ == "__main__":
    main()
