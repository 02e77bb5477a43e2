"""The toy default's comparison: after the DP-DMD run, plain DMD under the same settings, and the
teacher, DMD and DP-DMD rows side by side (`config.compare_with_dmd`; `python -m dpdmd_jax.main`)."""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from etils import epath

from dpdmd_jax.distill import anchor
from dpdmd_jax.run.train import train
from dpdmd_jax.run.workdir import absolute
from dpdmd_jax.tables import markdown_table

BASELINE_DIR = "dmd_baseline"


def train_with_baseline(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """`train`; then, with `compare_with_dmd` (the toy default), plain DMD (lambda_div = 0, every
    other setting the same) in workdir/dmd_baseline, and the teacher, DMD and DP-DMD rows of their
    summaries side by side (printed, workdir/comparison.md, summary["dmd_baseline"]). The baseline is
    an ordinary run: it resumes, and a finished one is only read back. It shares the teacher's
    cached metrics, which depend on the seed and the teacher alone."""
    summary = train(c, workdir)
    if not c.get("compare_with_dmd") or c.distill.lambda_div == 0 or "preempted_at" in summary:
        return summary
    workdir = absolute(workdir)
    root = epath.Path(workdir)  # epath: the workdir may be gs:// (run/workdir.py)
    base_dir = root / BASELINE_DIR
    base = c.copy_and_resolve_references()
    base.distill.lambda_div, base.compare_with_dmd = 0.0, False
    base_dir.mkdir(parents=True, exist_ok=True)
    teacher_cache = root / "teacher_metrics.json"
    if teacher_cache.exists() and jax.process_index() == 0:
        teacher_cache.copy(base_dir / "teacher_metrics.json", overwrite=True)
    print(f"\nPlain DMD under the same settings (the baseline), in {base_dir}:", flush=True)
    baseline = train(base, str(base_dir))
    if "preempted_at" in baseline:  # the job is not finished: the caller exits "pre-empted"
        return {**summary, "preempted_at": baseline["preempted_at"], "preempted_in": str(base_dir)}
    if "student" not in summary or "student" not in baseline:
        return summary
    k = c.distill.anchor_k if c.distill.anchor_k != "auto" else f"{anchor.recorded_k(workdir)}, auto"
    # The baseline terms (issue 22's regression, GAN) stay on in both: name them in both rows.
    terms = "".join(f" + {name}" for name, on in (("regression", c.regression.weight), ("GAN", c.gan.weight)) if on)
    table = comparison_table(summary["teacher"], baseline["student"], summary["student"], anchor_k=k,
                             rounds=summary.get("rounds"), regularizers=terms)
    print("\n" + table)
    if jax.process_index() == 0:
        (root / "comparison.md").write_text(table + "\n")
        summary["dmd_baseline"] = baseline["student"]
        (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


COMPARED = ("nfe", "diversity_layout", "diversity_pixel", "spread_cx", "spread_cy", "spread_size", "adherence",
            "valid", "frechet_layout")


def comparison_table(teacher: dict, dmd: dict, dp_dmd: dict, anchor_k: Any, rounds: int | None,
                     regularizers: str = "") -> str:
    """Markdown: the teacher, the DMD baseline and the DP-DMD student, on the metrics all three have;
    `regularizers` (" + GAN", ...) names the baseline terms both students train with."""
    keys = [k for k in COMPARED if all(k in row for row in (teacher, dmd, dp_dmd))]
    named = (("teacher", teacher), (f"DMD (lambda_div = 0){regularizers}", dmd),
             (f"DP-DMD (K = {anchor_k}){regularizers}", dp_dmd))
    rows = [[name, *(f"{row[k]:.0f}" if k == "nfe" else f"{row[k]:.3f}" for k in keys)] for name, row in named]
    head = f"Teacher vs students after {rounds} rounds, same settings and evaluation noise (frechet: lower is better):"
    return head + "\n\n" + markdown_table(["", *keys], rows)

