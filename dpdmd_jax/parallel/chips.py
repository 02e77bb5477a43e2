"""Accelerator facts for a roofline: memory per chip, dense bf16 peak and HBM bandwidth, from the
vendors' public spec sheets (the planner, `run.plan`). A roofline time is a floor: real rounds run
at a fraction of the peak (BENCHMARKS.md: SD3.5-M forward+backward reached 306 of an H200's
~550-600 measured bf16 TFLOP/s).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    memory_bytes: int  # HBM per chip (per GPU)
    bf16_flops: float  # dense bf16 peak, FLOP/s
    hbm_bytes_per_s: float


# device_kind (as JAX reports it) prefix -> chip. TPU HBM is what the compiler reports where we
# checked it (v5p: 95.73 GB, v6e: 31.24 GB, v5e: 15.75 GB); GPUs are the spec sheets' (SXM parts).
CHIPS = {
    # libtpu's v4 topologies (v4:2x2x1: 8 devices) have one device per TensorCore, two per chip, each with
    # half the chip (the compiler reports 15.25 GB); a v4 VM's JAX shows one 32 GiB megacore device a chip.
    "TPU v4": Chip("TPU v4 (one TensorCore)", 16 * GiB, 275e12 / 2, 1.2e12 / 2),
    "TPU v5 lite": Chip("TPU v5e", 16 * GiB, 197e12, 0.819e12),
    "TPU v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.819e12),
    "TPU v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12),
    "TPU v5": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12),  # libtpu names the v5p "TPU v5"
    "TPU v6 lite": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12),
    "TPU v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12),
    "NVIDIA A100-SXM4-40GB": Chip("A100 40GB", 40 * 10**9, 312e12, 1.555e12),
    "NVIDIA A100": Chip("A100 80GB", 80 * 10**9, 312e12, 2.039e12),
    "NVIDIA H100": Chip("H100 80GB", 80 * 10**9, 989e12, 3.35e12),
    "NVIDIA H200": Chip("H200", 141 * 10**9, 989e12, 4.8e12),
}
# Short names a user may give (`--chip=v5p`) for a target whose devices say nothing (cpu:N).
ALIASES = {"v4": "TPU v4", "v5e": "TPU v5e", "v5p": "TPU v5p", "v6e": "TPU v6e", "a100-40gb": "NVIDIA A100-SXM4-40GB",
           "a100": "NVIDIA A100", "h100": "NVIDIA H100", "h200": "NVIDIA H200"}


def chip_for(device_kind: str) -> Chip | None:
    """The chip whose name `device_kind` starts with (the longest match), or None (a CPU)."""
    matches = [k for k in CHIPS if device_kind.startswith(k)]
    return CHIPS[max(matches, key=len)] if matches else None


def chip_named(name: str) -> Chip:
    """`--chip=NAME`: a short name of ALIASES or a device kind of CHIPS."""
    chip = CHIPS.get(ALIASES.get(name.lower(), name))
    if chip is None:
        raise ValueError(f"unknown chip {name!r}; known: {', '.join(ALIASES)}")
    return chip
