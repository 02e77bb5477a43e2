"""answers.jsonl: one row per answer, appended as it is given and on disk (flush + fsync) before the
page hears it was saved; the file is never rewritten.

A row: `rater`, `prompt_index`, `prompt`, `pair` (the two systems, in --samples order), `left` and
`right` (which was shown where), `question` (diversity / quality / overall), `choice` (left / tie /
right), `winner` (a system's name or "tie"), `n` (the comparison's place in the rater's schedule) and
`time`. A rater who changes an answer appends a new row: the last row of a (rater, prompt, pair,
question) counts. A kill while a row is written leaves a torn last line; readers skip it, and the
file is first ended with a newline so that the next row is not glued to it.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections.abc import Iterable

from dpdmd_jax.human.study import CHOICES, QUESTIONS, Item, Study, pair_key

FIELDS = ("rater", "prompt_index", "pair", "left", "right", "question", "choice", "winner")

Key = tuple[str, int, tuple[str, str], str]  # (rater, prompt index, pair by name, question)


def _valid(row: object) -> bool:
    return (isinstance(row, dict) and all(k in row for k in FIELDS) and row["question"] in QUESTIONS
            and row["choice"] in CHOICES and isinstance(row["pair"], list) and len(row["pair"]) == 2)


def read_answers(path: str) -> list[dict]:
    """The rows of an answers file in order; a torn or foreign line is skipped (none if no file)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _valid(row):
                rows.append(row)
    return rows


def key(row: dict) -> Key:
    return row["rater"], int(row["prompt_index"]), pair_key(row["pair"]), row["question"]


def latest(rows: Iterable[dict]) -> dict[Key, dict]:
    """The answer that counts per (rater, prompt, pair, question): the last one given."""
    return {key(r): r for r in rows}


def answer_row(study: Study, rater: str, item: Item, question: str, choice: str) -> dict:
    """The row of `rater`'s `choice` (left / tie / right) on `question` for comparison `item`."""
    names = study.names
    winner = {"left": names[item.left], "right": names[item.right], "tie": "tie"}[choice]
    return dict(rater=rater, prompt_index=item.prompt.index, prompt=item.prompt.text,
                pair=[names[i] for i in item.pair], left=names[item.left], right=names[item.right],
                question=question, choice=choice, winner=winner, n=item.n,
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


class AnswerFile:
    """The answers file of a study folder: read once, then appended to (thread-safe)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._latest = latest(read_answers(path))
        if os.path.exists(path):
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            if torn:  # end the torn line (it stays, skipped by readers): append-only, nothing rewritten
                self._write("\n")

    def _write(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: dict) -> None:
        """Appends `row`; it is on disk when this returns."""
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            self._write(line)
            self._latest[key(row)] = row

    def given(self, study: Study, rater: str, item: Item) -> dict[str, str]:
        """question -> the choice that counts (left / tie / right as `item` places the systems), for the
        questions `rater` answered on this comparison."""
        names = study.names
        pair = pair_key([names[i] for i in item.pair])
        with self._lock:
            found = {q: self._latest.get((rater, item.prompt.index, pair, q)) for q in QUESTIONS}
        side = {names[item.left]: "left", names[item.right]: "right", "tie": "tie"}
        return {q: side[r["winner"]] for q, r in found.items() if r is not None}
