"""The trainer's toy metrics are `dpdmd_jax.evaluate`'s numbers: a DP-DMD run with its DMD baseline
(`compare_with_dmd`), evaluated during training, then its sample folders evaluated again."""

from __future__ import annotations

import json

from dpdmd_jax.eval import folder as eval_folder
from tests.unit.test_evaluate import _config


def test_the_trainers_toy_metrics_are_evaluates_numbers(tmp_path):
    """The toy_metrics evaluator samples through `dpdmd_jax.sample` and reads its numbers back with
    `dpdmd_jax.evaluate`: evaluating its folders again gives the summary exactly. The main job's
    DMD baseline (`compare_with_dmd`) is a plain-DMD run in workdir/dmd_baseline whose student row
    sits beside the DP-DMD student's in comparison.md, against the teacher row measured once."""
    from dpdmd_jax.run import baseline as baseline_lib

    toy = dict(type="toy_metrics", every=0, seeds_per_prompt=3, repeats=1)
    c = _config(num_rounds=1, evals={"toy": toy}, compare_with_dmd=True)
    summary = baseline_lib.train_with_baseline(c, str(tmp_path))
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    base_dir = tmp_path / baseline_lib.BASELINE_DIR
    with open(base_dir / "summary.json") as f:
        baseline = json.load(f)
    with open(base_dir / "config.json") as f:
        assert json.load(f)["distill"]["lambda_div"] == 0.0
    assert summary["dmd_baseline"] == baseline["student"] != summary["student"]
    assert baseline["teacher"] == summary["teacher"] and not (base_dir / "eval" / "teacher").exists()
    table = (tmp_path / "comparison.md").read_text().splitlines()
    for name, row in (("| teacher", summary["teacher"]), ("| DMD", baseline["student"]),
                      ("| DP-DMD (K = 2)", summary["student"])):
        line = next(x for x in table if x.startswith(name))
        assert f"{row['diversity_layout']:.3f}" in line and f"{row['frechet_layout']:.3f}" in line
    folders = [str(tmp_path / "eval" / "teacher"), str(tmp_path / "eval" / "student_1")]
    again = eval_folder.evaluate(folders, ["teacher", "student"])
    for who in ("teacher", "student"):
        for k in ("diversity_layout", "diversity_pixel", "spread_size", "adherence", "valid", "frechet_layout"):
            assert summary[who][k] == again[who][k], (who, k)
    assert summary["student"]["nfe"] == 4 and summary["teacher"]["nfe"] == 8 and summary["student"]["images"] == 18
