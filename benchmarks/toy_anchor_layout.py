"""How much of the teacher's final layout does DP-DMD's diversity target carry, per anchor step K?

    python -m benchmarks.toy_anchor_layout                  # the flow teacher, straight-line target
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--shift", type=float, default=3.0, help="flow grid shift")
    p.add_argument("--family", default="mmdit", choices=["mmdit", "unet"],
                   help="the flow (MMDiT) or epsilon (UNet) toy teacher")
    p.add_argument("--target", default=None, choices=["line", "denoise"],
                   help="diversity target to read (default: line for the flow teacher, denoise for the UNet)")
    p.add_argument("--cfg", type=float, default=3.5)
    p.add_argument("--seeds", type=int, default=9)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--ks", default="1,2,3,5,10,15,20,25,30")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the shipped toy teacher)")
    p.add_argument("--auto", action="store_true", help="also run the trainer's anchor_k='auto' choice on this grid")
    args = p.parse_args()

    target = args.target or ("denoise" if args.family == "unet" else "line")
    if target not in schedule_of(args.family).targets:
        p.error(f"--target {target} is not a target of the {args.family} teacher's schedule")
    teacher = load_toy_teacher(args.teacher, family=args.family)
    if args.family == "unet":
        sigmas = teacher_grid("unet", args.steps)
    else:
        sigmas = flow.flow_match_sigmas(args.steps, args.shift)
    ids = eval_class_ids(args.seeds, args.repeats)
    eps = np.asarray(jax.random.normal(jax.random.key(0), (ids.size, 16, 16, 3)))
    final_images = sample_toy(teacher, eps, ids, sigmas, args.cfg)
    final, final_ok = layout(final_images)
    final_spread = metrics.layout_spread(final, args.seeds)
    final_dev = anchor.prompt_deviations(final_images, args.seeds)
    final_pixel_spread = float(np.sqrt(np.mean(np.square(final_dev))))

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
        pixel_ratio = float(np.sqrt(np.mean(np.square(anchor.prompt_deviations(x0, args.seeds))))) / final_pixel_spread
        rows.append([k, t_k, ok.mean(), *corr, *ratio, float(anchor.carried(x0, final_dev, args.seeds)), pixel_ratio])
        print(f"K={k}: level {t_k:g}, valid {ok.mean():.2f}", flush=True)

    head = ["K", "t_K", f"valid x0_{target}", "corr cx", "corr cy", "corr size",
            "spread ratio cx", "spread ratio cy", "spread ratio size", "carried (auto)",
            "pixel spread ratio"]
    level = "{:.3f}" if args.family == "mmdit" else "{:.0f}"  # flow sigma / DDPM timestep (-1: clean)
    cells = [[str(r[0]), level.format(r[1]), *(f"{v:.2f}" for v in r[2:])] for r in rows]
    grid = f"shift {args.shift:g}" if args.family == "mmdit" else "leading DDIM"
    print(f"\n{args.family} teacher T={args.steps} ({grid}, CFG {args.cfg:g}), target {target}; {ids.size} noises "
          f"({ids.size // args.seeds} prompts x {args.seeds} seeds); final samples valid {final_ok.mean():.2f}; "
          "corr = Pearson correlation with the final sample's layout (same noise, both valid); spread ratio = "
          f"within-prompt std of x0_{target}'s layout / the final samples'.\n")
    print(table(head, cells))
    if args.auto:
        auto_choice(args)


def auto_choice(args) -> int:
    """The trainer's `distill.anchor_k="auto"` choice for configs/toy.py[:unet] on this grid (in a
    scratch workdir); prints its curve and returns K."""
    import tempfile

    from configs import toy
    from dpdmd_jax.distill import trainer

    c = toy.get_config("unet" if args.family == "unet" else None)
    c.distill.anchor_k = "auto"
    c.teacher.steps, c.teacher.cfg_scale, c.teacher.shift = args.steps, args.cfg, args.shift
    c.distill.target = "denoise" if args.family == "unet" else (args.target or "line")
    if args.teacher:
        c.model.source = args.teacher
    setup = trainer.build(c)
    with tempfile.TemporaryDirectory() as workdir:
        trainer.check_workdir_config(workdir, c)
        return trainer.choose_anchor_k(setup, workdir, None)


if __name__ == "__main__":
    main()
