"""How much of the teacher's final layout does DP-DMD's diversity target carry, per anchor step K?

    python -m benchmarks.toy_anchor_layout                  # the flow teacher, straight-line target
    python -m benchmarks.toy_anchor_layout --shift 3,1,0.375 --auto --out DIR   # grids of three shifts, plot
    python -m benchmarks.toy_anchor_layout --family unet    # the epsilon teacher, x0 ("denoise") target

DP-DMD regresses the student's first step onto the straight line through the noise eps and the
teacher's anchor z_tK, i.e. onto the clean image x0_line(K) = eps - (eps - z_tK) / (1 - t_K). If
x0_line(K) already shows the layout (position, size) that the teacher's full T-step sample ends
with, the target tells the first step which layout this noise should get; if it shows a blurred
average, the target pulls every noise towards the average layout.

For the shipped toy teacher (T = 30, shift 3, CFG 3.5) and the toy eval prompts (24 prompts x 9
seeds), this runs the teacher to every K, forms x0_line(K), reads (cx, cy, size) back with the
toy's analytic detector, and reports per K: the fraction of x0_line images the detector accepts
as one clean object, the correlation of their layout with the final sample's layout (same noise),
and their within-prompt spread relative to the final samples' spread.

Each row also has the latent criterion of `distill.anchor_k="auto"` (`dpdmd_jax.distill.anchor`):
"carried", the share of the final samples' within-prompt variation (every pixel, no detector)
that the target reproduces, and the plain ratio of the two within-prompt pixel spreads, which
counts the target's amplified noise as diversity. `--auto` then runs the trainer's own choice for
the toy config on this grid (round 0's first prompts, `distill.auto_anchor` settings) and prints
its curve and K.

`--target denoise` reads the other diversity target instead: the teacher's own x0 prediction at
z_tK (one more guided teacher step, from t_K straight to clean: Euler to sigma 0 for the flow,
DDIM to abar 1 for VP, both exactly x0(z_tK)). It is the only target for the epsilon teacher
(`--family unet`: 30-step leading DDIM grid, no shift).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from benchmarks.common import table
from dpdmd_jax.diffusion import flow
from dpdmd_jax.distill import anchor
from dpdmd_jax.toy import metrics
from dpdmd_jax.toy.teacher import eval_class_ids, load_toy_teacher, sample_toy, schedule_of, teacher_grid


def layout(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cx, cy, size) [N, 3] and the detector's valid flag of each image."""
    det = metrics.detect(np.asarray(images))
    return metrics.layout_of(det), det["valid"]


HEAD = ["K", "t_K", "valid x0", "corr cx", "corr cy", "corr size", "spread ratio cx", "spread ratio cy",
        "spread ratio size", "carried (auto)", "pixel spread ratio"]


def measure(args, teacher, sigmas: np.ndarray, target: str) -> tuple[list[list[float]], float]:
    """One row per K of --ks (HEAD's columns), and the final samples' valid fraction."""
    ids = eval_class_ids(args.seeds, args.repeats)
    eps = np.asarray(jax.random.normal(jax.random.key(0), (ids.size, 16, 16, 3)))
    final_images = sample_toy(teacher, eps, ids, sigmas, args.cfg)
    final, final_ok = layout(final_images)
    final_spread = metrics.layout_spread(final, args.seeds)
    final_dev = anchor.prompt_deviations(final_images, args.seeds)
    pixel_spread = lambda dev: float(np.sqrt(np.mean(np.square(dev))))
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        z_k = np.asarray(sample_toy(teacher, eps, ids, sigmas[: k + 1], args.cfg))
        t_k = float(sigmas[k])
        if target == "line":
            x0 = eps - (eps - z_k) / (1.0 - t_k)  # the clean end of the line DP-DMD's first step learns
        else:  # one guided teacher step from t_K to clean lands on the teacher's x0(z_tK)
            x0 = np.asarray(sample_toy(teacher, z_k, ids, [t_k, sigmas[-1]], args.cfg))
        lay, ok = layout(x0)
        both = ok & final_ok
        corr = [np.corrcoef(lay[both, i], final[both, i])[0, 1] if both.sum() > 2 else float("nan") for i in range(3)]
        ratio = metrics.layout_spread(lay, args.seeds) / final_spread
        pixel_ratio = pixel_spread(anchor.prompt_deviations(x0, args.seeds)) / pixel_spread(final_dev)
        values = [ok.mean(), *corr, *ratio, anchor.carried(x0, final_dev, args.seeds), pixel_ratio]
        rows.append([k, t_k, *(float(v) for v in values)])  # plain floats: the rows go to JSON
        print(f"K={k}: level {t_k:g}, valid {ok.mean():.2f}", flush=True)
    return rows, float(final_ok.mean())


