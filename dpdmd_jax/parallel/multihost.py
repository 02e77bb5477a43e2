"""Compile, then wait for every process, then run.

XLA compiles lazily at a jitted function's first call, and hosts compile at different speeds (a
compile-cache hit on one host, a busy CPU on another). The first run of a program with
cross-process collectives then waits on the slow host inside the collective library, whose
set-up timeout is short and not settable (CPU gloo: 30 s, then `DEADLINE_EXCEEDED`). So programs
that run on several processes are compiled ahead of time and followed by a barrier of the
coordination service, whose timeout is ours; on one process the barrier is a no-op."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
from orbax.checkpoint import multihost

# Compiling a full-size SD3.5-L round on a cold cache takes minutes; a host that has not finished
# in an hour is stuck, not slow.
COMPILE_BARRIER_TIMEOUT_S = 3600

_barrier_ids = itertools.count()  # every process compiles the same programs in the same order


def barrier(name: str, timeout_s: int = COMPILE_BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process reaches the barrier `name` (no-op on one process)."""
    if jax.process_count() > 1:
        multihost.get_barrier_sync_fn()(key=f"dpdmd_{name}_{next(_barrier_ids)}", timeout_ms=timeout_s * 1000)


def _signature(args: tuple) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x)), getattr(x, "sharding", None))
                       for x in leaves)


class SyncedJit:
    """`jax.jit(fn, **kw)` whose first call at each input signature compiles ahead of time and
    then waits at a barrier for the other processes' compiles."""

    def __init__(self, fn: Callable, name: str, **jit_kwargs: Any):
        self.jitted = jax.jit(fn, **jit_kwargs)
        self.name = name
        self._compiled: dict[tuple, Any] = {}

    def compile(self, *args: Any) -> Any:
        """Compiles for `args` (arrays or `jax.ShapeDtypeStruct`s) and syncs the processes."""
        key = _signature(args)
        if key not in self._compiled:
            self._compiled[key] = self.jitted.lower(*args).compile()
            barrier(f"compiled_{self.name}")
        return self._compiled[key]

    def lower(self, *args: Any) -> Any:
        return self.jitted.lower(*args)

    def __call__(self, *args: Any) -> Any:
        return self.compile(*args)(*args)

