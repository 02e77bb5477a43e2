"""The toy's K sweep at several flow shifts, side by side: layout diversity against K, one line per shift,
plain DMD as a band, and each DP-DMD arm's paired gain over DMD against the sigma its anchor sits at.

    python -m benchmarks.toy_shift_sweep      # shifts 3, 1, 0.375 from their toy_diversity results

It trains nothing: it reads the `results_main_auto.json` that `benchmarks/toy_diversity.py --arms main,auto`
wrote for each shift (`--variant shiftS`; shift 3 is the toy's own grid) and writes `sweep.md`, `sweep.json`
and `k_sweep.png` to --out. The anchor's sigma t_K is step K of the teacher's 30-step grid at that shift.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from benchmarks import common
from dpdmd_jax.diffusion.flow import flow_match_sigmas

RESULTS = "benchmarks/results"
DEFAULT_SHIFTS = ",".join(f"{s}={RESULTS}/toy_diversity_shift{s}" for s in ("3", "1", "0.375"))
METRIC = "diversity_layout"


def anchor_ks(name: str, row: dict, seeds: int) -> list[int]:
    """Each seed's K of a DP-DMD arm: from its name ("DP-DMD K=10"), or the K each seed's run chose
    ("DP-DMD K=auto": the choice reads round 0's prompts and noises, so seeds may differ by a step)."""
    k = name.split("K=")[1]
    return [int(k)] * seeds if k != "auto" else [int(x) for x in row["anchor_k"]]


def sweep(shift: float, results: dict, teacher_steps: int = 30) -> dict:
    """One shift's arms: K, t_K, the metric's mean / std over seeds and each seed's paired gain over DMD."""
    grid = flow_match_sigmas(teacher_steps, shift)
    seeds = sorted(results["DMD"]["per_seed"], key=int)
    dmd = [results["DMD"]["per_seed"][s][METRIC] for s in seeds]
    arms = []
    for name, row in results.items():
        if not name.startswith("DP-DMD"):
            continue
        if sorted(row["per_seed"], key=int) != seeds:
            raise ValueError(f"shift {shift}, {name}: seeds {sorted(row['per_seed'])}, DMD's {seeds}")
        ks = anchor_ks(name, row, len(seeds))
        values = [row["per_seed"][s][METRIC] for s in seeds]
        gain = [v - d for v, d in zip(values, dmd)]
        arms.append(dict(arm=name, k=float(np.mean(ks)), ks=ks, t_k=float(np.mean(grid[ks])),
                         t_ks=[float(grid[k]) for k in ks], auto=name.endswith("auto"), mean=float(np.mean(values)),
                         std=float(np.std(values)), gain=gain, gain_mean=float(np.mean(gain)),
                         wins=sum(g > 0 for g in gain)))
    arms.sort(key=lambda a: (a["k"], a["auto"]))
    return dict(shift=shift, seeds=[int(s) for s in seeds], teacher=results["teacher"][METRIC],
                dmd=results["DMD"][METRIC], dmd_per_seed=dmd, arms=arms)


def markdown(sweeps: list[dict]) -> str:
    rows = []
    for s in sweeps:
        rows.append([f"{s['shift']:g}", "teacher", "", "", f"{s['teacher'][0]:.3f} ± {s['teacher'][1]:.3f}", "", ""])
        rows.append([f"{s['shift']:g}", "DMD", "", "", f"{s['dmd'][0]:.3f} ± {s['dmd'][1]:.3f}", "", ""])
        for a in s["arms"]:
            k = "/".join(map(str, a["ks"])) if len(set(a["ks"])) > 1 else str(a["ks"][0])
            label = f"DP-DMD K={k}" + (" (auto)" if a["auto"] else "")
            rows.append([f"{s['shift']:g}", label, k, f"{a['t_k']:.3f}", f"{a['mean']:.3f} ± {a['std']:.3f}",
                         " / ".join(f"{g:+.3f}" for g in a["gain"]) + f" (mean {a['gain_mean']:+.3f})",
                         f"{a['wins']} of {len(a['gain'])}"])
    seeds = "/".join(map(str, sweeps[0]["seeds"]))
    return common.table(["shift", "arm", "K", "t_K", f"{METRIC} (mean ± std)", f"minus DMD, seed {seeds}",
                         "seeds won"], rows)


def plot(sweeps: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    for s, colour in zip(sweeps, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        fixed = [a for a in s["arms"] if not a["auto"]]
        auto = [a for a in s["arms"] if a["auto"]]
        label = f"shift {s['shift']:g}"
        ax_k.errorbar([a["k"] for a in fixed], [a["mean"] for a in fixed], [a["std"] for a in fixed], color=colour,
                      marker="o", capsize=3, label=f"DP-DMD, {label}")
        m, sd = s["dmd"]
        ax_k.axhspan(m - sd, m + sd, color=colour, alpha=0.12, lw=0)
        ax_k.axhline(m, color=colour, ls="--", lw=1, label=f"DMD (mean ± std), {label}")
        ax_k.axhline(s["teacher"][0], color=colour, ls=":", lw=1)
        for a in auto:
            ax_k.errorbar([a["k"]], [a["mean"]], [a["std"]], color=colour, marker="*", ms=14, capsize=3, ls="none")
        for a in s["arms"]:  # per seed paired gains (at each seed's own anchor), and their mean
            ax_t.scatter(a["t_ks"], a["gain"], color=colour, s=12, alpha=0.5, marker="*" if a["auto"] else "o")
        ax_t.plot([a["t_k"] for a in fixed], [a["gain_mean"] for a in fixed], color=colour, marker="o", label=label)
        ax_t.scatter([a["t_k"] for a in auto], [a["gain_mean"] for a in auto], color=colour, marker="*", s=160)
    ax_k.set_xscale("log")
    ks = sorted({k for s in sweeps for a in s["arms"] if not a["auto"] for k in a["ks"]})
    ax_k.set_xticks(ks, [str(k) for k in ks])
    ax_k.set_xlabel("anchor step K of 30 (log scale; star: distill.anchor_k=auto)")
    ax_k.set_ylabel("layout diversity of the 4-step student")
    ax_k.set_title("Layout diversity vs K (dotted: teacher; band: DMD)")
    ax_k.legend(fontsize=7, ncol=2)
    ax_t.axhline(0.0, color="black", lw=0.8)
    ax_t.set_xlabel("sigma of the anchor, t_K")
    ax_t.set_ylabel("DP-DMD minus DMD, layout diversity (same seed)")
    ax_t.set_title("Paired gain over DMD vs the anchor's sigma (dots: seeds; line: mean)")
    ax_t.invert_xaxis()  # generation runs from sigma 1 to 0
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shifts", default=DEFAULT_SHIFTS, help="SHIFT=RESULTS_DIR pairs, comma-separated")
    p.add_argument("--tag", default="main_auto", help="which results_TAG.json of each folder")
    p.add_argument("--out", default=f"{RESULTS}/toy_shift_sweep")
    args = p.parse_args()
    sweeps = []
    for pair in args.shifts.split(","):
        shift, folder = pair.split("=")
        path = os.path.join(folder, f"results_{args.tag}.json")
        if not os.path.exists(path):
            p.error(f"{path} does not exist: run `python -m benchmarks.toy_diversity --variant shift{shift} "
                    f"--arms main,auto --out {folder}` first")
        with open(path) as f:
            sweeps.append(sweep(float(shift), json.load(f)))
    text = markdown(sweeps)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(sweeps, f, indent=2)
    plot(sweeps, os.path.join(args.out, "k_sweep.png"))
    print(f"wrote {args.out}/sweep.md, sweep.json, k_sweep.png")


if __name__ == "__main__":
    main()