def plot(results: dict[str, list[list[float]]], path: str) -> None:
    """Layout spread ratios and `carried` against the anchor's sigma, one marker per shift: if the
    layout is decided at a sigma (not at a grid step), the shifts' points fall on one curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    columns = (("spread ratio cx", "position spread ratio (x0 target / final)"),
               ("spread ratio size", "size spread ratio (x0 target / final)"),
               ("carried (auto)", "carried: anchor_k='auto' criterion"))
    for ax, (col, title) in zip(axes, columns):
        i = HEAD.index(col)
        for (name, rows), marker in zip(results.items(), "os^vD"):
            ax.plot([r[1] for r in rows], [r[i] for r in rows], marker=marker, label=name)
            k5 = [r for r in rows if r[0] == 5]
            if k5:
                ax.annotate("K=5", (k5[0][1], k5[0][i]), textcoords="offset points", xytext=(4, -12), fontsize=8)
        ax.set_xlabel("sigma of the anchor (t_K)")
        ax.set_title(title)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--shift", default="3", help="flow grid shift(s), comma-separated, e.g. 3,1,0.375")
    p.add_argument("--family", default="mmdit", choices=["mmdit", "unet"],
                   help="the flow (MMDiT) or epsilon (UNet) toy teacher")
    p.add_argument("--target", default=None, choices=["line", "denoise"],
                   help="diversity target to read (default: line for the flow teacher, denoise for the UNet)")
    p.add_argument("--cfg", type=float, default=3.5)
    p.add_argument("--seeds", type=int, default=9)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--ks", default="1,2,3,5,10,15,20,25,30")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the shipped toy teacher)")
    p.add_argument("--auto", action="store_true", help="also run the trainer's anchor_k='auto' choice on each grid")
    p.add_argument("--out", default=None, help="also write anchor_vs_sigma.json / .png into this folder")
    args = p.parse_args()

    target = args.target or ("denoise" if args.family == "unet" else "line")
    if target not in schedule_of(args.family).targets:
        p.error(f"--target {target} is not a target of the {args.family} teacher's schedule")
    teacher = load_toy_teacher(args.teacher, family=args.family)
    shifts = [float(x) for x in args.shift.split(",")] if args.family == "mmdit" else [None]
    results, chosen = {}, {}
    for shift in shifts:
        sigmas = teacher_grid("unet", args.steps) if shift is None else flow.flow_match_sigmas(args.steps, shift)
        rows, valid = measure(args, teacher, sigmas, target)
        name = "leading DDIM" if shift is None else f"shift {shift:g}"
        results[name] = rows
        level = "{:.3f}" if shift is not None else "{:.0f}"  # flow sigma / DDPM timestep (-1: clean)
        cells = [[str(r[0]), level.format(r[1]), *(f"{v:.2f}" for v in r[2:])] for r in rows]
        print(f"\n{args.family} teacher T={args.steps} ({name}, CFG {args.cfg:g}), target {target}; "
              f"{len(eval_class_ids(args.seeds, args.repeats))} noises ({6 * args.repeats} prompts x {args.seeds} "
              f"seeds); final samples valid {valid:.2f}; corr = Pearson correlation with the final sample's layout "
              f"(same noise, both valid); spread ratio = within-prompt std of x0_{target}'s layout / the final "
              "samples'.\n")
        print(table(HEAD, cells))
        if args.auto:
            chosen[name] = auto_choice(args, shift)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "anchor_vs_sigma.json"), "w") as f:
            json.dump({"columns": HEAD, "rows": results, "auto_k": chosen}, f, indent=1)
        plot(results, os.path.join(args.out, "anchor_vs_sigma.png"))


def auto_choice(args, shift: float | None) -> int:
    """The trainer's `distill.anchor_k="auto"` choice for configs/toy.py[:unet] on this grid (in a
    scratch workdir); prints its curve and returns K."""
    import tempfile

    from configs import toy
    from dpdmd_jax.config import apply_flow_shift
    from dpdmd_jax.run import setup as setup_lib
    from dpdmd_jax.run import workdir as workdir_lib

    c = toy.get_config("unet" if args.family == "unet" else None)
    c.distill.anchor_k = "auto"
    c.teacher.steps, c.teacher.cfg_scale = args.steps, args.cfg
    if shift is not None:
        apply_flow_shift(c, shift)  # the grids of one shift, as the `:shiftS` variant sets them
    c.distill.target = "denoise" if args.family == "unet" else (args.target or "line")
    if args.teacher:
        c.model.source = args.teacher
    with tempfile.TemporaryDirectory() as workdir:
        workdir_lib.check_workdir_config(workdir, c)
        return setup_lib.build(c, workdir=workdir).distiller.anchor_k


if __name__ == "__main__":
    main()
