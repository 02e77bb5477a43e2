"""The run's metric writers: the console, TensorBoard events and workdir/metrics.jsonl, from one
`write_scalars` / `write_images`, with the interface of CLU's `MetricWriter`.

Why not `clu.metric_writers`: importing it imports TensorFlow (its `SummaryWriter` is `tf.summary`),
about 4 s of CPU on an idle core and 10 s on a loaded one, paid by every training process before its
first round, though a run writes nothing but scalars and a sample grid. The events here are the same
records in the same format (TensorFlow 2's summary protos: scalars as float tensors under the
`scalars` plugin, images as [width, height, png...] string tensors under `images`), written with
TensorBoard's own protos and record framing, so `tensorboard --logdir` and its event readers see
what `tf.summary` would have written. Every file goes through etils.epath, so the workdir may be
gs:// as for Orbax and metrics.jsonl.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util


class MetricWriter(Protocol):
    """The part of CLU's `MetricWriter` interface a run uses."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """workdir/metrics.jsonl: one JSON line per `write_scalars` call (keys in `exclude`, e.g.
    wall-clock rates, left out so that two runs' logs compare exactly). On resume, lines past the
    restored round (written after the last checkpoint by a killed run) are dropped, so the log always
    describes one consistent run. Images are not its job.

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

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {k: float(v) for k, v in scalars.items() if k not in self.exclude}
        if row:
            self.lines.append(json.dumps({"step": int(step), **row}) + "\n")
            self._write()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _png(image: np.ndarray) -> bytes:
    """[H, W, C] in [0, 1] (or uint8) -> PNG bytes."""
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


class TensorBoardWriter:
    """One TensorBoard events file in `logdir` (named as `tf.summary` names it), written record by
    record and flushed after each write: a killed run keeps every event written before it."""

    def __init__(self, logdir: str):
        root = epath.Path(logdir)
        root.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.v2"
        self._records = RecordWriter(root.joinpath(name).open("wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def _summary(self, step: int, values: Sequence[summary_pb2.Summary.Value]) -> None:
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        meta = scalar_metadata.create_summary_metadata(display_name="", description="")
        self._summary(step, [summary_pb2.Summary.Value(
            tag=k, metadata=meta, tensor=tensor_util.make_tensor_proto(np.float32(v))) for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images[key]`: [N, H, W, C] in [0, 1] (or uint8), as CLU takes them."""
        meta = image_metadata.create_summary_metadata(display_name="", description="")
        values = []
        for key, batch in images.items():
            batch = np.asarray(batch)
            strings = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode()] + [_png(im) for im in batch]
            values.append(summary_pb2.Summary.Value(
                tag=key, metadata=meta, tensor=tensor_util.make_tensor_proto(strings, shape=[len(strings)])))
        self._summary(step, values)

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


class LoggingWriter:
    """The console: each step's scalars on one absl log line, as CLU's `LoggingWriter` prints them."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        logging.info("[%d] images: %s", step, ", ".join(f"{k} {np.shape(v)}" for k, v in images.items()))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MultiWriter:
    """Every call to each of `writers`."""

    def __init__(self, writers: Sequence[Any]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for w in self.writers:
            w.write_images(step, images)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


# Timing scalars vary between runs: kept out of metrics.jsonl.
WALL_CLOCK_KEYS = ("rounds_per_sec",)


def make_writer(workdir: str, resume_step: int) -> MultiWriter:
    """Console + TensorBoard (workdir/tb) + metrics.jsonl, all from one `write_scalars`; only the first
    process writes files, every process logs."""
    writers: list[Any] = [LoggingWriter()]
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        writers += [TensorBoardWriter(str(root / "tb")),
                    JsonlWriter(str(root / "metrics.jsonl"), resume_step, exclude=WALL_CLOCK_KEYS)]
    return MultiWriter(writers)
