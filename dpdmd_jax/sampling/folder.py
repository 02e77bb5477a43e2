"""A sample folder: what `python -m dpdmd_jax.sample` writes and `python -m dpdmd_jax.evaluate` reads.

`images/p{p:05d}_s{s:03d}.png` (prompt index p, seed s), `grids/p{p:05d}.png` (a prompt's seeds in a
row), `samples.jsonl` (one row per image) and `run.json` (what made them). A folder is resumable and
append-only: PNGs are written to a temporary name and renamed, an existing file is never
overwritten, a torn JSONL line (a kill while writing) is dropped, and an unreadable PNG is moved to
`corrupt/` and made again. `plan` decides on process 0 which images are left and tells the others.

The folder may be a URI (gs://bucket/...; often inside a multi-host run's shared workdir): every file
is reached through `etils.epath`, and PIL reads and writes file objects it opens.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from dpdmd_jax.data.prompts import PromptFileError, read_prompt_file
from dpdmd_jax.parallel.multihost import barrier
from dpdmd_jax.run_config import is_uri
from dpdmd_jax.sampling.rows import Job, exists, json_lines, png_path, read_rows

class SampleError(ValueError):
    """Bad sampling input; the message says what to fix."""


# ---------------------------------------------------------------------------- output folder


def _fsync(f) -> None:
    """A local file's bytes to the disk (before it is renamed, or a row is counted as written); an
    object store's file has no descriptor, and its upload is whole once the file is closed."""
    with contextlib.suppress(AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        f.flush()
        os.fsync(f.fileno())


def append_rows(path: str, lines: Sequence[str]) -> None:
    """Appends JSONL `lines` to samples.jsonl, on disk when this returns. A local file is appended to
    (a kill leaves at most a torn last line, which `plan` drops); an object store (gs://) cannot
    append, so there the file is written whole again, which is atomic there."""
    if is_uri(path):
        old = epath.Path(path).read_text() if exists(path) else ""
        epath.Path(path).write_text(old + "".join(lines))
        return
    with epath.Path(path).open("a") as f:
        f.writelines(lines)
        _fsync(f)


def check_run(out: str, run: dict) -> None:
    """First call writes run.json; later ones must describe the same samples."""
    path = epath.Path(out) / "run.json"
    if path.exists():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        if diff:
            changes = "; ".join(f"{k}: {saved.get(k)!r} -> {run.get(k)!r}" for k in diff)
            raise SampleError(f"{out} holds samples made with other settings ({changes}); use another --out.")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run, indent=2))
    tmp.replace(path)


# Every whole PNG ends with its IEND chunk (length 0, "IEND", CRC); PIL's verify() stops before its CRC.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def readable_png(path: str) -> bool:
    """Whether `path` is a whole PNG: every chunk's CRC checks out (PIL's verify, no decoding) and
    the file ends with the IEND chunk (a file cut short anywhere fails one or the other)."""
    try:
        data = epath.Path(path).read_bytes()  # one read (a PNG is small), also from an object store
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                return False
            image.verify()
        return data.endswith(PNG_END)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return False


def set_aside(out: str, path: str) -> str:
    """Moves an unreadable file to `out`/corrupt/ (kept, never deleted: it may be worth a look, and a
    file we misjudged is not lost); returns its new path."""
    folder = epath.Path(out) / "corrupt"
    folder.mkdir(parents=True, exist_ok=True)
    name = epath.Path(path).name
    dest, n = folder / name, 1
    while dest.exists():
        dest, n = folder / f"{name}.{n}", n + 1
    epath.Path(path).replace(dest)
    print(f"{path} is not a readable PNG: moved to {dest}; it will be made again", flush=True)
    return str(dest)


def _torn(path: str) -> bool:
    """Whether a JSONL file's last line is cut short (no newline: a kill while it was written)."""
    data = epath.Path(path).read_bytes()
    return bool(data) and not data.endswith(b"\n")


def rewrite_rows(path: str, drop: set[str]) -> None:
    """samples.jsonl without the rows of the files in `drop` (made again: one row per image) and
    without a torn last line (the next row appended to it would be lost with it), replaced atomically."""
    keep = [line if line.endswith("\n") else line + "\n"
            for line, row in json_lines(path) if row.get("file") not in drop]
    tmp = epath.Path(f"{path}.tmp")
    with tmp.open("w") as f:
        f.writelines(keep)
        _fsync(f)
    tmp.replace(path)


