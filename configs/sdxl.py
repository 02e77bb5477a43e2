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
--family=sdxl DIR`); combine with commas. `:lora` (`:lora=R`, default rank 64): LoRA student and
fake score over one frozen bf16 copy of the UNet (docs/DESIGN.md, "LoRA students"), for one
accelerator:

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
    # with dots_no_batch and fits with full (BENCHMARKS.md "Plans"); SDXL's own full-size plan is not yet
    # recorded (its TPU compile ran past 28 min on the 2-core dev VM).
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
        elif not apply_method_variant(c, key, value):
            raise ValueError(f"unknown sdxl config variant {key!r}; see the docstring of configs/sdxl.py")
    return c
