"""The human study's library (dpdmd_jax.human) without a browser: Wilson intervals and Bradley-Terry on
cases computed by hand, the append-only answers file and its resume, each rater's schedule, a
restarted review continuing where a rater stopped, and the bad-input errors."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest
from scipy.stats import binomtest

from dpdmd_jax.human.answers import AnswerFile, answer_row, read_answers
from dpdmd_jax.human.server import Review, open_review
from dpdmd_jax.human.study import QUESTIONS, ReviewError, open_study, record, schedule
from dpdmd_jax.human.summary import bradley_terry, finite, summarize, wilson, write_summary
from dpdmd_jax.sampling.folder import Job, append_rows, check_run, png_path, write_grids, write_png
from tests.helpers import REPO


def make_sample_folder(out: str, prompts: int | Sequence[int] = 3, seeds: int = 2, colour: int = 0,
                       size: int = 8, text: str = "prompt {p}") -> str:
    """A sample folder as `python -m dpdmd_jax.sample` writes it (through `sampling.folder`'s writers):
    tiny PNGs whose brightness says the seed and whose top rows say the prompt."""
    indices = range(prompts) if isinstance(prompts, int) else prompts
    check_run(out, {"source": out, "seed": 0})
    for sub in ("images", "grids"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    rows = []
    for p in indices:
        for s in range(seeds):
            image = np.zeros((size, size, 3))
            image[..., colour] = (s + 1) / seeds
            image[: p + 1, :, (colour + 1) % 3] = 1.0
            write_png(png_path(out, Job(p, s)), image)
            rows.append(json.dumps(dict(prompt=text.format(p=p), prompt_index=p, seed=s,
                                        file=Job(p, s).name + ".png")) + "\n")
    append_rows(os.path.join(out, "samples.jsonl"), rows)
    write_grids(out, max(indices) + 1, seeds)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("human")
    return {name: make_sample_folder(str(root / name), prompts=8, seeds=2, colour=i)
            for i, name in enumerate("ABC")}


# ---------------------------------------------------------------------------- statistics


def test_wilson_by_hand():
    # 8 of 10, z = 1.96: p = .8, z^2 / n = .38416; centre (.8 + .19208) / 1.38416 = .716738,
    # half-width 1.96 / 1.38416 * sqrt(.016 + .009604) = .226581.
    assert wilson(8, 10, z=1.96) == pytest.approx((0.490157, 0.943319), abs=1e-6)
    for k, n in ((8, 10), (3, 7)):  # at the exact 97.5% quantile, as scipy computes it
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    lo, hi = wilson(2, 10, z=1.96)  # the mirror case
    assert (1 - hi, 1 - lo) == pytest.approx(wilson(8, 10, z=1.96), abs=1e-12)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(5, 5)[1] == 1.0 and wilson(0, 5)[0] == 0.0


def test_bradley_terry_two_systems_3_to_1():
    strength = bradley_terry(np.array([[0, 3], [1, 0]]))
    assert strength == pytest.approx([0.75, 0.25], abs=1e-12)  # ratio 3 = 3 wins / 1 win
    assert finite(np.array([[0, 3], [1, 0]]))


def test_bradley_terry_three_systems_transitive():
    # Strengths 4 : 2 : 1 and win counts that equal their expectations (A-B 2-1, B-C 2-1, A-C 4-1):
    # the likelihood equations W_i = sum_j n_ij p_i / (p_i + p_j) hold at (4, 2, 1) / 7, the maximum.
    wins = np.array([[0, 2, 4], [1, 0, 2], [1, 1, 0]])
    assert bradley_terry(wins) == pytest.approx(np.array([4, 2, 1]) / 7, abs=1e-9)


def test_bradley_terry_never_won_and_never_compared():
    wins = np.array([[0, 4, 0], [0, 0, 0], [0, 0, 0]])  # B never won; C never played
    strength = bradley_terry(wins)
    assert strength[0] == pytest.approx(1.0) and strength[1] == pytest.approx(0.0) and np.isnan(strength[2])
    assert not finite(wins)


def _row(rater, p, pair, question, winner):
    return dict(rater=rater, prompt_index=p, prompt=f"prompt {p}", pair=list(pair), left=pair[0], right=pair[1],
                question=question, choice="tie" if winner == "tie" else ("left" if winner == pair[0] else "right"),
                winner=winner, n=p)


def test_summary_ties_count_half():
    # A vs B on "overall": 7 A wins, 1 B win, 2 ties -> (7 + 1) / 10 = .8, Wilson as 8 of 10; in
    # Bradley-Terry A has 8 wins, B 2: ratio 4.
    winners = ["A"] * 7 + ["B"] + ["tie"] * 2
    rows = [_row("ann", p, ("A", "B"), "overall", w) for p, w in enumerate(winners)]
    s = summarize(rows, ["A", "B"])["questions"]["overall"]
    (pair,) = s["pairs"]
    assert (pair["a_wins"], pair["b_wins"], pair["ties"], pair["comparisons"]) == (7, 1, 2, 10)
    assert pair["a_win_rate"] == pytest.approx(0.8) and pair["a_ci"] == pytest.approx(list(wilson(8, 10)))
    ranking = {r["system"]: r["strength"] for r in s["bradley_terry"]}
    assert ranking["A"] / ranking["B"] == pytest.approx(4.0, rel=1e-9)
    assert summarize(rows, ["A", "B"])["questions"]["diversity"]["pairs"] == []


def test_summary_counts_the_last_answer_once(tmp_path):
    rows = [_row("ann", 0, ("A", "B"), "quality", "A"), _row("ann", 0, ("B", "A"), "quality", "B"),
            _row("bob", 0, ("A", "B"), "quality", "A")]
    s = summarize(rows)
    (pair,) = s["questions"]["quality"]["pairs"]
    assert (pair["a_wins"], pair["b_wins"]) == (1, 1) and s["answers"] == 2  # ann changed her answer to B
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = write_summary(str(tmp_path), ["A", "B", "C"])
    assert json.loads((tmp_path / "summary.json").read_text()) == written
    md = (tmp_path / "summary.md").read_text()
    assert "| A vs B | 2" in md and "Not compared yet: C" in md
    with pytest.raises(ReviewError, match="not in --names"):
        summarize(rows, ["A", "C"])


# ---------------------------------------------------------------------------- answers file


def test_answers_append_and_resume_drop_a_torn_line(tmp_path, folders):
    study = open_study([folders["A"], folders["B"]], ["A", "B"])
    path = str(tmp_path / "answers.jsonl")
    items = schedule(study, "ann")
    answers = AnswerFile(path)
    answers.append(answer_row(study, "ann", items[0], "diversity", "left"))
    answers.append(answer_row(study, "ann", items[0], "quality", "tie"))
    with open(path, "a") as f:
        f.write('{"rater": "ann", "prompt_in')  # killed while writing a row
    before = open(path, "rb").read()

    again = AnswerFile(path)  # a restart: the torn line is skipped, and ended so the next row is whole
    assert again.given(study, "ann", items[0]) == {"diversity": "left", "quality": "tie"}
    again.append(answer_row(study, "ann", items[0], "overall", "right"))
    again.append(answer_row(study, "ann", items[0], "quality", "left"))  # changed: the last one counts
    assert open(path, "rb").read().startswith(before)  # append-only: nothing rewritten
    rows = read_answers(path)
    assert [(r["question"], r["choice"]) for r in rows] == [
        ("diversity", "left"), ("quality", "tie"), ("overall", "right"), ("quality", "left")]
    assert rows[2]["winner"] == study.names[items[0].right]
    assert AnswerFile(path).given(study, "ann", items[0]) == {"diversity": "left", "quality": "left",
                                                              "overall": "right"}


def test_a_restarted_review_continues_where_each_rater_stopped(tmp_path, folders):
    study = open_study([folders["A"], folders["B"]], ["A", "B"])
    review = open_review(study, str(tmp_path))
    for q in QUESTIONS:
        review.answer(dict(rater="ann", n=0, question=q, choice="left"))
    review.answer(dict(rater="ann", n=1, question="diversity", choice="right"))
    review.answer(dict(rater="bob", n=0, question="diversity", choice="tie"))

    again = Review(study, AnswerFile(str(tmp_path / "answers.jsonl")))
    ann, bob = again.next_item("ann"), again.next_item("bob")
    assert (ann["done"], ann["item"]["n"], ann["item"]["answers"]) == (1, 1, {"diversity": "right"})
    assert (bob["done"], bob["item"]["n"], bob["item"]["answers"]) == (0, 0, {"diversity": "tie"})
    assert again.next_item("cy")["item"]["n"] == 0 and ann["total"] == len(study.prompts)
    with pytest.raises(ReviewError, match="choice"):
        again.answer(dict(rater="ann", n=0, question="diversity", choice="up"))
    with pytest.raises(ReviewError, match="no comparison"):
        again.answer(dict(rater="ann", n=999, question="diversity", choice="left"))


# ---------------------------------------------------------------------------- schedule


def test_the_review_command_starts_without_jax():
    # The review page computes nothing: its modules read sample folders through sampling.rows, so the
    # command starts at once instead of paying JAX's import (seconds; tens on a busy machine).
    code = "import sys, dpdmd_jax.review, dpdmd_jax.human.server; assert 'jax' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_schedule_every_prompt_once_per_pair_deterministic_and_randomised(folders):
    study = open_study(list(folders.values()), list(folders))
    items = schedule(study, "ann", seed=0)
    seen = [(it.prompt.index, it.pair) for it in items]
    pairs = list(itertools.combinations(range(3), 2))
    assert sorted(seen) == sorted((p.index, pair) for p in study.prompts for pair in pairs)  # each once
    assert [it.n for it in items] == list(range(len(items)))
    assert schedule(open_study(list(folders.values()), list(folders)), "ann", seed=0) == items  # a restart
    assert [(it.prompt.index, it.pair) for it in schedule(study, "bob", seed=0)] != seen  # another rater
    assert schedule(study, "ann", seed=1) != items
    assert {(it.left, it.right) in (it.pair, it.pair[::-1]) for it in items} == {True}
    lefts = [it.left == it.pair[0] for it in items]
    assert 0 < sum(lefts) < len(lefts)  # both placements occur (24 comparisons)
    # The placement is per (rater, prompt, pair of names): the same whatever order --samples gives.
    swapped = open_study(list(folders.values())[::-1], list(folders)[::-1])
    left_name = lambda s, its: {(it.prompt.index, s.names[it.left], s.names[it.right]) for it in its}
    assert left_name(swapped, schedule(swapped, "ann")) == left_name(study, items)


def test_prompts_without_all_seeds_are_left_out_and_named(tmp_path, folders):
    b = make_sample_folder(str(tmp_path / "B"), prompts=[0, 1, 2, 5], seeds=2, colour=1)
    os.remove(png_path(b, Job(1, 1)))  # a row without its PNG
    study = open_study([folders["A"], b], ["A", "B"])
    assert [p.index for p in study.prompts] == [0, 2, 5] and study.seeds == (0, 1)
    assert "left out 5 of 8 prompts" in study.left_out and "p00001 (B lacks seeds 1)" in study.left_out
    assert "p00003 (B has no row)" in study.left_out and "... and" not in study.left_out
    assert study.image(1, study.prompts[0], 1) == png_path(b, Job(0, 1))


def test_bad_input_one_line_each(tmp_path, folders):
    cases = [
        (([folders["A"]], None), "at least 2 sample folders"),
        (([folders["A"], folders["B"]], ["A"]), "1 --names for 2 --samples"),
        (([folders["A"], folders["B"]], ["A", "A"]), "names must differ"),
        (([folders["A"], str(tmp_path / "nothing")], None), "is not a folder"),
        (([folders["A"], str(tmp_path)], ["A", "B"]), "has no run.json"),
    ]
    other = make_sample_folder(str(tmp_path / "other"), prompts=2, seeds=2, text="another {p}")
    cases.append((([folders["A"], other], ["A", "other"]), "no prompt with all its seeds in common"))
    for (paths, names), message in cases:
        with pytest.raises(ReviewError, match=message) as e:
            open_study(paths, names)
        assert "\n" not in str(e.value)
    study = open_study([folders["A"], folders["B"]], ["A", "B"])
    record(str(tmp_path / "study"), study, seed=0)
    record(str(tmp_path / "study"), open_study(list(folders.values()), list(folders)), seed=0)  # a system added
    with pytest.raises(ReviewError, match=r"B was \S+/B \(now \S+/C\)"):
        record(str(tmp_path / "study"), open_study([folders["A"], folders["C"]], ["A", "B"]), seed=0)
    with pytest.raises(ReviewError, match="--seed was 0"):
        record(str(tmp_path / "study"), study, seed=1)
