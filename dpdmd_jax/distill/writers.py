"""The run's metric writers: console + TensorBoard (CLU) and workdir/metrics.jsonl, from one
`write_scalars`. Apart from the trainer because `clu.metric_writers` imports TensorFlow (seconds):
a run that stops on a config or input error never pays for it."""

from __future__ import annotations

import json

import jax
from clu import metric_writers
from etils import epath


class JsonlWriter(metric_writers.MetricWriter):
    """workdir/metrics.jsonl as a CLU writer: one JSON line per `write_scalars` call (keys in
    `exclude`, e.g. wall-clock rates, left out so that two runs' logs compare exactly). On resume,
    lines past the restored round (written after the last checkpoint by a killed run) are dropped,
    so the log always describes one consistent run. Images and other summaries are not its job.

    The file is written whole, never appended to: the workdir may be an object store (gs://), where
    a file cannot be appended to (gcsfs refuses; TensorFlow's GCS file system emulates it by
    uploading the whole object again). The lines are kept here, and each call replaces the file
    with all of them through a temporary file, so no reader ever sees a torn line. The log is small
    (one line per logged round: 10^2..10^3 lines for the shipped configs), so rewriting it costs
    nothing next to a round."""

    def __init__(self, path: str, resume_step: int, exclude: tuple[str, ...] = ()):
        self.path, self.exclude = epath.Path(path), set(exclude)
        self.lines: list[str] = []
        if self.path.exists():
            self.lines = [line + "\n" for line in self.path.read_text().splitlines()
                          if line.strip() and json.loads(line)["step"] <= resume_step]
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(self.lines))
        tmp.replace(self.path)

    def write_scalars(self, step: int, scalars) -> None:
        row = {k: float(v) for k, v in scalars.items() if k not in self.exclude}
        if row:
            self.lines.append(json.dumps({"step": int(step), **row}) + "\n")
            self._write()

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
    only the first process writes files. TensorBoard's writer reaches gs:// itself (tf.io.gfile)."""
    is_main = jax.process_index() == 0
    root = epath.Path(workdir)
    writers = [metric_writers.create_default_writer(str(root / "tb"), just_logging=not is_main)]
    if is_main:
        writers.append(JsonlWriter(str(root / "metrics.jsonl"), resume_step, exclude=WALL_CLOCK_KEYS))
    return metric_writers.MultiWriter(writers)
