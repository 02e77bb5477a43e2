"""A training run from start to summary: preflight, workdir, assembly, restore, the loop, the final
evaluations. `train` is what `python -m dpdmd_jax.main` calls (through `run.baseline` for the DMD
comparison).

Resuming is automatic: a workdir with checkpoints continues from the latest one (onto whatever
mesh this run has). Data and noise are functions of (seed, round), so a resumed run replays
exactly what an uninterrupted run would have seen. On several hosts each process builds only its
rows of every round's batch, and a SIGTERM on any host makes all of them save the same round.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging
from etils import epath

from dpdmd_jax import data as data_lib
from dpdmd_jax import eval as eval_lib
from dpdmd_jax.distill import trainer, writers
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import workdir as workdir_lib
from dpdmd_jax.run.preflight import check_can_start


def train(c: ml_collections.ConfigDict, workdir: str, devices: Sequence[jax.Device] | None = None) -> dict:
    """Runs (or resumes) the distillation described by `c` in `workdir` on `devices` (default: all of
    them); returns the summary (what the config's final evaluators report), or {"preempted_at": round}
    after a pre-emption."""
    workdir = workdir_lib.absolute(workdir)
    check_can_start(c, workdir, devices)
    with workdir_lib.undo_failed_start(workdir):
        return _train(c, workdir, devices)


def _train(c: ml_collections.ConfigDict, workdir: str, devices: Sequence[jax.Device] | None) -> dict:
    workdir_lib.check_workdir_config(workdir, c)  # before the anchor choice, which records K in it
    run = setup_lib.build(c, devices, checked=True, workdir=workdir)  # `train` ran check_can_start
    mngr = workdir_lib.checkpoint_manager(workdir, c)
    latest = mngr.latest_step()
    if latest is not None and latest >= c.num_rounds:
        print(f"{workdir} already finished at round {latest} (num_rounds={c.num_rounds}); nothing to train "
              "(raise --config.num_rounds to train on).", flush=True)
    elif latest is not None:
        print(f"Resuming from checkpoint step {latest} in {mngr.directory}", flush=True)
    if latest is not None:
        logging.info("resuming from %s step %d", mngr.directory, latest)
        state_like, shardings = setup_lib.train_state_shapes(run)
        state = workdir_lib.restore(mngr, latest, state_like, shardings)
    else:
        state, shardings = setup_lib.init_train_state(run)
    start = int(state.step)
    rows = setup_lib.local_rows(run)
    if jax.process_count() > 1:
        print(f"process {jax.process_index()}/{jax.process_count()} builds batch rows {rows.start}:{rows.stop} "
              f"of {c.batch_size}", flush=True)
    round_fn = setup_lib.compile_round(run, shardings)
    evaluators = eval_lib.make_evaluators(c, run, workdir)
    writer = writers.make_writer(workdir, start)
    meta = lambda step: {"step": step, "data_position": step, "seed": c.seed}
    save = lambda st, step, force: workdir_lib.save(mngr, st, meta(step), force)
    batch = functools.partial(data_lib.global_round, run.data, run.mesh, c.batch_size)  # round r -> its batch
    try:
        state, preempted = trainer.train_loop(c, state, start, lambda st, b: round_fn(st, run.frozen, b), batch,
                                              save, evaluators, writer)
    finally:
        mngr.wait_until_finished()
        writer.flush()
    if preempted:
        writer.close()
        return {"preempted_at": int(state.step)}
    summary = trainer.final_evaluations(evaluators, state, int(state.step), writer)
    writer.close()
    mngr.close()
    return summary


def end_of_run_message(c: ml_collections.ConfigDict, workdir: str, summary: dict) -> str:
    """What a finished run wrote, where, and the commands that take its student further."""
    steps = workdir_lib.checkpoint_steps(workdir)
    lines = [f"Done: {steps[-1] if steps else c.num_rounds} rounds in {workdir}",
             f"  checkpoints   {workdir}/checkpoints (latest: {steps[-1] if steps else 'none'})",
             f"  metrics       {workdir}/metrics.jsonl; TensorBoard: tensorboard --logdir {workdir}/tb"]
    for name in ("summary.json", "comparison.md"):
        if (epath.Path(workdir) / name).exists():  # epath: the workdir may be gs:// (run/workdir.py)
            lines.append(f"  {name:<13} {workdir}/{name}")
    samples = f"{workdir}/samples/student"
    lines += ["Next:",
              f"  python -m dpdmd_jax.sample --workdir={workdir} --out={samples}",
              f"  python -m dpdmd_jax.evaluate --samples={samples}",
              f"  python -m dpdmd_jax.export --workdir={workdir} --out={workdir}/export"]
    return "\n".join(lines)
