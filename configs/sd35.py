"""SD3.5-Medium -> 4-step student with DP-DMD, the paper's hyper-parameters.

Full-size run (TPU slice or 8-GPU node; batch 4 per device x 8 devices, bf16, 1024^2):

  python -m dpdmd_jax.main --config=configs/sd35.py --workdir=runs/sd35m \
      --config.model.source=/ckpts/stable-diffusion-3.5-medium \
      --config.data.prompt_file=data/diffusiondb_prompts.txt

`model.source` is the diffusers StableDiffusion3Pipeline folder: the transformer (teacher, and the
initial student and fake score), the text encoders (CLIP-L, OpenCLIP-bigG, T5-XXL, sharded like the
teacher) and the VAE (sample grids) all come from it. Prompts: `data.kind="prompts"` (a text file),
`"diffusiondb"` (the TFDS builder in `dpdmd_jax.data.diffusiondb`, data.tfds_dir / data.manual_dir)
or `"embeddings"` (a cache made by `python -m dpdmd_jax.data.embedding_cache`, no text encoders
loaded).

Variants: `:k10` (the public code's anchor), `:auto` (K chosen from a teacher pass before
training, docs/DESIGN.md), `:dmd` (lambda_div = 0 baseline), `:backward`
(DMD2-style simulation, far less memory), `:denoise` (x0 diversity target), `:tiny` (the tiny
random pipeline of `python -m dpdmd_jax.tools.tiny_pipeline DIR`: every code path in minutes on a
CPU). Combine them with commas (`:tiny,dmd`); typed values work too (`:k=10`, `:shift=1.5`).

The paper's baselines (docs/DESIGN.md; each leaves lambda_div as it is: add `dmd` for the DMD
baseline): `:gan` (`:gan=W`, default 5e-3: DMD2's classifier head on the fake score's image tokens
after joint block `gan.block`, -1 = the last, and its non-saturating generator loss) and
`:regression` (`:regression=W`, default 0.25: DMD v1's regression to the teacher's sample from the
same noise, L2 on latents; DMD v1's LPIPS on the VAE-decoded samples with
`--config.regression.distance=lpips` and its two weight files, `regression.vgg` and
`regression.lpips_heads`; the teacher's samples are computed in each round, or read from a pair
cache, DMD v1's precomputed pairs, written once by `dpdmd_jax.sample --sampler=teacher --pairs` and
named by `--config.regression.pairs`). The GAN's real images come from an image folder with captions, encoded
once into an embedding cache (`data.embedding_cache --images`: each image's latents beside its
caption's embeddings), or, with `gan.real=teacher`, from the teacher's samples (a data-free variant,
not DMD2 itself):

  python -m dpdmd_jax.data.embedding_cache --config=configs/sd35.py --out=/data/sd35_real \
      --config.model.source=/ckpts/stable-diffusion-3.5-medium --images=/data/real_images
  python -m dpdmd_jax.main --config=configs/sd35.py:dmd,gan --workdir=runs/sd35m_dmd_gan \
      --config.model.source=/ckpts/stable-diffusion-3.5-medium \
      --config.data.kind=embeddings --config.data.cache_dir=/data/sd35_real
  python -m dpdmd_jax.main --config=configs/sd35.py:gan --workdir=runs/sd35m_dpdmd_gan --config.gan.real=teacher \
      --config.model.source=/ckpts/stable-diffusion-3.5-medium \
      --config.data.prompt_file=data/diffusiondb_prompts.txt
  python -m dpdmd_jax.main --config=configs/sd35.py:dmd,regression --workdir=runs/sd35m_dmd_reg \
      --config.model.source=/ckpts/stable-diffusion-3.5-medium \
      --config.data.prompt_file=data/diffusiondb_prompts.txt
  # DMD v1's precomputed pairs: the teacher's samples of 1000 prompts x 8 seeds, then a run from them
  python -m dpdmd_jax.sample --config=configs/sd35.py:dmd,regression --sampler=teacher --pairs --out=/data/sd35m_pairs \
      --config.model.source=/ckpts/stable-diffusion-3.5-medium \
      --prompt_file=data/diffusiondb_prompts.txt --num_prompts=1000 --seeds=8
  python -m dpdmd_jax.main --config=configs/sd35.py:dmd,regression --workdir=runs/sd35m_dmd_reg_pairs \
      --config.model.source=/ckpts/stable-diffusion-3.5-medium \
      --config.data.prompt_file=data/diffusiondb_prompts.txt --config.regression.pairs=/data/sd35m_pairs

`:lora` (`:lora=R`, default rank 64): LoRA student and fake score over one frozen bf16 copy of the
transformer (docs/DESIGN.md, "LoRA students"), for one accelerator:

  python -m dpdmd_jax.main --config=configs/sd35.py:lora --workdir=runs/sd35m_lora --config.batch_size=4 \
      --config.model.source=/ckpts/stable-diffusion-3.5-medium \
      --config.data.prompt_file=data/diffusiondb_prompts.txt
"""

from dpdmd_jax.config import apply_method_variant, apply_tiny_pipeline, base_config, parse_arg


def get_config(arg: str | None = None):
    c = base_config()
    c.model.source = ""  # set --config.model.source to the diffusers SD3.5-Medium folder
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # fp32 master weights, bf16 compute
    c.model.scan_layers = True
    # Full rematerialisation: the planner's verdict (BENCHMARKS.md, "Plans"): at 4 per chip on a v5p-8 the
    # round needs 101.85 GB of temporaries per chip with dots_no_batch (it does not compile in 95.73 GB)
    # and 54.2 GiB with full (peak 72.3 of 95 GiB).
    c.model.remat_policy = "full"
    c.data.kind = "prompts"
    c.data.latent_size = (128, 128)  # 1024^2 images
    c.batch_size = 32  # 4 per device x 8 devices
    c.num_rounds = 6000 // 6  # 6k iterations of the public code = 1000 student + 5000 fake updates
    c.teacher.steps = 30
    c.teacher.cfg_scale = 3.5
    c.dmd.real_cfg_scale = 3.5
    c.distill.anchor_k = 5
    c.distill.lambda_div = 0.05
    c.distill.fake_updates_per_student = 5
    c.log_every = 10
    c.checkpoint_every = 100
    # VAE-decoded student samples: the first 4 prompts x 4 seeds, every 100 rounds.
    c.evals.samples = dict(type="samples", every=100, num_prompts=4, seeds=4)
    for key, value in parse_arg(arg):
        if key == "tiny":
            _tiny(c)
        elif not apply_method_variant(c, key, value):
            raise ValueError(f"unknown sd35 config variant {key!r}; see the docstring of configs/sd35.py")
    return c


def _tiny(c):
    apply_tiny_pipeline(c)
    c.text.max_sequence_length = 16  # T5 tokens: the tiny run's context is 77 + 16
