"""The round loop: one jitted round after another, metrics at log steps, evaluators, checkpoints and
pre-emption. It knows no model family, no data source and no checkpoint format: the run
(`dpdmd_jax.run`) hands it the compiled round, the batch of each round, a `save` function, the
evaluators and its periodic actions.

The device is read back only at log steps (the scalars, and the count of consecutive non-finite
generator updates, which `optax.apply_if_finite` skips), so rounds in between queue up without a
host sync, as big_vision and MaxText loops do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from dpdmd_jax.core import Evaluator, RoundBatch, TrainingError, TrainState
from dpdmd_jax.parallel import multihost

Evaluators = Mapping[str, tuple[int, Evaluator]]  # name -> (every; 0 = once after training, evaluator)


def check_finite(c: ml_collections.ConfigDict, state: TrainState, step: int) -> None:
    """Stops the run once `max_nonfinite` consecutive generator updates were skipped (read at log steps)."""
    n = int(state.nonfinite)
    if n >= c.max_nonfinite:
        raise TrainingError(
            f"{n} consecutive rounds had non-finite generator gradients (up to round {step}); their updates were "
            "skipped and the last good checkpoint is intact. Lower optim.student.lr / optim.fake.lr or check the "
            "teacher weights, then resume."
        )


def log_scalars(c: ml_collections.ConfigDict, state: TrainState, metrics: dict, seconds: float) -> dict[str, float]:
    """The scalars of a log step (one device-to-host read)."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    scalars["rounds_per_sec"] = c.log_every / max(seconds, 1e-9)
    scalars["lr_student"], scalars["lr_fake"] = c.optim.student.lr, c.optim.fake.lr
    scalars["skipped_updates"] = float(state.skipped)
    return scalars


def train_loop(c: ml_collections.ConfigDict, state: TrainState, start: int,
               round_fn: Callable[[TrainState, RoundBatch], tuple[TrainState, dict]],
               batch: Callable[[int], RoundBatch], save: Callable[[TrainState, int, bool], None],
               evaluators: Evaluators, writer: Any,
               hooks: Sequence[Callable[[int], Any]] = ()) -> tuple[TrainState, bool]:
    """Rounds `start`..`c.num_rounds`; returns (state, pre-empted). `save(state, step, force)` writes a
    checkpoint (at `checkpoint_every`, the last round, and on SIGTERM, forced). `hooks` are called with
    each finished round's step (periodic actions such as a profiler's; progress and the time left are
    the tqdm bar's, rounds per second a logged scalar)."""
    preempt = multihost.Preemption()
    bar = tqdm(total=c.num_rounds, initial=start, desc="rounds", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    last_log = time.time()
    try:
        for r in range(start, c.num_rounds):
            state, metrics = round_fn(state, batch(r))
            step = r + 1
            for hook in hooks:
                hook(step)
            last = step == c.num_rounds
            if step % c.log_every == 0 or last:
                check_finite(c, state, step)
                now = time.time()
                scalars = log_scalars(c, state, metrics, now - last_log)
                last_log = now
                writer.write_scalars(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.4g}", dmd=f"{scalars['loss_dmd']:.3g}",
                                div=f"{scalars['loss_div']:.3g}", fake=f"{scalars.get('loss_fake', 0):.3g}")
            for every, evaluator in evaluators.values():
                if every and (step % every == 0 or last):
                    evaluator.run(step, state, writer)
            if step % c.checkpoint_every == 0 or last:
                save(state, step, False)
            bar.update(1)
            if preempt.reached(step):
                print(f"\nSIGTERM received: saving round {step} and exiting.", flush=True)
                save(state, step, True)
                break
    finally:
        bar.close()
        preempt.restore()
    return state, preempt.requested


def final_evaluations(evaluators: Evaluators, state: TrainState, step: int, writer: Any) -> dict:
    """The summary: what the `every = 0` evaluators report once training has finished."""
    summary = {}
    for every, evaluator in evaluators.values():
        if not every:
            summary.update(evaluator.run(step, state, writer) or {})
    return summary
