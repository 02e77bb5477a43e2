"""Small helpers the benchmark scripts share (standard library only, so importing this loads nothing
heavy: `load_full_size.py` measures its processes' memory)."""

from __future__ import annotations

import os

from dpdmd_jax.tables import markdown_table  # standard library only


def table(header: list[str], rows: list[list[str]]) -> str:
    """A padded Markdown table."""
    return markdown_table(header, rows)


def host() -> str:
    """'nproc N, CPU <model>, RAM X GiB' of this machine (Linux /proc)."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2**20
    return f"nproc {os.cpu_count()}, CPU {cpu}, RAM {mem:.1f} GiB"


def flops_of(stage) -> float:
    """XLA cost-analysis FLOPs of a jax Lowered or Compiled stage."""
    ca = stage.cost_analysis()
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
