"""A sample folder: what `python -m dpdmd_jax.sample` writes and `python -m dpdmd_jax.evaluate` reads.

`images/p{p:05d}_s{s:03d}.png` (prompt index p, seed s), `grids/p{p:05d}.png` (a prompt's seeds in a
row), `samples.jsonl` (one row per image) and `run.json` (what made them). A folder is resumable and
append-only: PNGs are written to a temporary name and renamed, an existing file is never
overwritten, a torn JSONL line (a kill while writing) is dropped, and an unreadable PNG is moved to
`corrupt/` and made again. `plan` decides on process 0 which images are left and tells the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from dpdmd_jax.data.prompts import PromptFileError, read_prompt_file
from dpdmd_jax.parallel.multihost import barrier

class SampleError(ValueError):
    """Bad sampling input; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One image: prompt index p, seed s."""

    p: int
    s: int

    @property
    def name(self) -> str:
        return f"p{self.p:05d}_s{self.s:03d}"


def image_key(root_seed: int, p: Any, s: Any):
    """The key an image's noise comes from (works on traced ints, under vmap)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(root_seed), p), s)


# ---------------------------------------------------------------------------- output folder


def _json_lines(path: str):
    """(line, row) for each line of a JSONL file that parses; a torn line (killed while writing) is skipped."""
    with open(path) as f:
        for line in f:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


def read_rows(path: str) -> dict[str, dict]:
    """samples.jsonl -> {file name: row}; a torn last line (killed while writing) is ignored."""
    return {row["file"]: row for _, row in _json_lines(path)} if os.path.exists(path) else {}


def check_run(out: str, run: dict) -> None:
    """First call writes run.json; later ones must describe the same samples."""
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        if diff:
            changes = "; ".join(f"{k}: {saved.get(k)!r} -> {run.get(k)!r}" for k in diff)
            raise SampleError(f"{out} holds samples made with other settings ({changes}); use another --out.")
        return
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(run, f, indent=2)
    os.replace(path + ".tmp", path)


# Every whole PNG ends with its IEND chunk (length 0, "IEND", CRC); PIL's verify() stops before its CRC.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def readable_png(path: str) -> bool:
    """Whether `path` is a whole PNG: every chunk's CRC checks out (PIL's verify, no decoding) and
    the file ends with the IEND chunk (a file cut short anywhere fails one or the other)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.verify()
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return False


def set_aside(out: str, path: str) -> str:
    """Moves an unreadable file to `out`/corrupt/ (kept, never deleted: it may be worth a look, and a
    file we misjudged is not lost); returns its new path."""
    folder = os.path.join(out, "corrupt")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    dest, n = os.path.join(folder, name), 1
    while os.path.exists(dest):
        dest, n = os.path.join(folder, f"{name}.{n}"), n + 1
    os.replace(path, dest)
    print(f"{path} is not a readable PNG: moved to {dest}; it will be made again", flush=True)
    return dest


def _torn(path: str) -> bool:
    """Whether a JSONL file's last line is cut short (no newline: a kill while it was written)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def rewrite_rows(path: str, drop: set[str]) -> None:
    """samples.jsonl without the rows of the files in `drop` (made again: one row per image) and
    without a torn last line (the next row appended to it would be lost with it), replaced atomically."""
    keep = [line if line.endswith("\n") else line + "\n"
            for line, row in _json_lines(path) if row.get("file") not in drop]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_png(path: str, image_01) -> bool:
    """Writes [H, W, 3] in [0, 1] as an 8-bit PNG via a temporary file; False if `path` exists
    (never overwritten)."""
    if os.path.exists(path):
        return False
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(np.round(np.clip(image_01, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return True


def to_unit(images) -> Any:
    """[-1, 1] -> [0, 1]."""
    return np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)


def read_prompts(path: str) -> list[str]:
    try:
        prompts, bad = read_prompt_file(path)
    except PromptFileError as e:
        raise SampleError(f"--prompt_file: {e}; point it at a UTF-8 text file with one prompt per line.") from e
    if bad:
        print(f"{path}: skipped {bad} lines that are not valid UTF-8; {len(prompts)} prompts remain")
    return prompts


def plan(out: str, run: dict, jobs: Sequence[Job]) -> tuple[list[Job], int]:
    """(the jobs still to make, the rows samples.jsonl will then hold), the same on every process.

    Only process 0 writes `out`, so only it reads it: it checks (or, first, writes) run.json and
    finds the jobs whose row and PNG are both there; the others get its answer, so every process
    runs the same batches (their collectives must match) whatever file system they see. An error
    on process 0 stops every process."""
    done, n_rows, error = np.zeros(len(jobs), np.int32), 0, None
    if jax.process_index() == 0:
        try:
            check_run(out, run)
            for sub in ("images", "grids"):
                os.makedirs(os.path.join(out, sub), exist_ok=True)
            rows_path = os.path.join(out, "samples.jsonl")
            rows = read_rows(rows_path)
            # A PNG we would skip (or keep) must be whole: one cut short by a disk fault or a partial
            # copy is set aside and made again, with its row.
            bad = {j.name + ".png" for j in jobs
                   if os.path.exists(png_path(out, j)) and not readable_png(png_path(out, j))}
            for name in sorted(bad):
                set_aside(out, os.path.join(out, "images", name))
                rows.pop(name, None)
            if os.path.exists(rows_path) and (bad or _torn(rows_path)):
                rewrite_rows(rows_path, bad)
            done[:] = [j.name + ".png" in rows and os.path.exists(png_path(out, j)) for j in jobs]
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


def png_path(out: str, j: Job) -> str:
    """Where image j of folder `out` is."""
    return os.path.join(out, "images", j.name + ".png")


def write_grids(out: str, num_prompts: int, seeds: int) -> None:
    """grids/p{p}.png: the prompt's R images in a row, for every prompt whose images are all there
    (an existing grid is kept if it is a whole PNG, else set aside and made again)."""
    for p in range(num_prompts):
        path = os.path.join(out, "grids", f"p{p:05d}.png")
        files = [png_path(out, Job(p, s)) for s in range(seeds)]
        if os.path.exists(path) and not readable_png(path):
            set_aside(out, path)
        if os.path.exists(path) or not all(os.path.exists(f) for f in files):
            continue
        row = np.concatenate([np.asarray(Image.open(f).convert("RGB")) for f in files], axis=1)
        write_png(path, row.astype(np.float32) / 255.0)
