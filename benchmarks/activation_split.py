"""What one device computes in a sharded round, with the models' activations split over the batch
(`parallel.mesh.rows_split`, the default) and without (XLA's propagation alone, which follows the
FSDP-sharded parameters).

    python -m benchmarks.activation_split [--variant smoke] [--devices 8]

For each setting the round is compiled (not run) on one device and on `--devices` virtual CPU
devices (`mesh.fsdp` over all of them); the table gives the compiled program's FLOPs per device
(`cost_analysis()`: a loop's body counts once, the same in every column), their share of the
one-device program's, and its temporaries per device (`memory_analysis()`). The ideal share is
1 / devices. A CPU compile says what XLA partitioned, not how fast a chip runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import os

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--variant", default="smoke", help="a variant of configs/toy.py")
parser.add_argument("--devices", type=int, default=8)
args = parser.parse_args()

os.environ.setdefault("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from benchmarks.common import flops_of, host, table  # noqa: E402
from configs import toy as toy_config  # noqa: E402
from dpdmd_jax.config import override  # noqa: E402
from dpdmd_jax.parallel import mesh as mesh_lib  # noqa: E402
from dpdmd_jax.run import setup as setup_lib  # noqa: E402


def compiled_round(c, devices):
    run = setup_lib.build(c, devices=devices)
    _, shardings = setup_lib.train_state_shapes(run)
    batch = setup_lib.round_batch(run, 0)
    return setup_lib.compile_round(run, shardings).compile(setup_lib.abstract_train_state(run), run.frozen, batch)


def main() -> None:
    c = toy_config.get_config(args.variant)
    one = compiled_round(override(c.copy_and_resolve_references(), {"mesh.fsdp": 1}), jax.devices()[:1])
    base = flops_of(one)
    rows = [("1 device", base, one.memory_analysis().temp_size_in_bytes)]
    split_rows = mesh_lib.split_rows
    for name, split in (("split (default)", split_rows), ("not split", lambda mesh, axes: contextlib.nullcontext())):
        mesh_lib.split_rows = split
        try:
            compiled = compiled_round(c.copy_and_resolve_references(), jax.devices())
        finally:
            mesh_lib.split_rows = split_rows
        rows.append((f"{args.devices} devices, {name}", flops_of(compiled),
                     compiled.memory_analysis().temp_size_in_bytes))
    print(f"\nconfigs/toy.py:{args.variant}, batch {c.batch_size}, on {host()}; ideal share 1/{args.devices} = "
          f"{1 / args.devices:.3f}\n")
    print(table(["program", "FLOPs / device", "share of 1 device", "temporaries / device (MiB)"],
                [[name, f"{flops:.3e}", f"{flops / base:.3f}", f"{temp / 2**20:.2f}"] for name, flops, temp in rows]))


if __name__ == "__main__":
    main()
