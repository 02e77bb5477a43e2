"""SDXL base -> 4-step student with DP-DMD (epsilon prediction, x0 diversity target).

Full-size run (TPU slice or 8-GPU node; batch 4 per device x 8 devices, bf16, 1024^2):

  python -m dpdmd_jax.main --config=configs/sdxl.py --workdir=runs/sdxl \\
      --config.model.source=/ckpts/stable-diffusion-xl-base-1.0 \\
      --config.data.prompt_file=data/diffusiondb_prompts.txt

`model.source` is the diffusers StableDiffusionXLPipeline folder: the UNet (teacher, and the initial
student and fake score), CLIP-L + OpenCLIP-bigG (prompts, on device, sharded like the teacher) and
the VAE (sample grids) come from it. The method's settings for SDXL (DMD2's recipe where the paper is
silent): the teacher anchor on a 50-step DDIM grid ("leading" spacing, eta 0: diffusers'
DDIMScheduler), the student at timesteps (999, 749, 499, 249), each step predicting x0 and re-noising
it to the next timestep (DMD2's students), DMD noise timesteps in [20, 980], real-score CFG 8, the
x0 ("denoise") diversity target. The paper gives no K or lambda_div for SDXL; ours: K = 8 of the 50
teacher steps (the fraction of the grid SD3.5's K = 5 of 30 covers) and lambda_div = 0.05.

Variants: `:k<N>`, `:auto` (K from a teacher pass), `:dmd` (lambda_div = 0), `:backward` (DMD2-style
simulation), `:tiny` (the tiny random pipeline of `python -m dpdmd_jax.tools.tiny_pipeline
--family=sdxl DIR`); combine with commas.

The paper's baselines (docs/DESIGN.md; each leaves lambda_div as it is, so `:gan` alone is DP-DMD + GAN):
`:gan` (`:gan=W`, default 5e-3: DMD2's classifier head on the fake score's mid block and its
non-saturating generator loss), `:regression` (`:regression=W`, default 0.25: DMD v1's regression
to the teacher's sample from the same noise, L2 on latents; DMD v1's LPIPS on the VAE-decoded
samples with `--config.regression.distance=lpips` and its two weight files, `regression.vgg` and
`regression.lpips_heads`; the teacher's samples are computed in each round, or read from a pair
cache, DMD v1's precomputed pairs, written once by `dpdmd_jax.sample --sampler=teacher --pairs` and
named by `--config.regression.pairs`), and `:dmd2`, DMD2's published SDXL recipe where it fits our engine:
plain DMD (lambda_div 0) + GAN (weight 5e-3, classifier weight 1e-2), real-score guidance 8, 5 fake
updates per student update, backward simulation, lr 5e-7. The GAN's real images come from an image
folder with captions, encoded once into an embedding cache (each image's latents beside its
caption's embeddings; `data.embedding_cache --images`), or, with `gan.real=teacher`, from the
teacher's samples (a data-free variant, not DMD2 itself):

  python -m dpdmd_jax.data.embedding_cache --config=configs/sdxl.py --out=/data/sdxl_real \
      --config.model.source=/ckpts/stable-diffusion-xl-base-1.0 --images=/data/real_images
  python -m dpdmd_jax.main --config=configs/sdxl.py:dmd2 --workdir=runs/sdxl_dmd2 \
      --config.model.source=/ckpts/stable-diffusion-xl-base-1.0 \
      --config.data.kind=embeddings --config.data.cache_dir=/data/sdxl_real
  python -m dpdmd_jax.main --config=configs/sdxl.py:gan --workdir=runs/sdxl_dpdmd_gan --config.gan.real=teacher \
      --config.model.source=/ckpts/stable-diffusion-xl-base-1.0 \
      --config.data.prompt_file=data/diffusiondb_prompts.txt
  python -m dpdmd_jax.main --config=configs/sdxl.py:dmd,regression --workdir=runs/sdxl_dmd_reg \
      --config.model.source=/ckpts/stable-diffusion-xl-base-1.0 \
      --config.data.prompt_file=data/diffusiondb_prompts.txt
  # DMD v1's precomputed pairs: the teacher's samples of 1000 prompts x 8 seeds, then a run from them
  python -m dpdmd_jax.sample --config=configs/sdxl.py:dmd,regression --sampler=teacher --pairs --out=/data/sdxl_pairs \
      --config.model.source=/ckpts/stable-diffusion-xl-base-1.0 \
      --prompt_file=data/diffusiondb_prompts.txt --num_prompts=1000 --seeds=8
  python -m dpdmd_jax.main --config=configs/sdxl.py:dmd,regression --workdir=runs/sdxl_dmd_reg_pairs \
      --config.model.source=/ckpts/stable-diffusion-xl-base-1.0 \
      --config.data.prompt_file=data/diffusiondb_prompts.txt --config.regression.pairs=/data/sdxl_pairs

`:lora` (`:lora=R`, default rank 64): LoRA student and fake score over one frozen bf16 copy of the
UNet (docs/DESIGN.md, "LoRA students"), for one accelerator:

  python -m dpdmd_jax.main --config=configs/sdxl.py:lora --workdir=runs/sdxl_lora --config.batch_size=4 \
      --config.model.source=/ckpts/stable-diffusion-xl-base-1.0 \
      --config.data.prompt_file=data/diffusiondb_prompts.txt
"""

