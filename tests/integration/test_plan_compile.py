"""The planner's compiles of whole rounds (`dpdmd_jax.run.plan`): the fit verdict and `--search` walking
its ladder (a tiny run planned five times on the 8 virtual CPU devices), and the FLOPs per round
against XLA's count of a round compiled with every loop unrolled. (Targets, the arguments of one
compile, bad input and preset sources: tests/unit/test_plan.py; the TPU compile through libtpu:
test_plan_cli.py.)"""

from __future__ import annotations

import jax
import pytest

from configs import toy
from dpdmd_jax.config import override
from dpdmd_jax.run import plan as plan_lib
from dpdmd_jax.run import setup
from tests.unit.test_plan import CPU8, tiny


def test_a_budget_too_small_does_not_fit_and_search_finds_the_first_setting_that_does():
    c = tiny(batch_size=32)
    full = plan_lib.plan(c, CPU8)
    assert full["fits"] is None and full["devices"] == 8 and full["per_device_batch"] == 4
    peak = full["memory_per_device"]["peak"]
    m = full["memory_per_device"]
    assert peak >= m["round program"]["temporaries"] + sum(m["round arguments"].values())

    squeezed = plan_lib.plan(c, CPU8, memory_bytes=peak - 1)
    assert squeezed["fits"] is False and squeezed["margin_bytes"] == -1

    # A budget between the plan at a quarter of the batch and the plan at half: the search must walk
    # past the remat steps (no effect on this model), then halve the batch twice, and stop there.
    quarter = plan_lib.plan(tiny(batch_size=8), CPU8)["memory_per_device"]["peak"]
    half = plan_lib.plan(tiny(batch_size=16), CPU8)["memory_per_device"]["peak"]
    assert quarter < half < peak
    heard = []
    result = plan_lib.search(c, CPU8, memory_bytes=(quarter + half) // 2, log=heard.append)
    assert c.batch_size == 32 and c.model.remat_policy == "none"  # the caller's config is left as it was
    best = result["best"]
    assert best["fits"] is True and best["batch_size"] == 8 and best["setting"]["model.remat_policy"] == "full"
    assert [p["fits"] for p in result["tried"]] == [False] * (len(result["tried"]) - 1) + [True]
    assert result["tried"][-2]["batch_size"] == 16
    assert "the first that fits" in plan_lib.format_search(result)
    # Each step's verdict is reported as soon as it is known (a full-size step takes minutes to an hour).
    verdicts = [line for line in heard if line.startswith("search: ") and ": fits: " in line]
    assert len(verdicts) == len(result["tried"])
    assert all(": fits: NO (margin -" in line for line in verdicts[:-1]) and ": fits: YES (margin " in verdicts[-1]


@pytest.mark.parametrize("changes", [
    {},  # DP-DMD, velocity target
    {"distill.target": "denoise", "dmd.real_cfg_scale": 1.0},  # a guided call more at the anchor; unguided real score
    {"distill.lambda_div": 0.0, "distill.fake_updates_per_student": 3},  # plain DMD: no anchor
])
def test_round_flops_are_the_calls_times_one_call_as_an_unrolled_compile_counts(changes):
    """Our count (model calls per round x XLA's FLOPs of one call) against XLA's count of the whole
    round with every loop unrolled (toy MMDiT, 1 device, lowered only). What the count leaves out
    (optimizer, losses, noise) is well under 1% here."""
    c = override(toy.get_config(), {"distill.anchor_k": 2, "teacher.steps": 4, "distill.fake_updates_per_student": 2,
                                    "model.scan_layers": False, **changes})
    run = plan_lib.abstract_run(c, jax.devices()[:1])
    calls = plan_lib.model_calls(c, 2, len(run.distiller.student_grid) - 1)
    per_call = plan_lib.call_flops(run)
    ours = sum(calls[k] * per_call[k] for k in calls)
    with plan_lib.unrolled_loops():
        lowered = jax.jit(lambda s, f, b: run.distiller.train_round(s, f, b)).lower(
            setup.abstract_train_state(run), run.frozen, setup.batch_spec(run))
    theirs = lowered.cost_analysis()["flops"]
    assert theirs * 0.99 < ours <= theirs
    # Full remat runs each forward once more inside the backward; the run's own config is not touched.
    full = plan_lib.call_flops(run, "full")
    assert full["forward"] == per_call["forward"] and full["forward_backward"] > 1.25 * per_call["forward_backward"]
    assert run.config.model.remat_policy == "none"
