"""The study's numbers from answers.jsonl: per question and per pair of systems the win rate with a
Wilson interval, and a Bradley-Terry ranking over all systems.

Ties: a tie counts as half a win for each side, both in the win rate, (wins + ties / 2) / comparisons,
and in Bradley-Terry; the tie count is also reported on its own. Each (rater, prompt, pair, question)
counts once, with the rater's last answer.

Bradley-Terry: P(i beats j) = p_i / (p_i + p_j), fitted by maximum likelihood with Hunter's (2004) MM
iteration p_i <- W_i / sum_j n_ij / (p_i + p_j) (W_i: i's wins, n_ij: comparisons of i and j),
strengths normalised to sum to 1. The maximum exists only when the graph "i won or tied against j"
is strongly connected; otherwise (e.g. a system that never won) strengths drift to 0 and only their
order means something, which `finite` says.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from dpdmd_jax.human.answers import latest, read_answers
from dpdmd_jax.human.study import QUESTIONS, ReviewError
from dpdmd_jax.tables import markdown_table

CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # 1.95996...
TIES = "a tie counts as half a win for each side (win rates and Bradley-Terry); ties are also counted alone"


def wilson(successes: float, n: float, z: float = Z) -> tuple[float, float]:
    """Wilson's score interval for the proportion successes / n (successes may hold halves: ties);
    (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def bradley_terry(wins: np.ndarray, iters: int = 10_000, tol: float = 1e-12) -> np.ndarray:
    """Strengths (summing to 1) from wins[i, j] = i's wins over j (a tie adds 1/2 to both), by the MM
    iteration; a system never compared gets nan."""
    wins = np.asarray(wins, np.float64)
    games = wins + wins.T
    played = games.sum(1) > 0
    w = wins.sum(1)
    p = np.where(played, 1.0 / max(played.sum(), 1), np.nan)
    if not played.any():
        return p
    for _ in range(iters):
        pp = np.nan_to_num(p[:, None] + p[None, :])
        denom = np.divide(games, pp, out=np.zeros_like(games), where=games > 0).sum(1)
        new = np.where(played, np.divide(w, denom, out=np.zeros_like(w), where=denom > 0), np.nan)
        new /= np.nansum(new)
        if np.nanmax(np.abs(new - p)) < tol:
            return new
        p = new
    return p


def finite(wins: np.ndarray) -> bool:
    """Whether the Bradley-Terry maximum exists: among the systems compared, every one reaches every
    other along "won or tied against" edges (strongly connected)."""
    wins = np.asarray(wins)
    active = np.flatnonzero((wins + wins.T).sum(1) > 0)
    reach = (wins > 0)[np.ix_(active, active)] | np.eye(len(active), dtype=bool)
    for k in range(len(active)):  # transitive closure (Warshall)
        reach |= reach[:, [k]] & reach[[k], :]
    return bool(reach.all())


def summarize(rows: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """The summary of answer `rows` over systems `names` (default: every system in the rows, in order
    of appearance)."""
    counted = list(latest(rows).values())
    names = list(names or dict.fromkeys(n for r in counted for n in r["pair"]))
    where = {n: i for i, n in enumerate(names)}
    unknown = sorted({n for r in counted for n in r["pair"]} - set(names))
    if unknown:
        raise ReviewError(f"the answers name systems not in --names: {', '.join(unknown)}")
    raters: dict[str, int] = {}
    for r in counted:
        raters[r["rater"]] = raters.get(r["rater"], 0) + 1
    out = dict(answers=len(counted), raters=raters, ties=TIES, confidence=CONFIDENCE, questions={})
    for q in QUESTIONS:
        wins = np.zeros((len(names), len(names)))
        ties = np.zeros_like(wins)
        for r in (r for r in counted if r["question"] == q):
            a, b = (where[n] for n in r["pair"])
            if r["winner"] == "tie":
                ties[a, b] += 1
                ties[b, a] += 1
            else:
                wins[where[r["winner"]], b if where[r["winner"]] == a else a] += 1
        pairs = []
        for a, b in itertools.combinations(range(len(names)), 2):
            n = wins[a, b] + wins[b, a] + ties[a, b]
            if n == 0:
                continue
            score = wins[a, b] + ties[a, b] / 2
            lo, hi = wilson(score, n)
            pairs.append(dict(a=names[a], b=names[b], comparisons=int(n), a_wins=int(wins[a, b]),
                              b_wins=int(wins[b, a]), ties=int(ties[a, b]), a_win_rate=score / n, a_ci=[lo, hi]))
        half = wins + ties / 2
        strength = bradley_terry(half)
        order = sorted((i for i in range(len(names)) if not np.isnan(strength[i])), key=lambda i: -strength[i])
        ranking = [dict(rank=k + 1, system=names[i], strength=float(strength[i])) for k, i in enumerate(order)]
        out["questions"][q] = dict(question=QUESTIONS[q], pairs=pairs, bradley_terry=ranking,
                                   finite=finite(half) if order else False,
                                   not_compared=[names[i] for i in range(len(names)) if np.isnan(strength[i])])
    return out


def markdown(summary: dict) -> str:
    """The summary as Markdown: per question a table of the pairs and one of the ranking."""
    raters = ", ".join(f"{r} {n}" for r, n in summary["raters"].items()) or "none yet"
    pct = f"{summary['confidence']:.0%}"
    lines = ["# Human study", "",
             f"Answers counted: {summary['answers']} (per rater: {raters}); a changed answer counts once, as last "
             "given. Win rate of A = (A's wins + ties / 2) / "
             f"comparisons, with its {pct} Wilson interval; {summary['ties']}. Bradley-Terry strengths "
             "(MM iteration, ties as half a win each) sum to 1."]
    for q, s in summary["questions"].items():
        lines += ["", f"## {q}: {s['question']}", ""]
        if not s["pairs"]:
            lines.append("No answers yet.")
            continue
        rows = [[f"{p['a']} vs {p['b']}", p["comparisons"], p["a_wins"], p["b_wins"], p["ties"],
                 f"{p['a_win_rate']:.3f}", f"{p['a_ci'][0]:.3f} - {p['a_ci'][1]:.3f}"] for p in s["pairs"]]
        lines += [markdown_table(["A vs B", "comparisons", "A wins", "B wins", "ties", "A win rate", f"{pct} CI"],
                                 rows), ""]
        lines.append(markdown_table(["rank", "system", "Bradley-Terry strength"],
                                    [[r["rank"], r["system"], f"{r['strength']:.4f}"] for r in s["bradley_terry"]]))
        if not s["finite"]:
            lines += ["", "Some system never won or tied against the others it met: its strength tends to 0 "
                      "(or theirs to 1); only the order is meaningful."]
        if s["not_compared"]:
            lines += ["", f"Not compared yet: {', '.join(s['not_compared'])}."]
    return "\n".join(lines) + "\n"


def study_names(out: str) -> list[str] | None:
    """The systems recorded in `out`/study.json by the review server (None when there is none)."""
    path = os.path.join(out, "study.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return list(json.load(f)["systems"])


def write_summary(out: str, names: Sequence[str] | None = None) -> dict:
    """Reads `out`/answers.jsonl, writes `out`/summary.md and summary.json, returns the summary. The
    systems are `names`, else those of `out`/study.json, else those in the answers."""
    path = os.path.join(out, "answers.jsonl")
    if not os.path.isfile(path):
        raise ReviewError(f"{path} does not exist: --out must be the folder the review server wrote its answers to")
    summary = summarize(read_answers(path), names or study_names(out))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(summary))
    return summary