from dpdmd_jax.config import apply_method_variant, apply_tiny_pipeline, base_config, parse_arg


def get_config(arg: str | None = None):
    c = base_config()
    c.backbone = "unet"
    c.model.source = ""  # set --config.model.source to the diffusers SDXL pipeline folder
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    # Full rematerialisation, as for SD3.5-M, whose plan at 4 per v5p chip needs 101.85 GB of temporaries
    # with dots_no_batch and fits with full. SDXL's own plans at 4 per chip on a v5p-8: full remat peaks at
    # 53.0 GiB of 95; dots_no_batch fits too, at 90.4 GiB (4.6 spare), for 6 % less compute per round
    # (docs/benchmarks/plans.md): too thin a margin for a default, and no other planned target holds it.
    c.model.remat_policy = "full"
    c.data.kind = "prompts"
    c.data.latent_size = (128, 128)  # 1024^2 images
    c.batch_size = 32
    c.num_rounds = 6000 // 6
    c.teacher.steps = 50
    c.teacher.cfg_scale = 8.0
    c.dmd.real_cfg_scale = 8.0
    c.distill.target = "denoise"
    c.distill.anchor_k = 8
    c.distill.lambda_div = 0.05
    c.distill.fake_updates_per_student = 5
    c.log_every = 10
    c.checkpoint_every = 100
    c.evals.samples = dict(type="samples", every=100, num_prompts=4, seeds=4)
    for key, value in parse_arg(arg):
        if key == "tiny":
            apply_tiny_pipeline(c)
        elif key == "dmd2":
            _dmd2(c)
        elif not apply_method_variant(c, key, value):
            raise ValueError(f"unknown sdxl config variant {key!r}; see the docstring of configs/sdxl.py")
    return c


def _dmd2(c):
    """DMD2's SDXL recipe (Yin et al. 2024b, their 4-step SDXL script) where our engine has the knob:
    plain DMD plus the GAN, real-score CFG 8, 5 fake updates per generator update, backward
    simulation, generator and critic lr 5e-7. gan.real stays "data": real images from an embedding cache
    built with --images (validation names it; gan.real="teacher" is the data-free variant)."""
    c.distill.lambda_div = 0.0
    c.dmd.real_cfg_scale = 8.0
    c.distill.fake_updates_per_student = 5
    c.dmd.simulation = "backward"
    c.gan.weight = 5e-3  # gen_cls_loss_weight
    c.gan.cls_weight = 1e-2  # guidance_cls_loss_weight
    for name in ("student", "fake"):
        c.optim[name].lr = 5e-7
