"""distill.anchor_k="auto" in a run: the trainer records the K it chose in the workdir (anchor_auto.json,
config.json) and reuses it on resume without another teacher pass. (The curve and the rule:
tests/unit/test_anchor.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import toy as toy_config
from dpdmd_jax.config import override
from dpdmd_jax.distill import anchor
from dpdmd_jax.run import train as run_train
from dpdmd_jax.run import setup as setup_lib


def _rounds_with_k(used: list):
    """A stand-in for `setup_lib.compile_round` that records the K the round would be built with and
    only counts rounds (the round itself is tested elsewhere; this test needs no round compile)."""
    def compile_round(setup, shardings):
        used.append(setup.distiller.anchor_k)
        metrics = {k: 0.0 for k in ("loss", "loss_dmd", "loss_div", "loss_fake")}
        return lambda state, frozen, batch: (state.replace(step=state.step + 1), metrics)

    return compile_round


def test_trainer_records_the_choice_and_reuses_it_on_resume(tmp_path, monkeypatch, capsys):
    c = override(toy_config.get_config("smoke"), {"distill.anchor_k": "auto", "num_rounds": 1, "evals": {}})
    used = []  # the K each run's round was built with
    monkeypatch.setattr(setup_lib, "compile_round", _rounds_with_k(used))
    run_train.train(c, str(tmp_path))
    curve = json.loads((tmp_path / "anchor_auto.json").read_text())
    k = curve["chosen_k"]
    assert len(curve["carried"]) == c.teacher.steps and curve["carried"][-1] == pytest.approx(1.0, abs=1e-5)
    assert k == anchor.choose_k(np.array(curve["carried"]), c.distill.auto_anchor.fraction)
    assert used == [k]
    assert json.loads((tmp_path / "config.json").read_text())["distill"]["auto_anchor"]["chosen_k"] == k
    assert f"distill.anchor_k=auto: K={k}, the first K" in capsys.readouterr().out

    def no_second_pass(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the recorded K")

    monkeypatch.setattr(anchor, "target_curve", no_second_pass)
    run_train.train(override(c, {"num_rounds": 2}), str(tmp_path))
    assert used == [k, k]
    assert json.loads((tmp_path / "config.json").read_text())["distill"]["auto_anchor"]["chosen_k"] == k
    out = capsys.readouterr().out
    assert f"K={k}, as chosen and recorded" in out and "Resuming from checkpoint step 1" in out
