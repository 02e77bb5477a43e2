"""Multi-process runs: the CLIs' flags that start them; and compile, then wait for every process,
then run.

XLA compiles lazily at a jitted function's first call, and hosts compile at different speeds (a
compile-cache hit on one host, a busy CPU on another). The first run of a program with
cross-process collectives then waits on the slow host inside the collective library, whose
set-up timeout is short and not settable (CPU gloo: 30 s, then `DEADLINE_EXCEEDED`). So programs
that run on several processes are compiled ahead of time and followed by a barrier of the
coordination service, whose timeout is ours; on one process the barrier is a no-op."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from dpdmd_jax.cli import UsageError

# Compiling a full-size SD3.5-L round on a cold cache takes minutes; a host that has not finished
# in an hour is stuck, not slow.
COMPILE_BARRIER_TIMEOUT_S = 3600

_barrier_ids = itertools.count()  # every process compiles the same programs in the same order


def barrier(name: str, timeout_s: int = COMPILE_BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process reaches the barrier `name` (no-op on one process)."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost  # here: the CLIs import this module (for its flags) at start-up

        multihost.get_barrier_sync_fn()(key=f"dpdmd_{name}_{next(_barrier_ids)}", timeout_ms=timeout_s * 1000)


# Launchers that start one process per host say how many there are; jax.distributed.initialize()
# without arguments then finds the coordinator in their environment.
_PROCESS_COUNT_ENV = ("JAX_PROCESS_COUNT", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_COORDINATOR_ENV = ("COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")  # MEGASCALE_*: TPU multislice (GKE)


def on_tpu_vm() -> bool:
    """A Cloud TPU VM or GKE TPU node: JAX found TPU chips and libtpu when it was imported (its own
    detection; no public API says so). Every worker of a slice runs the same command, and
    jax.distributed.initialize() finds the others in the TPU metadata (one host: a 1-process job)."""
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def launched_by_cluster() -> bool:
    """Whether a launcher started this process as one of several (SLURM, Open MPI, a TPU slice,
    a multislice coordinator)."""
    return (any(int(os.environ.get(v, "1")) > 1 for v in _PROCESS_COUNT_ENV)
            or any(v in os.environ for v in _COORDINATOR_ENV) or on_tpu_vm())


def define_flags() -> None:
    """Defines the CLIs' multi-process flags (--coordinator_address, --num_processes, --process_id)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0's coordinator "
                        "(with --num_processes and --process_id; TPU pods, SLURM and MPI are detected without them).")
    flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0..num_processes-1.")


class MultiprocessFlagError(UsageError):
    """Inconsistent multi-process flags; the message says what to fix."""


def flag_problems(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> list[str]:
    """One sentence per inconsistency of --coordinator_address / --num_processes / --process_id."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if not any(given):
        return []
    if not all(given):
        return ["--coordinator_address, --num_processes and --process_id go together: give all three "
                "(or none, on one process or under a launcher that sets them)."]
    p = []
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        p.append(f"--coordinator_address={coordinator_address!r} must be HOST:PORT (process 0's host), e.g. "
                 "localhost:12345.")
    if num_processes < 1:
        p.append(f"--num_processes={num_processes} must be >= 1.")
    elif not 0 <= process_id < num_processes:
        p.append(f"--process_id={process_id} must lie in 0..{num_processes - 1} (--num_processes={num_processes}).")
    return p


@contextlib.contextmanager
def waiting_notice(message: str, every_s: float = 10.0):
    """Prints `message` (with the time waited) every `every_s` seconds until the block ends: a
    process waiting for its peers says so instead of hanging silently."""
    done = threading.Event()
    start = time.time()

    def tell():
        while not done.wait(every_s):
            print(f"{message}: still waiting after {time.time() - start:.0f} s", file=sys.stderr, flush=True)

    print(f"{message} ...", file=sys.stderr, flush=True)

    thread = threading.Thread(target=tell, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def initialize_from_flags(flag_values: Any, notice_every_s: float = 10.0) -> None:
    """Joins this process to a multi-process run, before any JAX computation: from the flags of
    `define_flags`, else from the environment of a pod / cluster launcher; nothing on one process.
    While it waits for the other processes it says so every `notice_every_s` seconds."""
    address, n, i = flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
    problems = flag_problems(address, n, i)
    if problems:
        raise MultiprocessFlagError(" ".join(problems))
    if address is not None:  # explicit multi-process launch (e.g. several on one machine)
        with waiting_notice(f"process {i} of {n}: waiting for all {n} processes to join the coordinator at {address}",
                            notice_every_s):
            jax.distributed.initialize(address, n, i)
    elif launched_by_cluster():
        with waiting_notice("waiting for the other processes of this launch to join the coordinator", notice_every_s):
            jax.distributed.initialize()  # jax reads the launcher's environment (SLURM, Open MPI, TPU metadata)


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


class Preemption:
    """SIGTERM -> stop after the current step (a training round, a sampling batch), on every process
    after the same one, so none is left waiting in a collective or saves a different step.

    One process: a handler sets a flag (the default action would kill the process mid-step, with an
    exit status no scheduler reads as "pre-empted"). Several: JAX's coordination service (installed
    by `jax.distributed.initialize`) catches SIGTERM on any process, and
    `reached_preemption_sync_point` turns it into a step that every process stops after.
    `enabled=False`: never stops (a sampler run inside the trainer, whose own Preemption decides)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.multi = jax.process_count() > 1
        self.requested = False
        self._previous = None
        if enabled and not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        """Called after every step, with its index (the same on every process)."""
        if self.enabled and self.multi and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
