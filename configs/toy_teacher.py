r"""The toy teacher: flow matching with CFG dropout on the 16x16 toy (CPU, ~10 min per 1000 steps on 2 cores).

    python -m dpdmd_jax.toy.train_teacher --config=configs/toy_teacher.py --workdir=runs/toy_teacher

The shipped teacher (dpdmd_jax/toy/assets/teacher, see RESULTS.md there) is this run (1600 steps)
continued twice from its EMA export with a fresh optimizer (`--config.init_from`): 1200 steps
(`--config.num_steps=1200 --config.eval_every=600 --config.seed=1`), then 6000 steps
(`--config.num_steps=6000 --config.eval_every=2000 --config.seed=2`), 8800 steps in all. Square
vs circle is only learned in the last few thousand steps; 2800 steps give round blobs for both.

Variants (`--config=configs/toy_teacher.py:VARIANT[,VARIANT]`):
    unet    the epsilon toy teacher: the SDXL-style `TOY_UNET_ARCH` UNet, VP epsilon prediction
            on SDXL's scaled-linear schedule, timesteps uniform in [0, 1000), evaluated with
            30-step leading DDIM (dpdmd_jax/toy/assets/teacher_unet/RESULTS.md: how the shipped
            one was trained).
    smoke   a 2-layer model, a handful of steps and a tiny evaluation (tests, CI).

Overrides as usual, e.g. `--config.num_steps=3000 --config.model.num_layers=6`,
`--config.init_from=runs/toy_teacher/teacher` (continue training an export, fresh optimizer),
`--config.export_dir=dpdmd_jax/toy/assets/teacher --config.overwrite=True`.
"""

import ml_collections

from dpdmd_jax.toy.teacher import TOY_ARCH, TOY_UNET_ARCH


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.family = "mmdit"  # "mmdit" (rectified flow) or "unet" (VP epsilon)
    # MMDiTConfig (UNetConfig) fields; TOY_ARCH (TOY_UNET_ARCH) is the shipped teacher's architecture.
    config.model = ml_collections.ConfigDict(dict(TOY_ARCH))

    # Per-sample cost is ~linear in the batch on a CPU, so 64 buys twice the updates of 128.
    config.batch_size = 64
    config.num_steps = 1600
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=100, end_lr_fraction=0.02, b1=0.9, b2=0.99, weight_decay=0.01, grad_clip=1.0,
    ))
    config.ema_decay = 0.995

    # Noise levels: flow sigmas from SD3's logit-normal(0, 1) or "uniform" on [0, 1]; VP: "timesteps".
    config.sigma_sampling = "logit_normal"
    config.logit_mean = 0.0
    config.logit_std = 1.0
    # Fraction of labels replaced by NULL_CLASS (all-zero embedding), for CFG.
    config.cfg_dropout = 0.1

    config.log_every = 50
    config.eval_every = 800  # also evaluates + exports at the end; 0 = only at the end
    # 30-step teacher on the shift-3 grid; (6 classes x repeats) prompts x `seeds` samples.
    config.eval = ml_collections.ConfigDict(dict(
        num_steps=30, shift=3.0, cfg_scales=(1.0, 3.5), seeds=9, repeats=4, seed=0,
    ))

    # XLA options of the train step, e.g. {"xla_backend_optimization_level": 0}: compiles in
    # about half the time, runs slower (tests).
    config.compiler_options = ml_collections.ConfigDict()
    config.init_from = ""  # a teacher folder to continue training from ("" = random init)
    config.export_dir = ""  # "" = WORKDIR/teacher
    config.overwrite = False

    variants = [v for v in (arg or "").split(",") if v]
    unknown = set(variants) - {"unet", "smoke"}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)} (known: unet, smoke)")
    if "unet" in variants:
        config.family = "unet"
        config.model = ml_collections.ConfigDict(dict(TOY_UNET_ARCH))
        config.sigma_sampling = "timesteps"
        config.num_steps = 4000
        config.eval_every = 1000
    if "smoke" in variants:
        if config.family == "unet":
            config.model.transformer_layers_per_block = (1, 1)
        else:
            config.model.num_layers = 2
        config.batch_size = 8
        config.num_steps = 3
        config.optimizer.warmup_steps = 1
        config.log_every = 1
        config.eval_every = 0
        config.compiler_options = ml_collections.ConfigDict({"xla_backend_optimization_level": 0})
        config.eval = ml_collections.ConfigDict(dict(
            num_steps=2, shift=3.0, cfg_scales=(3.5,), seeds=2, repeats=1, seed=0,
        ))
    return config
