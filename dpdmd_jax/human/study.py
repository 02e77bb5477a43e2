"""Sample folders -> a study: the systems, the prompts every one of them has with all its seeds, and
each rater's schedule of comparisons.

A schedule holds every shown prompt once per pair of systems, in an order drawn from (seed, rater) and
with a left / right placement drawn from (seed, rater, prompt, pair): a reload or a restarted server
shows a rater the same comparisons in the same places, and two raters see different orders. The
draws hash their inputs (sha256), so they do not depend on Python's per-process string hashing.

Folders are what `python -m dpdmd_jax.sample` writes (`dpdmd_jax.sampling.folder`), on a local disk:
the review server reads their PNGs where they are, through `sampling.rows` (the folder format
without JAX, so the review command starts at once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
from collections.abc import Sequence

from dpdmd_jax.sampling.rows import Job, png_path, read_rows


# The paper's three questions, in the order the page asks them.
QUESTIONS = {
    "diversity": "Which set of images is more diverse?",
    "quality": "Which set of images has higher quality?",
    "overall": "Which set do you prefer overall?",
}
CHOICES = ("left", "tie", "right")
MAX_RATER_CHARS = 64
_SHOWN_IN_A_LINE = 5  # prompts named in the "left out" line before "... and N more"


class ReviewError(ValueError):
    """Bad review input; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    folder: str


@dataclasses.dataclass(frozen=True)
class Prompt:
    index: int
    text: str


@dataclasses.dataclass(frozen=True)
class Study:
    """The systems, the prompts shown (every system has all `seeds` of each) and one line naming the
    prompts left out ('' when none)."""

    systems: tuple[System, ...]
    prompts: tuple[Prompt, ...]
    seeds: tuple[int, ...]
    left_out: str = ""

    def image(self, system: int, prompt: Prompt, seed: int) -> str:
        """The PNG of `system` for `prompt` and `seed` (in its sample folder: never copied)."""
        return png_path(self.systems[system].folder, Job(prompt.index, seed))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.systems]


@dataclasses.dataclass(frozen=True)
class Item:
    """One comparison of a rater's schedule: position `n`, the prompt, the pair of system indices
    (a < b, the order of --samples) and which of them is shown left and right."""

    n: int
    prompt: Prompt
    pair: tuple[int, int]
    left: int
    right: int


def pair_key(names: Sequence[str]) -> tuple[str, str]:
    """A pair of systems by name, whatever order they were given or shown in."""
    a, b = sorted(names)
    return a, b


# ---------------------------------------------------------------------------- reading the folders


def _seen(folder: str) -> dict[int, tuple[str, set[int]]]:
    """prompt index -> (prompt text, the seeds whose row and PNG are both there)."""
    out: dict[int, tuple[str, set[int]]] = {}
    for row in read_rows(os.path.join(folder, "samples.jsonl")).values():
        p, s = int(row["prompt_index"]), int(row["seed"])
        text, seeds = out.setdefault(p, (row["prompt"], set()))
        if os.path.isfile(png_path(folder, Job(p, s))):
            seeds.add(s)
    return out


def _check_folder(flag_value: str, folder: str) -> None:
    if not os.path.isdir(folder):
        raise ReviewError(f"--samples: {flag_value} is not a folder (local sample folders only)")
    for name in ("run.json", "samples.jsonl"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ReviewError(f"--samples: {flag_value} has no {name}: is it a folder written by "
                              "`python -m dpdmd_jax.sample`?")


def _seed_list(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, sorted(seeds)))


