"""The toy's evaluators: a student sample grid for TensorBoard, and the analytic toy metrics of
the 4-step student next to the T-step teacher (written to workdir/summary.json)."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath

from dpdmd_jax.core import TrainState
from dpdmd_jax.eval.grid import image_grid
from dpdmd_jax.eval.folder import evaluate_folder
from dpdmd_jax.eval.metrics import SAMPLES, Reference
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.multihost import SyncedJit
from dpdmd_jax.sampling.sampler import SamplingRun, sample_with
from dpdmd_jax.toy import metrics as toy_metrics


class ToyGrid:
    """The student's samples for the 6 toy classes x `seeds` fixed noises, one row per class."""

    def __init__(self, run: SamplingRun, workdir: str, seeds: int = 8):
        d = run.distiller
        prompts = [p for p in run.data.prompts() for _ in range(seeds)]  # a class's seeds in a row
        cond = run.data.encode_prompts(prompts)
        eps = jax.random.normal(jax.random.key(1234), (len(prompts), *d.latent_shape))
        key = jax.random.key(1235)  # stochastic (VP) student steps
        self.cols = seeds
        self.distiller, self.frozen = d, run.frozen
        self._sample = SyncedJit(lambda p, b: d.sample(p, b, eps, cond, key), "toy_grid",
                                 out_shardings=mesh_lib.replicated(run.mesh))

    def grid(self, state: TrainState) -> np.ndarray:
        """[rows * H * 4, cols * W * 4, C] in [0, 1]."""
        params = self.distiller.weights("student", state.student, self.frozen)  # with LoRA: base + adapters
        images = self._sample(params, self.frozen.buffers)  # replicated: every process holds all of it
        return image_grid(np.asarray(images.addressable_data(0)), cols=self.cols)

    def run(self, step: int, state: TrainState, writer: Any) -> None:
        writer.write_images(step, {"student_samples": self.grid(state)[None]})


class ToyMetrics:
    """Toy metrics of the student vs the teacher (same prompts, same per-image noise keys), printed
    and written to workdir/summary.json.

    They come out of the user-facing path: `sampling.sampler` (the sample command's) writes the images (PNG) to
    workdir/eval/{teacher, student_<round>} and `eval.folder` (the evaluate command's) reads the metrics back from
    those folders, so `python -m dpdmd_jax.evaluate --samples=workdir/eval/student_<round>` gives
    exactly the numbers in the summary (the student's `fid_t_layout` is against workdir/eval/teacher, as
    evaluate's of both folders). The teacher's row is cached in workdir/teacher_metrics.json."""

    KEYS = ("diversity_layout", "diversity_pixel", "spread_cx", "spread_cy", "spread_size", "adherence", "valid",
            "frechet_layout")

    def __init__(self, run: SamplingRun, workdir: str, seeds_per_prompt: int = 9, repeats: int = 4):
        if jax.process_count() > 1:
            raise ValueError("the toy_metrics evaluator samples on one host: run the toy in one process")
        if seeds_per_prompt < 2:
            raise ValueError(f"seeds_per_prompt={seeds_per_prompt} must be >= 2 (diversity compares seeds)")
        self.sampling_run, self.workdir = run, workdir
        self.seeds = seeds_per_prompt
        self.prompts = list(run.data.prompts()) * repeats  # (6 classes x repeats) prompts
        self.seed = run.config.seed + 777
        n = len(self.prompts) * self.seeds
        self.per_device_batch = -(-n // mesh_lib.batch_divisor(run.mesh))  # one batch: one compile

    def _metrics(self, params: Any, source: str, sampler: str, folder: str, reference: Reference | None = None) -> dict:
        sample_with(self.sampling_run, params, source, folder, self.prompts, sampler=sampler, seeds=self.seeds,
                    seed=self.seed, per_device_batch=self.per_device_batch, progress=False)
        result = evaluate_folder(folder, reference=reference)
        return {k: v for k, v in result.items() if isinstance(v, (int, float)) and v is not None}

    def run(self, step: int, state: TrainState, writer: Any) -> dict:
        c = self.sampling_run.config
        root = epath.Path(self.workdir)  # epath: the workdir may be gs:// (run/workdir.py)
        cache = root / "teacher_metrics.json"
        if cache.exists():
            teacher = json.loads(cache.read_text())
        else:
            teacher = self._metrics(self.sampling_run.frozen.teacher, f"model.source={c.model.source}", "teacher",
                                    str(root / "eval" / "teacher"))
            cache.write_text(json.dumps(teacher, indent=2))
        rounds = int(state.step)
        params = self.sampling_run.distiller.weights("student", state.student, self.sampling_run.frozen)
        teacher_dir = root / "eval" / "teacher"  # absent in a DMD baseline's workdir (it reuses the cached row)
        reference = Reference(str(teacher_dir), SAMPLES, teacher=True) if (teacher_dir / "run.json").exists() else None
        student = self._metrics(params, f"{self.workdir} round {rounds}", "student",
                                str(root / "eval" / f"student_{rounds}"), reference)
        summary = {
            "rounds": rounds,
            "teacher": {"cfg_scale": c.teacher.cfg_scale, **teacher},
            "student": student,
            "spread_ratio": toy_metrics.spread_ratio(student, teacher),
            "skipped_updates": int(state.skipped),
        }
        (root / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\nToy metrics after {summary['rounds']} rounds (R={self.seeds} seeds per prompt):")
        print(f"{'':10s}" + "".join(f"{k:>17s}" for k in ["nfe", *self.KEYS]))
        for name in ("teacher", "student"):
            row = summary[name]
            print(f"{name:10s}" + "".join(f"{row[k]:17.4f}" for k in ["nfe", *self.KEYS]))
        print(f"summary written to {root / 'summary.json'}")
        return summary
