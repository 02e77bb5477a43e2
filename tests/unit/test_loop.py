"""The round loop (`distill/trainer.py`) on stand-ins for the round, the batches, the checkpoints and
the evaluators: what it calls when, the non-finite stop (read only at log steps), pre-emption."""

import dataclasses
import os
import signal

import pytest

from dpdmd_jax.config import base_config, override
from dpdmd_jax.core import TrainingError
from dpdmd_jax.distill import trainer


@dataclasses.dataclass
class FakeState:
    """The two counters the loop reads of a TrainState, as the device would hold them."""

    step: int = 0
    nonfinite: int = 0
    skipped: int = 0
    reads: list = dataclasses.field(default_factory=list)

    def __getattribute__(self, name):
        if name in ("nonfinite", "skipped"):
            object.__getattribute__(self, "reads").append((object.__getattribute__(self, "step"), name))
        return object.__getattribute__(self, name)


class Writer:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars[step] = scalars

    def write_images(self, step, images):
        pass

    def flush(self):
        pass


class Recorder:
    def __init__(self):
        self.steps = []

    def run(self, step, state, writer):
        self.steps.append(step)
        return {"last": step}


def config(**values):
    return override(base_config(), {"num_rounds": 6, "log_every": 3, "checkpoint_every": 4, "max_nonfinite": 2,
                                    **values})


def run_loop(c, nonfinite_from=None, start=0, sigterm_at=None):
    state = FakeState(step=start)
    saved, batches = [], []

    def round_fn(st, batch):
        st.step += 1
        if sigterm_at is not None and st.step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if nonfinite_from is not None and st.step >= nonfinite_from:
            st.nonfinite += 1
        return st, {"loss": 1.0, "loss_dmd": 0.5, "loss_div": 0.1, "loss_fake": 0.2}

    every, once, hooked = Recorder(), Recorder(), []
    state, preempted = trainer.train_loop(c, state, start, round_fn, lambda r: batches.append(r) or r,
                                          lambda st, step, force: saved.append((step, force)),
                                          {"every": (2, every), "once": (0, once)}, Writer(), [hooked.append])
    return state, preempted, saved, batches, every, once, hooked


def test_rounds_batches_checkpoints_and_evaluators_follow_the_config():
    state, preempted, saved, batches, every, once, hooked = run_loop(config(), start=1)
    assert not preempted and state.step == 6
    assert batches == [1, 2, 3, 4, 5]  # round r's batch, from the resumed round on
    assert hooked == [2, 3, 4, 5, 6]  # the periodic actions (progress reports) after every round
    assert saved == [(4, False), (6, False)]  # checkpoint_every and the last round
    assert every.steps == [2, 4, 6] and once.steps == []  # every = 0 runs only in final_evaluations
    assert trainer.final_evaluations({"every": (2, every), "once": (0, once)}, state, 6, Writer()) == {"last": 6}


def test_the_device_is_read_only_at_log_steps():
    state, *_ = run_loop(config())
    assert {step for step, _ in state.reads} == {3, 6}  # log_every = 3: no host sync in between


def test_nonfinite_rounds_stop_the_run_at_the_next_log_step():
    with pytest.raises(TrainingError, match=r"2 consecutive rounds had non-finite .* \(up to round 3\)"):
        run_loop(config(), nonfinite_from=2)
    # one non-finite round at a log step is below max_nonfinite = 2: the run goes on
    state, preempted, *_ = run_loop(config(), nonfinite_from=6)
    assert state.step == 6 and not preempted


def test_sigterm_saves_the_current_round_and_stops():
    state, preempted, saved, batches, *_ = run_loop(config(), sigterm_at=2)
    assert preempted and state.step == 2 and batches == [0, 1]
    assert saved == [(2, True)]
