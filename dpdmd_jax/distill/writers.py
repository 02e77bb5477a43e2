"""The run's metric writers: console + TensorBoard (CLU) and workdir/metrics.jsonl, from one
`write_scalars`. Apart from the trainer because `clu.metric_writers` imports TensorFlow (seconds):
a run that stops on a config or input error never pays for it."""

from __future__ import annotations

import json
import os

import jax
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """workdir/metrics.jsonl as a CLU writer: one JSON line per `write_scalars` call (keys in
    `exclude`, e.g. wall-clock rates, left out so that two runs' logs compare exactly). On resume,
    lines past the restored round (written after the last checkpoint by a killed run) are dropped,
    so the log always describes one consistent run. Images and other summaries are not its job."""

    def __init__(self, path: str, resume_step: int, exclude: tuple[str, ...] = ()):
        self.path, self.exclude = path, set(exclude)
        if os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)

    def write_scalars(self, step: int, scalars) -> None:
        row = {k: float(v) for k, v in scalars.items() if k not in self.exclude}
        if row:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": int(step), **row}) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


# Timing scalars (ours and CLU ReportProgress's) vary between runs: kept out of metrics.jsonl.
WALL_CLOCK_KEYS = ("rounds_per_sec", "steps_per_sec", "uptime")


def make_writer(workdir: str, resume_step: int) -> metric_writers.MetricWriter:
    """Console + TensorBoard (CLU's default writer) + metrics.jsonl, all from one `write_scalars`;
    only the first process writes files."""
    is_main = jax.process_index() == 0
    writers = [metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=not is_main)]
    if is_main:
        writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step, exclude=WALL_CLOCK_KEYS))
    return metric_writers.MultiWriter(writers)
