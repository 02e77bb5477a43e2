"""Toy study: does DP-DMD keep more of the teacher's diversity than plain DMD?

Trains 4-step students on the embedded toy (configs/toy.py) for several arms and training seeds
with the real trainer, evaluates them with the toy metrics (R = 9 seeds per prompt), and prints /
writes a table (mean +- std over seeds), a plot and sample grids. Every arm starts from the toy
default (shift 0.375, the matched timeline) or from --variant; results go to
benchmarks/results/toy_diversity_VARIANT (the default's: toy_diversity_shift0.375).

  python -m benchmarks.toy_diversity                       # main arms: DMD, DP-DMD K in {1,3,5,10,T}
  python -m benchmarks.toy_diversity --arms main,auto      # and distill.anchor_k="auto"
  python -m benchmarks.toy_diversity --variant shift3      # on SD3's shift-3 grid as it is
  python -m benchmarks.toy_diversity --variant shift1 --arms main,auto   # an intermediate shift
  python -m benchmarks.toy_diversity --variant shift3 --arms study   # lambda sweep, wider first step
  python -m benchmarks.toy_diversity --variant shift3 --arms study --only "DMD wide grid;DP-DMD K=30 wide grid"
  python -m benchmarks.toy_diversity --variant unet --arms eps   # epsilon toy: DMD, DP-DMD K=1,5,10,T; 100 rounds
  python -m benchmarks.toy_diversity --arms main,auto --only "DMD;DP-DMD K=auto" --seeds 0,1,2,3,4 --tag 5seeds
  python -m benchmarks.toy_diversity --arms main,auto,baselines --only "DMD;DP-DMD K=auto;DMD + regression w=0.25;\
      DMD + GAN w=0.005;DP-DMD K=auto + GAN w=0.005" --seeds 0,1,2,3,4 --tag baselines   # the paper's baselines
  python -m benchmarks.toy_diversity --arms main,auto,lora --only "DMD;DP-DMD K=auto;DMD LoRA r=4;DP-DMD K=auto \
      LoRA r=4;DMD LoRA r=16;DP-DMD K=auto LoRA r=16" --seeds 0,1,2 --tag lora   # LoRA vs full fine-tuning
  # both cores, one run per core, then the table:
  taskset -c 0 python -m benchmarks.toy_diversity --shard 0/2 & taskset -c 1 python -m benchmarks.toy_diversity \
      --shard 1/2; wait; python -m benchmarks.toy_diversity
  python -m benchmarks.toy_shift_sweep                     # then: the K sweep of several shifts in one plot

Runs are resumable (each arm/seed is a normal workdir); finished ones are only read back, after a check
that they ran the same setting (summary.json records it).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from benchmarks import common

ARGS = None  # the parsed command line (main)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: default --out is under it
# The compile cache must be configured before jax is imported (configs.toy imports dpdmd_jax).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/dpdmd_jax_bench_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")

from configs.toy import WIDE_STUDENT_SIGMAS as WIDE_GRID  # noqa: E402  first step 1 -> 0.75, not 1 -> 0.8577

T = 30
PAIRS, PAIR_SEEDS = "{pairs}", 16  # an arm's pair cache: made once per --out (`pair_cache`), 6 prompts x 16 seeds

ARMS = {
    "main": {
        "DMD": {"distill.lambda_div": 0.0},
        **{f"DP-DMD K={k}": {"distill.anchor_k": k} for k in (1, 3, 5, 10, T)},
    },
    # The epsilon toy (configs/toy.py:unet, x0 target): the arms.
    "eps": {
        "DMD": {"distill.lambda_div": 0.0},
        **{f"DP-DMD K={k}": {"distill.anchor_k": k} for k in (1, 5, 10, T)},
    },
    # distill.anchor_k="auto": the trainer picks K from a teacher pass (dpdmd_jax.distill.anchor).
    "auto": {"DP-DMD K=auto": {"distill.anchor_k": "auto"}},
    # LoRA student and fake score (alpha = rank) over the frozen teacher, against the full fine-tuning
    # of the "main" / "auto" arms: same lr, rounds and everything else.
    "lora": {f"{method} LoRA r={r}": {**overrides, "student.lora.rank": r, "fake.lora.rank": r}
             for r in (4, 16)
             for method, overrides in (("DMD", {"distill.lambda_div": 0.0}),
                                       ("DP-DMD K=auto", {"distill.anchor_k": "auto"}))},
    # The same LoRA arms at a larger learning rate (the toy's is 1e-4 for both networks): LoRA
    # fine-tuning usually runs at a higher one, since B A starts at zero and moves slowly.
    "lora_lr": {f"{method} LoRA r={r} lr={lr}": {**overrides, "student.lora.rank": r, "fake.lora.rank": r,
                                                  "optim.student.lr": lr, "optim.fake.lr": lr}
                for r in (4,) for lr in (4e-4,)
                for method, overrides in (("DMD", {"distill.lambda_div": 0.0}),
                                          ("DP-DMD K=auto", {"distill.anchor_k": "auto"}))},
    # The paper's baselines (issue 22): DMD v1's regression to the teacher's sample (L2 on the toy's
    # images) and DMD2's GAN on the toy's real images, each at a small sweep of its weight so the
    # comparison is fair to them, and DP-DMD with the GAN on too.
    "baselines": {
        **{f"DMD + regression w={w}": {"distill.lambda_div": 0.0, "regression.weight": w}
           for w in (0.05, 0.25, 1.0, 4.0, 16.0)},
        **{f"DMD + GAN w={w}": {"distill.lambda_div": 0.0, "gan.weight": w} for w in (1e-3, 5e-3, 2e-2)},
        "DP-DMD K=auto + GAN w=0.005": {"distill.anchor_k": "auto", "gan.weight": 5e-3},
        # DMD v1's regression on a finite precomputed set, as at full size: the teacher's samples of the
        # toy's 6 prompts x PAIR_SEEDS seeds (`pair_cache`), instead of a fresh teacher sample each round.
        **{f"DMD + regression w={w}, {PAIR_SEEDS * 6} pairs": {"distill.lambda_div": 0.0, "regression.weight": w,
                                                                "regression.pairs": PAIRS} for w in (1.0, 4.0)},
    },
    "study": {
        "DP-DMD K=5 lambda=0.5": {"distill.anchor_k": 5, "distill.lambda_div": 0.5},
        "DP-DMD K=5 lambda=2": {"distill.anchor_k": 5, "distill.lambda_div": 2.0},
        "DMD wide grid": {"distill.lambda_div": 0.0, "student.sigmas": WIDE_GRID},
        "DP-DMD K=5 wide grid": {"distill.anchor_k": 5, "student.sigmas": WIDE_GRID},
        "DP-DMD K=30 wide grid": {"distill.anchor_k": T, "student.sigmas": WIDE_GRID},
    },
}
COLUMNS = ["diversity_layout", "diversity_pixel", "spread_cx", "spread_cy", "spread_size", "adherence",
           "colour_acc", "valid", "frechet_layout", "render_residual"]


def make_config(overrides: dict, seed: int, rounds: int, teacher: str | None):
    from configs import toy
    from dpdmd_jax.config import override

    c = toy.get_config(ARGS.variant if ARGS else None)
    c.seed = seed
    c.num_rounds = rounds  # logging / checkpoint / sample cadence stay the toy default's
    if teacher:
        c.model.source = teacher
    if overrides.get("regression.pairs") == PAIRS:
        overrides = {**overrides, "regression.pairs": pair_cache(c)}
    return override(c, overrides)


def pair_cache(c) -> str:
    """The teacher's pair cache (its samples of the toy's prompts x PAIR_SEEDS seeds, root seed 0) under
    --out, written by the first arm that needs it; every training seed regresses on the same pairs."""
    from dpdmd_jax.run import sample as run_sample

    out = os.path.join(ARGS.out if ARGS else ROOT, f"pairs_{PAIR_SEEDS}seeds")
    latents = os.path.join(out, "latents")
    if not os.path.isdir(latents) or len(os.listdir(latents)) < 6 * PAIR_SEEDS:  # else finished: only read
        import jax

        run_sample.sample(c, out, sampler="teacher", pairs=True, seeds=PAIR_SEEDS, devices=jax.devices()[:1])
    return out


def workdir_of(out: str, name: str, seed: int) -> str:
    return os.path.join(out, name.replace(" ", "_").replace("=", ""), f"seed{seed}")


def setting_of(c) -> dict:
    """What makes two runs the same experiment, read from `c` (a ConfigDict, or a run's config.json as a
    dict) through its backbone's schedule, so fields a family ignores (a flow shift for the UNet, the anchor
    of plain DMD) do not count. Each summary.json records it, and a folder of finished runs is never read
    back as the results of another setting (e.g. after a default changed)."""
    import ml_collections

    from dpdmd_jax import backbones

    c = ml_collections.ConfigDict(c) if isinstance(c, dict) else c
    schedule = backbones.backbone_class(c.backbone).schedule
    levels = schedule.training_levels(c.dmd)
    plain = c.distill.lambda_div == 0  # plain DMD: no anchor, no target
    rounded = lambda x: [round(float(v), 6) for v in x]
    return {"backbone": c.backbone, "seed": c.seed, "teacher.cfg_scale": c.teacher.cfg_scale,
            "teacher_grid": rounded(schedule.teacher_grid(c.teacher)),
            "student_grid": rounded(schedule.student_grid(c.student)),
            "dmd_levels": rounded([levels.min(), levels.max(), levels.size]),
            "distill.lambda_div": c.distill.lambda_div,
            "distill.anchor_k": None if plain else c.distill.anchor_k,
            "distill.target": None if plain else c.distill.target,
            **_lora_setting(c), **_baseline_setting(c)}


def _baseline_setting(c) -> dict:
    """The regression / GAN terms, only for runs that have them (other runs' setting is unchanged)."""
    regression, gan = c.get("regression"), c.get("gan")
    out = {}
    if regression and regression.weight:
        out["regression"] = [regression.weight, regression.distance]
        if regression.get("pairs"):  # a pair cache: how many pairs (its folder differs between checkouts)
            out["regression.pairs"] = len(os.listdir(os.path.join(regression.pairs, "latents")))
    if gan and gan.weight:
        out["gan"] = [gan.weight, gan.cls_weight, gan.real, gan.block, gan.head_width]
    return out


def _lora_setting(c) -> dict:
    """LoRA ranks and alphas, only for LoRA runs (full fine-tuning's setting is what it always was)."""
    roles = {role: c[role].get("lora") if role in c else None for role in ("student", "fake")}
    if not any(lora and lora.rank for lora in roles.values()):
        return {}
    return {f"{role}.lora": [lora.rank, lora.alpha] for role, lora in roles.items()}


def run_one(name: str, overrides: dict, seed: int, rounds: int, out: str, teacher: str | None) -> dict:
    """Trains (or resumes) one arm/seed and returns its summary; a finished run is only read back, after
    checking that it ran this arm's setting."""
    from dpdmd_jax.distill import anchor
    from dpdmd_jax.run import train as run_train

    workdir = workdir_of(out, name, seed)
    summary_path = os.path.join(workdir, "summary.json")
    c = make_config(overrides, seed, rounds, teacher)
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        ran, wanted = summary.get("setting"), setting_of(c)
        if ran is not None and ran != wanted:
            short = lambda v: str(v) if len(str(v)) < 40 else str(v)[:36] + " ..."
            diff = ", ".join(f"{k}: {short(ran.get(k))} -> {short(v)}" for k, v in wanted.items() if ran.get(k) != v)
            raise SystemExit(f"{workdir} holds a finished run of another setting ({diff}); pass the --variant it "
                             "ran with, or another --out")
        if summary.get("rounds") == rounds:
            return summary
    _share_teacher_metrics(out, seed, workdir)
    t0 = time.time()
    summary = run_train.train(c, workdir)
    summary["wall_s"] = time.time() - t0
    summary["setting"] = setting_of(c)
    if c.distill.anchor_k == "auto" and c.distill.lambda_div:  # the K the run chose, for tables and plots
        summary["anchor_k"] = anchor.recorded_k(workdir)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _share_teacher_metrics(out: str, seed: int, workdir: str) -> None:
    """The teacher's eval depends only on the training seed (its noise is seed + 777), so arms of one
    seed reuse the first arm's teacher_metrics.json instead of sampling the T-step teacher again."""
    import glob
    import shutil

    target = os.path.join(workdir, "teacher_metrics.json")
    found = sorted(glob.glob(os.path.join(out, "*", f"seed{seed}", "teacher_metrics.json")))
    if found and not os.path.exists(target):
        os.makedirs(workdir, exist_ok=True)
        shutil.copyfile(found[0], target)


def aggregate(results: list[dict], who: str, seeds: list[int], previous: dict | None = None) -> dict:
    """Mean and (population) std over seeds of each metric, plus the per-seed values ("per_seed"), so
    a later run can add seeds without the workdirs. `previous`: the aggregate of earlier seeds from a
    results file without per-seed values (see --extend); it must cover exactly 2 seeds, whose values
    are then exactly mean - std and mean + std (which is which does not change a mean or a std)."""
    rows = [r[who] for r in results]
    per_seed = {str(s): {k: float(r[k]) for k in COLUMNS} for s, r in zip(seeds, rows)}
    out = {}
    for k in COLUMNS:
        values = [r[k] for r in rows]
        if previous is not None:
            m, sd = previous[k]
            values += [m - sd, m + sd]
        out[k] = (float(np.mean(values)), float(np.std(values)))
    out["nfe"] = rows[0]["nfe"]
    if "anchor_k" in results[0]:  # distill.anchor_k="auto": the K each seed's run chose
        out["anchor_k"] = [r["anchor_k"] for r in results]
    out["wall_s"] = float(np.nanmean([r.get("wall_s", np.nan) for r in results]))
    out["per_seed"] = per_seed
    return out


def table(agg: dict[str, dict]) -> str:
    cols = ["nfe", *COLUMNS, "wall_s"]
    rows = [[name, *(f"{row[k][0]:.3f} ± {row[k][1]:.3f}" if isinstance(row[k], tuple) else f"{row[k]:.0f}"
                     for k in cols)] for name, row in agg.items()]
    return common.table(["arm", *cols], rows)


PAIRED = ("diversity_layout", "diversity_pixel", "spread_size", "adherence", "frechet_layout")


def paired_table(per_arm: dict[str, list[dict]], seeds: list[int], base: str = "DMD") -> str:
    """Each arm minus `base` on the same training seed (same data order and noise), per seed."""
    rows = []
    for name, results in per_arm.items():
        if name == base or base not in per_arm:
            continue
        diffs = [[r["student"][k] - b["student"][k] for r, b in zip(results, per_arm[base])] for k in PAIRED]
        rows.append([name, *(" / ".join(f"{d:+.3f}" for d in ds) for ds in diffs)])
    return common.table([f"arm minus {base} (seeds {'/'.join(map(str, seeds))})", *PAIRED], rows)


def plot(agg: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(agg)
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.5))
    keys = ["diversity_layout", "diversity_pixel", "spread_size", "adherence (quality)",
            "frechet_layout (quality, lower is better)"]
    for ax, label in zip(axes, keys):
        key = label.split(" ")[0]
        means = [agg[n][key][0] for n in names]
        stds = [agg[n][key][1] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3,
               color=["grey" if n == "teacher" else "tab:blue" if "DP" in n else "tab:orange" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


TRADEOFF = (("frechet_layout", "Frechet (layout), lower is better"), ("adherence", "adherence"),
            ("valid", "validity"))


def tradeoff_plot(agg: dict[str, dict], path: str) -> None:
    """The paper's trade-off figure: layout diversity against each quality measure, one point per arm
    (mean over training seeds, error bars one std over seeds on both axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TRADEOFF), figsize=(6 * len(TRADEOFF), 5))
    colours = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes, TRADEOFF):
        for i, (name, row) in enumerate(agg.items()):
            (x, dx), (y, dy) = row["diversity_layout"], row[key]
            ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="s" if name == "teacher" else "o", capsize=3,
                        color="black" if name == "teacher" else colours(i % 10), label=name)
        ax.set_xlabel("layout diversity (higher is more diverse)")
        ax.set_ylabel(label)
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_grids(out: str, arms: dict) -> None:
    """Seed-0 student sample grid of each arm (from its TensorBoard-free sampler) as PNG."""
    from PIL import Image

    from dpdmd_jax.run import setup as setup_lib
    from dpdmd_jax.run import workdir as workdir_lib
    from dpdmd_jax.eval.toy import ToyGrid

    for name, overrides in arms.items():
        workdir = workdir_of(out, name, 0)
        c = make_config(overrides, 0, 1, ARGS.teacher)
        setup = setup_lib.build(c)
        like, shardings = setup_lib.init_train_state(setup)
        mngr = workdir_lib.checkpoint_manager(workdir, c)
        state = workdir_lib.restore(mngr, mngr.latest_step(), like, shardings)
        grid = ToyGrid(setup, workdir).grid(state)
        arm_dir = os.path.basename(os.path.dirname(workdir))
        Image.fromarray((grid * 255).astype(np.uint8)).save(os.path.join(out, f"grid_{arm_dir}.png"))


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="main", help=f"arm groups, comma-separated: {', '.join(ARMS)}, or all "
                   "(main and study)")
    p.add_argument("--only", default=None, metavar="ARM[;ARM]",
                   help="only these arms of --arms, by name, e.g. 'DMD wide grid;DP-DMD K=30 wide grid'")
    p.add_argument("--rounds", type=int, default=None, help="default: the config's (200; 100 for :unet)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variant", default=None, help="configs/toy.py variant every arm starts from, e.g. unet")
    p.add_argument("--out", default=None, help="default benchmarks/results/toy_diversity_VARIANT (no --variant: "
                   "toy_diversity_shift0.375, the default's grid)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the shipped toy teacher)")
    p.add_argument("--grids", action="store_true", help="also write seed-0 sample grids")
    p.add_argument("--extend", default=None, metavar="RESULTS_JSON",
                   help="add --seeds to the mean +- std over seeds 0,1 of an earlier results file whose per-seed "
                        "values and workdirs are gone (results_eps.json); its table's paired rows are kept")
    p.add_argument("--tag", default=None, help="output files' suffix (table_TAG.md, results_TAG.json, plot_TAG.png); "
                   "default: --arms with '_' for ','")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="train only the I-th of N blocks of (arm, seed) jobs, then exit; run N at once, then once "
                        "without --shard for the table")
    ARGS = p.parse_args()
    if ARGS.rounds is None:
        from configs import toy

        ARGS.rounds = toy.get_config(ARGS.variant).num_rounds
    if ARGS.out is None:  # named by the grid: the default's is shift0.375, the same runs as --variant shift0.375
        from configs import toy

        variant = ARGS.variant or f"shift{toy.MATCHED_SHIFT:g}"
        ARGS.out = os.path.join(ROOT, "benchmarks", "results", f"toy_diversity_{variant.replace(',', '_')}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    seeds = [int(s) for s in ARGS.seeds.split(",")]
    groups = ["main", "study"] if ARGS.arms == "all" else ARGS.arms.split(",")
    if any(g not in ARMS for g in groups):
        p.error(f"--arms {ARGS.arms}: groups are {list(ARMS)} or all")
    arms = {name: o for g in groups for name, o in ARMS[g].items()}
    tag = ARGS.tag or ARGS.arms.replace(",", "_")  # the output files' suffix
    if ARGS.only:
        names = [n.strip() for n in ARGS.only.split(";")]
        unknown = [n for n in names if n not in arms]
        if unknown:
            p.error(f"--only: no arm {unknown} in --arms {ARGS.arms} (arms: {list(arms)})")
        arms = {n: arms[n] for n in names}
    os.makedirs(ARGS.out, exist_ok=True)
    jobs = [(name, seed) for name in arms for seed in seeds]
    if ARGS.shard:  # train only this process's share (e.g. one per core); aggregate in a later plain run
        i, n = (int(x) for x in ARGS.shard.split("/"))
        # contiguous blocks, so a process runs all seeds of an arm back to back (compile cache hits)
        for name, seed in jobs[i * len(jobs) // n:(i + 1) * len(jobs) // n]:
            run_one(name, arms[name], seed, ARGS.rounds, ARGS.out, ARGS.teacher)
            print(f"done: {name} seed {seed}", flush=True)
        return
    previous = None
    if ARGS.extend:
        with open(ARGS.extend) as f:
            previous = json.load(f)
        if any("per_seed" in row for row in previous.values()):
            p.error("--extend is for results files without per-seed values; rerun the seeds instead")
        # the earlier seeds' paired differences, kept from the table written next to that file
        with open(os.path.join(os.path.dirname(ARGS.extend), f"table_{tag}.md")) as f:
            previous_paired = f.read().split("Paired by training seed:")[1].strip()
    agg, per_arm = {}, {}
    for name, overrides in arms.items():
        results = [run_one(name, overrides, seed, ARGS.rounds, ARGS.out, ARGS.teacher) for seed in seeds]
        per_arm[name] = results
        if "teacher" not in agg:
            agg["teacher"] = aggregate(results, "teacher", seeds, previous and previous["teacher"])
            agg["teacher"]["wall_s"] = float("nan")
        agg[name] = aggregate(results, "student", seeds, previous and previous[name])
        print(f"done: {name}", flush=True)
    all_seeds = ([0, 1] if previous else []) + seeds
    text = table(agg) + "\n\nPaired by training seed:\n\n" + paired_table(per_arm, seeds)
    if previous:
        text += "\n\n" + previous_paired
    print(f"\nToy diversity, {ARGS.rounds} rounds, seeds {all_seeds} (mean ± std over training seeds):\n")
    print(text)
    with open(os.path.join(ARGS.out, f"table_{tag}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(ARGS.out, f"results_{tag}.json"), "w") as f:
        json.dump(agg, f, indent=2)
    plot(agg, os.path.join(ARGS.out, f"plot_{tag}.png"))
    tradeoff_plot(agg, os.path.join(ARGS.out, f"tradeoff_{tag}.png"))
    if ARGS.grids:
        save_grids(ARGS.out, arms)


if __name__ == "__main__":
    main()
