"""A sample folder's names and rows, without JAX: what readers of folders need (the sampler's
`sampling.folder`, the review page `dpdmd_jax.human`, which starts in well under a second).

`images/p{p:05d}_s{s:03d}.png` is image (prompt index p, seed s); `samples.jsonl` has one row per
image (`prompt_index`, `seed`, `prompt`, `file`, ...). Paths go through `etils.epath` (gs://...).
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath


@dataclasses.dataclass(frozen=True)
class Job:
    """One image: prompt index p, seed s."""

    p: int
    s: int

    @property
    def name(self) -> str:
        return f"p{self.p:05d}_s{self.s:03d}"


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def json_lines(path: str):
    """(line, row) for each line of a JSONL file that parses; a torn line (killed while writing) is skipped."""
    with epath.Path(path).open() as f:
        for line in f:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


def read_rows(path: str) -> dict[str, dict]:
    """samples.jsonl -> {file name: row}; a torn last line (killed while writing) is ignored."""
    return {row["file"]: row for _, row in json_lines(path)} if exists(path) else {}


def png_path(out: str, j: Job) -> str:
    """Where image j of folder `out` is."""
    return str(epath.Path(out) / "images" / f"{j.name}.png")
