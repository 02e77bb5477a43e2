"""The embedded toy default: distil the shipped toy MMDiT teacher into a 4-step student on CPU.

Run (about 5 minutes on 2 CPU cores with the plain-DMD baseline it also trains; resumes from the
workdir):

  python -m dpdmd_jax.main --config=configs/toy.py --workdir=runs/toy

The default puts SD3.5's 1024^2 timeline on the toy's 16 x 16 images (every flow grid at shift
MATCHED_SHIFT = 0.375, SD3's resolution-shift rule) and chooses the anchor step K automatically
(distill.anchor_k="auto": K = 7 of 30 with the shipped teacher). docs/benchmarks/toy-time-axis.md
has the K sweep at shifts 3, 1 and 0.375 behind that choice.

Variants (`--config=configs/toy.py:VARIANT[,VARIANT...]`; typed values in big_vision's style,
`:k=10,shift=0.375,family=unet`, with the short spellings below as aliases):
  dmd      plain DMD baseline (lambda_div = 0)
  backward DMD2-style backward simulation instead of the full rollout
  denoise  x0 ("denoise") diversity target instead of the straight line
  k=N      anchor step K = N (alias kN: k5, the paper's) instead of "auto"
  auto     K chosen before training from a teacher pass (the default; docs/DESIGN.md)
  shift=S  every flow grid (teacher, student, DMD noise) at shift S instead of 0.375, e.g. shift3:
           SD3's 1024^2 grid as it is, which on 16x16 images is a much earlier phase of generation
  wide     student grid [1, 0.75, 0.5, 0.25], the shift-3 study's (`shift3,wide`): a larger first step
           than shift 3's 1 -> 0.86, a smaller one than the default's 1 -> 0.43
  family=unet (alias unet) the epsilon toy: the shipped SDXL-style UNet teacher (VP epsilon, 30-step DDIM anchor
           grid), DMD2's 4-step student at timesteps (999, 749, 499, 249), DMD noise in [20, 980],
           the x0 ("denoise") diversity target, the paper's K = 5, 100 rounds; the whole SDXL path
           of the method on a CPU
  smoke    a few rounds of a tiny random model (tests)
  gan[=W]  + DMD2's GAN (weight W, default 5e-3): a classifier head on the fake score's features trains
           with it to tell the toy's real images from the student's, and the student gets a
           non-saturating loss; lambda_div stays, so `gan` is DP-DMD + GAN and `dmd,gan` is DMD + GAN
  regression[=W]  + DMD v1's regression (weight W, default 0.25) of the student's sample to the teacher's
           sample from the same noise, L2 on the images (the toy's stand-in for DMD v1's LPIPS);
           `dmd,regression` is DMD v1
Any field can be overridden, e.g. --config.distill.lambda_div=0.5 --config.num_rounds=400.

The baselines (with lambda_div > 0 the job's plain-DMD comparison run, compare_with_dmd, keeps the
GAN / regression on: `gan` trains DP-DMD + GAN and DMD + GAN side by side):

  python -m dpdmd_jax.main --config=configs/toy.py:dmd,gan --workdir=runs/toy_dmd_gan
  python -m dpdmd_jax.main --config=configs/toy.py:gan --workdir=runs/toy_dpdmd_gan
  python -m dpdmd_jax.main --config=configs/toy.py:dmd,regression --workdir=runs/toy_dmd_reg
  # DMD v1's precomputed pairs: the teacher's samples of the 6 prompts x 16 seeds, then a run from them
  python -m dpdmd_jax.sample --config=configs/toy.py --sampler=teacher --pairs --seeds=16 --out=runs/toy_pairs
  python -m dpdmd_jax.main --config=configs/toy.py:dmd,regression --workdir=runs/toy_dmd_reg_pairs \
      --config.regression.pairs=runs/toy_pairs
  python -m dpdmd_jax.main --config=configs/toy.py:unet,dmd,gan --workdir=runs/toy_unet_dmd_gan
"""

from dpdmd_jax.config import apply_flow_shift, apply_method_variant, base_config, parse_arg

# SD3 shifts its schedule in proportion to the latent side (Esser et al. 2024, section 5.3.2: shift
# sqrt(m / n) for m / n pixels). SD3.5 uses 3 for 128 x 128 latents (1024^2 images); the toy's
# images are 16 x 16, so the same point of generation falls on the same grid step at 3 * 16 / 128.
MATCHED_SHIFT = 3.0 * 16 / 128  # 0.375

# The toy study's "wide" student grid (benchmarks/toy_diversity.py): first step 1 -> 0.75.
WIDE_STUDENT_SIGMAS = (1.0, 0.75, 0.5, 0.25)


def get_config(arg: str | None = None):
    c = base_config()
    c.model.source = "toy"
    c.data.kind = "toy"
    c.data.latent_size = (16, 16)  # the toy's images are its latents
    c.mesh.fsdp = -1
    c.batch_size = 8  # one sample per virtual device on an 8-device mesh; ~1 s per round on 2 cores
    c.num_rounds = 200
    c.teacher.steps = 30
    c.teacher.cfg_scale = 3.5
    c.dmd.real_cfg_scale = 3.5
    apply_flow_shift(c, MATCHED_SHIFT)  # teacher, student and DMD grids on SD3.5's timeline
    c.distill.anchor_k = "auto"  # K = 7 of 30 on this grid (docs/benchmarks/toy-time-axis.md)
    c.distill.lambda_div = 0.05
    c.distill.fake_updates_per_student = 5
    for name in ("student", "fake"):
        c.optim[name].lr = 1e-4  # the toy's small teacher tolerates (and needs) a larger step than SD3.5's 1e-5
    c.log_every = 10
    c.checkpoint_every = 50
    c.evals.grid = dict(type="toy_grid", every=100)
    c.evals.toy = dict(type="toy_metrics", every=0, seeds_per_prompt=9, repeats=4)  # R = 9 seeds per prompt
    c.compare_with_dmd = True  # the job also trains plain DMD and prints teacher / DMD / DP-DMD side by side
    for key, value in parse_arg(arg, families=("mmdit", "unet")):
        if apply_method_variant(c, key, value):
            continue
        if key == "wide":
            c.student.sigmas = WIDE_STUDENT_SIGMAS
        elif key == "family" and value == "mmdit":
            pass  # the default
        elif key == "family" and value == "unet":
            c.backbone = "unet"
            c.distill.target = "denoise"  # VP has no straight path to draw the line target on
            c.distill.anchor_k = 5  # the paper's K, as measured in docs/benchmarks/epsilon-toy.md (auto picks 8 here)
            # A UNet round costs ~3x an MMDiT round here (many small convolutions at batch 8): 100
            # rounds keep the run within the toy's few minutes (docs/benchmarks/epsilon-toy.md).
            c.num_rounds = 100
        elif key == "smoke":
            c.model.source = "random"
            c.data.latent_size = (8, 8)
            c.model.arch = dict(sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=2,
                                num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                                joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=4,
                                dual_attention_layers=(0,), qk_norm="rms_norm")
            c.batch_size = 8
            c.num_rounds = 4
            c.teacher.steps = 4
            c.distill.anchor_k = 2
            c.distill.fake_updates_per_student = 2
            c.log_every = 1
            c.checkpoint_every = 2
            c.evals = dict(grid=dict(type="toy_grid", every=2))  # no toy metrics: a random model
            c.compare_with_dmd = False
        else:
            variant = key if value == "True" else f"{key}={value}"
            raise ValueError(f"unknown toy config variant {variant!r}; see the docstring of configs/toy.py")
    return c