def open_study(folders: Sequence[str], names: Sequence[str] | None = None) -> Study:
    """The study of sample `folders` (named `names`, default the folder names): the prompts for which
    every system has a row and a PNG of every seed that all systems sampled. Raises ReviewError, one
    line, for fewer than 2 folders, a names count that does not match, a folder that is not a sample
    folder, or systems with no such prompt in common."""
    if len(folders) < 2:
        raise ReviewError(f"--samples needs at least 2 sample folders to compare (got {len(folders)})")
    if names and len(names) != len(folders):
        raise ReviewError(f"{len(names)} --names for {len(folders)} --samples folders: give one name per folder")
    paths = [os.path.abspath(os.path.expanduser(f)) for f in folders]
    names = list(names) if names else [os.path.basename(p.rstrip(os.sep)) for p in paths]
    if len(set(names)) != len(names):
        raise ReviewError(f"the systems' names must differ (got {', '.join(names)}): pass --names=...")
    for flag_value, path in zip(folders, paths):
        _check_folder(flag_value, path)
    seen = [_seen(p) for p in paths]
    # The seeds every system sampled (for some prompt): systems made with different --seeds compare on
    # the seeds they share.
    seeds = set.intersection(*(set().union(*(s for _, s in d.values())) for d in seen))
    shown, missing = [], []
    for p in sorted(set().union(*seen)):
        problems = []
        for name, d in zip(names, seen):
            if p not in d:
                problems.append(f"{name} has no row")
            elif not seeds <= d[p][1]:
                problems.append(f"{name} lacks seeds {_seed_list(seeds - d[p][1])}")
        texts = {d[p][0] for d in seen if p in d}
        if len(texts) > 1:
            problems.append("its text differs between folders")
        if problems:
            missing.append(f"p{p:05d} ({'; '.join(problems)})")
        else:
            shown.append(Prompt(p, texts.pop()))
    if not shown or not seeds:
        raise ReviewError(f"{' and '.join(names)} have no prompt with all its seeds in common: sample them "
                          "with the same --prompt_file and --seeds (same prompts, same seeds)")
    left_out = ""
    if missing:
        more = len(missing) - _SHOWN_IN_A_LINE
        left_out = (f"left out {len(missing)} of {len(missing) + len(shown)} prompts (not every system has "
                    f"all of seeds {_seed_list(seeds)}): {', '.join(missing[:_SHOWN_IN_A_LINE])}"
                    + (f" ... and {more} more" if more > 0 else ""))
    return Study(tuple(System(n, p) for n, p in zip(names, paths)), tuple(shown), tuple(sorted(seeds)), left_out)


def record(out: str, study: Study, seed: int) -> None:
    """Writes `out`/study.json (the systems' folders and the seed) the first time; later a name that
    now means another folder, or another seed, is refused: the answers already there name systems, and
    the seed fixes each rater's order and placements. Adding systems is allowed."""
    path = os.path.join(out, "study.json")
    now = {"seed": seed, "systems": {s.name: s.folder for s in study.systems}}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        changed = [f"{n} was {saved['systems'][n]} (now {folder})" for n, folder in now["systems"].items()
                   if saved["systems"].get(n, folder) != folder]
        if saved["seed"] != seed:
            changed.append(f"--seed was {saved['seed']} (now {seed})")
        if changed:
            raise ReviewError(f"{out} holds the answers of another study: {'; '.join(changed)}; use another --out "
                              "or the same folders and seed")
        now["systems"] = {**saved["systems"], **now["systems"]}
    os.makedirs(out, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(now, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- schedules


def _rng(*parts: object) -> random.Random:
    """A generator seeded by a hash of `parts` (the same in every process and Python version)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def check_rater(rater: str) -> str:
    """A rater's name, stripped; raises ReviewError when it is empty, too long or holds control characters."""
    name = rater.strip()
    if not name or len(name) > MAX_RATER_CHARS or not name.isprintable():
        raise ReviewError(f"a rater's name must be 1 to {MAX_RATER_CHARS} printable characters (got {rater!r})")
    return name


def schedule(study: Study, rater: str, seed: int = 0) -> list[Item]:
    """Rater `rater`'s comparisons: every prompt once per pair of systems, shuffled by (seed, rater);
    which system is left is drawn from (seed, rater, prompt, the pair's names), so it does not change
    when systems are added or reordered."""
    pairs = list(itertools.combinations(range(len(study.systems)), 2))
    todo = [(p, pair) for p in study.prompts for pair in pairs]
    _rng(seed, rater).shuffle(todo)
    items = []
    for n, (p, (a, b)) in enumerate(todo):
        key = pair_key([study.systems[a].name, study.systems[b].name])
        first = a if study.systems[a].name == key[0] else b  # the pair's first system by name
        left = first if _rng(seed, rater, p.index, *key).random() < 0.5 else a + b - first
        items.append(Item(n, p, (a, b), left, a + b - left))
    return items
