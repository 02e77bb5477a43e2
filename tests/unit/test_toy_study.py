"""The toy study's bookkeeping (benchmarks/toy_diversity.py, benchmarks/toy_shift_sweep.py): which finished
runs count as the same experiment, and the paired K-sweep numbers. No training, no compile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import toy_diversity, toy_shift_sweep
from configs import toy as toy_config
from dpdmd_jax.config import override


def test_setting_tells_grids_apart_and_ignores_what_a_run_does_not_use():
    setting = toy_diversity.setting_of
    default = lambda **kw: override(toy_config.get_config(), {k.replace("__", "."): v for k, v in kw.items()})
    shift3 = toy_config.get_config("shift3")
    assert setting(default()) != setting(shift3)  # the grids differ
    assert setting(default()) == setting(toy_config.get_config("shift0.375"))
    # plain DMD has no anchor: its K does not make another experiment
    assert setting(default(distill__lambda_div=0.0)) == setting(default(distill__lambda_div=0.0, distill__anchor_k=10))
    assert setting(default(distill__anchor_k=5)) != setting(default())
    # the UNet's VP grids ignore the flow shift
    unet = toy_config.get_config("unet")
    assert setting(unet) == setting(toy_config.get_config("shift3,unet"))
    # a run's config.json (a plain dict) reads the same as the ConfigDict it came from
    assert setting(json.loads(shift3.to_json_best_effort())) == setting(shift3)


def test_finished_run_of_another_setting_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_diversity, "ARGS", None)  # arms start from the toy default (shift 0.375)
    shift3 = toy_config.get_config("shift3")
    shift3.seed = 0
    workdir = toy_diversity.workdir_of(str(tmp_path), "DMD", 0)
    (tmp_path / "DMD" / "seed0").mkdir(parents=True)
    with open(f"{workdir}/summary.json", "w") as f:
        ran = toy_diversity.setting_of(override(shift3, {"distill.lambda_div": 0.0}))
        json.dump({"rounds": 200, "setting": ran}, f)
    with pytest.raises(SystemExit, match=r"holds a finished run of another setting \(teacher_grid"):
        toy_diversity.run_one("DMD", {"distill.lambda_div": 0.0}, 0, 200, str(tmp_path), None)


def _results(per_seed_layout: dict[str, list[float]], auto_k: int) -> dict:
    """A results_main_auto.json with only the layout diversity filled in."""
    out = {}
    for name, values in per_seed_layout.items():
        row = {"diversity_layout": (float(np.mean(values)), float(np.std(values))),
               "per_seed": {str(s): {"diversity_layout": v} for s, v in enumerate(values)}}
        if name.endswith("auto"):
            row["anchor_k"] = [auto_k] * len(values)
        out[name] = row
    return out


def test_shift_sweep_pairs_each_arm_with_dmd_by_seed():
    results = _results({"teacher": [0.3, 0.3, 0.3], "DMD": [0.20, 0.10, 0.25], "DP-DMD K=30": [0.21, 0.12, 0.24],
                        "DP-DMD K=5": [0.19, 0.11, 0.20], "DP-DMD K=auto": [0.22, 0.13, 0.26]}, auto_k=7)
    s = toy_shift_sweep.sweep(0.375, results)
    assert [(a["arm"], a["k"]) for a in s["arms"]] == [("DP-DMD K=5", 5), ("DP-DMD K=auto", 7), ("DP-DMD K=30", 30)]
    assert s["arms"][1]["ks"] == [7, 7, 7]
    k5, auto, k30 = s["arms"]
    np.testing.assert_allclose(k5["gain"], [-0.01, 0.01, -0.05], atol=1e-12)
    assert k5["wins"] == 1 and auto["wins"] == 3 and k30["wins"] == 2
    assert k5["gain_mean"] == pytest.approx(-0.05 / 3)
    assert k30["t_k"] == 0.0 and k5["t_k"] == pytest.approx(0.643, abs=1e-3)  # step 5 of 30 at shift 0.375
    assert "| 0.375 | DP-DMD K=7 (auto) | 7  |" in toy_shift_sweep.markdown([s])
    # seeds whose auto choice differs: each seed's gain sits at its own anchor, the arm at their mean
    mixed = toy_shift_sweep.sweep(0.375, {**results, "DP-DMD K=auto": {**results["DP-DMD K=auto"],
                                                                        "anchor_k": [7, 8, 7]}})
    auto = mixed["arms"][1]
    assert auto["ks"] == [7, 8, 7] and auto["k"] == pytest.approx(22 / 3)
    assert auto["t_ks"][1] < auto["t_ks"][0] and auto["t_k"] == pytest.approx(np.mean(auto["t_ks"]))
    assert "| DP-DMD K=7/8/7 (auto) |" in toy_shift_sweep.markdown([mixed])