def write_png(path: str, image_01) -> bool:
    """Writes [H, W, 3] in [0, 1] as an 8-bit PNG via a temporary file; False if `path` exists
    (never overwritten)."""
    if exists(path):
        return False
    tmp = epath.Path(f"{path}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        Image.fromarray(np.round(np.clip(image_01, 0, 1) * 255).astype(np.uint8)).save(f, format="PNG")
    tmp.replace(path)
    return True


def write_array(path: str, save, array) -> bool:
    """Writes `array` with `save(file, array)` (np.save, or np.savez for a dict) via a temporary file;
    False if `path` exists (never overwritten)."""
    if exists(path):
        return False
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = epath.Path(f"{path}.tmp{os.getpid()}")
    buffer = io.BytesIO()
    save(buffer, **array) if isinstance(array, dict) else save(buffer, array)
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return True


def to_unit(images) -> Any:
    """[-1, 1] -> [0, 1]."""
    return np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)


def read_prompts(path: str, column: str = "") -> list[str]:
    """A prompt file's prompts (`data.prompts.read_prompt_file`: `column` of a structured file, "" = auto)."""
    try:
        prompts, bad = read_prompt_file(path, column)
    except PromptFileError as e:
        raise SampleError(f"--prompt_file: {e}") from e
    if bad:
        print(f"{path}: skipped {bad} lines that are not valid UTF-8; {len(prompts)} prompts remain")
    return prompts


def plan(out: str, run: dict, jobs: Sequence[Job], also: Callable[[Job], bool] | None = None) -> tuple[list[Job], int]:
    """(the jobs still to make, the rows samples.jsonl will then hold), the same on every process.

    Only process 0 writes `out`, so only it reads it: it checks (or, first, writes) run.json and
    finds the jobs whose row and PNG are both there (and for which `also(job)` holds, if given: e.g. a
    pair cache's latents); the others get its answer, so every process
    runs the same batches (their collectives must match) whatever file system they see. An error
    on process 0 stops every process."""
    done, n_rows, error = np.zeros(len(jobs), np.int32), 0, None
    if jax.process_index() == 0:
        try:
            check_run(out, run)
            for sub in ("images", "grids"):
                (epath.Path(out) / sub).mkdir(parents=True, exist_ok=True)
            rows_path = str(epath.Path(out) / "samples.jsonl")
            rows = read_rows(rows_path)
            # A PNG we would skip (or keep) must be whole: one cut short by a disk fault or a partial
            # copy is set aside and made again, with its row.
            bad = {j.name + ".png" for j in jobs
                   if exists(png_path(out, j)) and not readable_png(png_path(out, j))}
            for name in sorted(bad):
                set_aside(out, str(epath.Path(out) / "images" / name))
                rows.pop(name, None)
            if exists(rows_path) and (bad or _torn(rows_path)):
                rewrite_rows(rows_path, bad)
            done[:] = [j.name + ".png" in rows and exists(png_path(out, j)) and (also is None or also(j))
                       for j in jobs]
            n_rows = len(rows.keys() | {j.name + ".png" for j in jobs})
        except Exception as e:  # re-raised below, once the other processes know to stop too
            error = e
    if jax.process_count() > 1:
        barrier("sample_plan")  # process 0 may read a slow file system: gloo's 30 s set-up would not wait
        shared = multihost_utils.broadcast_one_to_all(np.array([error is not None, n_rows, *done], np.int32))
        failed, n_rows, done = bool(shared[0]), int(shared[1]), shared[2:]
        if failed and error is None:
            raise SampleError(f"process 0 could not sample into {out}; its output says why")
    if error is not None:
        raise error
    return [j for j, d in zip(jobs, done) if not d], n_rows


def write_grids(out: str, num_prompts: int, seeds: int) -> None:
    """grids/p{p}.png: the prompt's R images in a row, for every prompt whose images are all there
    (an existing grid is kept if it is a whole PNG, else set aside and made again)."""
    for p in range(num_prompts):
        path = str(epath.Path(out) / "grids" / f"p{p:05d}.png")
        files = [png_path(out, Job(p, s)) for s in range(seeds)]
        if exists(path) and not readable_png(path):
            set_aside(out, path)
        if exists(path) or not all(exists(f) for f in files):
            continue
        row = np.concatenate([read_png(f) for f in files], axis=1)
        write_png(path, row.astype(np.float32) / 255.0)


def read_png(path: str) -> np.ndarray:
    """An image file as uint8 [H, W, 3]; raises what PIL raises for an unreadable one."""
    with epath.Path(path).open("rb") as f, Image.open(f) as image:
        return np.asarray(image.convert("RGB"))
