"""The shared config skeleton: schema, defaults and the variants every config file shares.

`base_config()` holds every knob of docs/DESIGN.md section 2 with the paper's values; configs in
`configs/` start from it and change what they need. This module is a leaf: it knows no registry.
The values are checked where a run is assembled (`dpdmd_jax.run.preflight`), before anything is
loaded or compiled, one `ConfigError` line per problem naming the field and the fix.
"""

from __future__ import annotations

import ml_collections

from dpdmd_jax.diffusion.flow import flow_match_sigmas
from dpdmd_jax.parallel.mesh import DEFAULT_RULES

SIMULATIONS = ("rollout", "backward")
REGRESSION_DISTANCES = ("l2", "lpips")
GAN_REAL = ("data", "teacher")
DATA_WITH_REAL = ("toy", "embeddings")  # sources of real latents for gan.real="data" (a cache built with --images)
TOY_IMAGE_SIZE = (16, 16)  # the toy generator's images (dpdmd_jax.toy.data.IMAGE_SIZE), its latents
# The variants' default weights: DMD2's SDXL gen_cls_loss_weight and DMD v1's lambda_reg (with LPIPS).
GAN_WEIGHT = 5e-3
REGRESSION_WEIGHT = 0.25
TARGETS = ("line", "denoise")
# anchor_k="auto": the smallest K whose target carries this share of the final samples' variation.
AUTO_ANCHOR_FRACTION = 0.75


class ConfigError(ValueError):
    """An invalid config value; the message names the field and how to fix it."""


def lora_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=()))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.backbone = "mmdit"  # a name of the backbone registry (dpdmd_jax.backbones): mmdit | tiny_flow | tiny_vp
    c.num_rounds = 6000  # generator (student) updates; each follows `fake_updates_per_student` critic updates
    c.batch_size = 32  # global batch, split over the ("data", "fsdp") mesh axes

    c.model = ml_collections.ConfigDict()
    c.model.source = ""  # diffusers transformer folder (or pipeline root), "toy" or "random"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.scan_layers = False
    c.model.remat_policy = "none"
    c.model.attention_impl = "xla"
    # Storage dtype of the frozen teacher (and of the base that LoRA students share): "bfloat16"
    # halves it while the student and fake score keep param_dtype masters; "" = param_dtype.
    c.model.teacher_dtype = ""

    c.data = ml_collections.ConfigDict()
    c.data.kind = "prompts"  # toy | random | prompts | diffusiondb | embeddings (dpdmd_jax.data.SOURCES)
    c.data.prompt_file = ""  # kind "prompts": .txt (one prompt per line), .jsonl / .json / .csv / .tsv / .parquet
    c.data.prompt_column = ""  # a structured prompt file's field / column ("" = the first of prompt, caption, text)
    c.data.tfds_dir = ""  # kind "diffusiondb": TFDS data dir of the built dataset (dpdmd_jax.data.diffusiondb)
    c.data.manual_dir = ""  # kind "diffusiondb": metadata.parquet / prompts.txt to build it from on first use
    c.data.cache_dir = ""  # kind "embeddings": a cache written by `python -m dpdmd_jax.data.embedding_cache`
    c.data.latent_size = (128, 128)  # (H, W) of the latent; 1024^2 images for SD3 (VAE factor 8)

    # The text encoders (prompt sources): tokenizers and encoders of the diffusers pipeline at
    # `text.source` ("" = model.source, a pipeline root), sharded like the teacher.
    c.text = ml_collections.ConfigDict()
    c.text.source = ""
    c.text.dtype = "bfloat16"
    c.text.max_sequence_length = 256  # SD3: T5 tokens
    c.text.use_t5 = True  # SD3: False = the pipeline without T5-XXL (zeros in its 256 positions)

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # logical axis -> mesh axis (None: replicated), first match wins, as MaxText's logical_axis_rules.
    c.mesh.rules = DEFAULT_RULES

    c.teacher = ml_collections.ConfigDict()
    c.teacher.steps = 30  # T: the teacher's ODE grid the anchor is taken on (flow: Euler; VP: DDIM "leading")
    c.teacher.cfg_scale = 3.5
    c.teacher.shift = 3.0  # flow only

    c.student = ml_collections.ConfigDict()
    # Flow: explicit grid (diffusers FlowMatchEuler, 4 steps, shift 3, as the public code); 0 is appended.
    c.student.sigmas = tuple(float(s) for s in flow_match_sigmas(4, 3.0)[:-1])
    # VP: DMD2's 4-step SDXL student (each step predicts x0, then re-noises to the next timestep).
    c.student.timesteps = (999, 749, 499, 249)
    # LoRA (rank > 0): the student is the frozen teacher plus low-rank adapters on `targets` (linear
    # layers as peft's target_modules names them in the diffusers model; () = the backbone's
    # defaults); only the adapters train. rank 0 = full fine-tuning. alpha 0 = alpha = rank.
    c.student.lora = lora_config()
    c.fake = ml_collections.ConfigDict()  # the fake score (critic)
    c.fake.lora = lora_config()

    c.distill = ml_collections.ConfigDict()
    # K: teacher steps to the diversity anchor (paper default; public code: 10), or "auto": chosen
    # before training from one teacher pass (dpdmd_jax.distill.anchor, settings in auto_anchor).
    c.distill.anchor_k = ml_collections.FieldReference(5, field_type=object)  # int | "auto"
    c.distill.auto_anchor = ml_collections.ConfigDict(
        dict(criterion="carried", fraction=AUTO_ANCHOR_FRACTION, prompts=4, seeds=8))
    c.distill.lambda_div = 0.05  # 0 = plain DMD
    c.distill.target = "line"  # "line": (eps - z_tk) / (1 - t_k); "denoise": teacher x0 at z_tk
    c.distill.fake_updates_per_student = 5  # M
    # Detach z_1 after the first student step. None = auto: on for DP-DMD (lambda_div > 0), off for
    # plain DMD (every step trained by DMD). Set explicitly for the paper's Fig. 5 ablation.
    c.distill.stop_grad_first_step = ml_collections.FieldReference(None, field_type=bool)

    c.dmd = ml_collections.ConfigDict()
    c.dmd.simulation = "rollout"  # "rollout" (paper code) | "backward" (DMD2-style, one step with grad)
    c.dmd.real_cfg_scale = 3.5  # CFG of the real score
    c.dmd.shift = 3.0  # flow: the shifted 1000-step training grid the DMD (and critic) noise level is drawn from
    c.dmd.sigma_min = 0.0  # flow: restrict that grid to [sigma_min, sigma_max]
    c.dmd.sigma_max = 1.0
    c.dmd.timestep_min = 20  # VP: integer timesteps in [timestep_min, timestep_max] (DMD2: 0.02 and 0.98 x 1000)
    c.dmd.timestep_max = 980

    # The paper's baselines, each independent of lambda_div (so DP-DMD + GAN is a run too); weight 0 = off.
    # DMD v1's regression: the student's sample x (what the DMD loss acts on) is pulled towards the
    # teacher's full guided ODE sample from the same noise, computed online. distance "l2": mean
    # squared error on latents (on the toy, the latents are the images: the toy's stand-in for DMD
    # v1's LPIPS in image space); "lpips" (DMD v1): LPIPS (VGG16, v0.1) between the two samples
    # decoded by the pipeline's VAE and resized (bilinear) to image_size^2 (0 = as decoded; 224 as
    # LPIPS is usually fed), from local files: `vgg` (torchvision's VGG16 state dict) and
    # `lpips_heads` (the lpips package's weights/v0.1/vgg.pth), each as .safetensors
    # (python -m dpdmd_jax.weights.lpips IN.pth OUT.safetensors). `pairs`: a pair cache (a folder of
    # `python -m dpdmd_jax.sample --sampler=teacher --pairs`) to regress on instead, as DMD v1 does:
    # the student's sample from each cached pair's noise towards the teacher's sample stored with it
    # (no teacher sampling in the round; "" = online).
    c.regression = ml_collections.ConfigDict(dict(weight=0.0, distance="l2", vgg="", lpips_heads="",
                                                  image_size=224, pairs=""))
    # DMD2's GAN: a classifier head on the fake score's features (`Backbone.features`: the UNet's mid
    # block; the MMDiT's image tokens after joint block `block`, -1 = the last) trained with the fake
    # score in its updates (loss weight `cls_weight`, DMD2's guidance_cls_loss_weight) to tell real
    # from generated samples noised at a DMD training level; the student gets a non-saturating loss
    # of weight `weight` (DMD2's gen_cls_loss_weight: 5e-3 on SDXL). `real`: "data" (the data
    # source's images: the toy's generator) or "teacher" (the teacher's T-step samples from fresh
    # noise: a data-free variant, not DMD2). `head_width`: the head's channels (0 = the features' own,
    # as DMD2).
    c.gan = ml_collections.ConfigDict(dict(weight=0.0, cls_weight=1e-2, real="data", block=-1, head_width=0))

    c.optim = ml_collections.ConfigDict()
    for name in ("student", "fake"):
        o = ml_collections.ConfigDict()
        o.lr = 1e-5
        o.b1 = 0.9
        o.b2 = 0.999
        o.weight_decay = 0.0
        o.grad_clip = 1.0
        c.optim[name] = o

    # The main job also trains plain DMD under the same settings (workdir/dmd_baseline) and prints
    # teacher, DMD and DP-DMD side by side (`python -m dpdmd_jax.main`; the toy default does).
    c.compare_with_dmd = False
    c.log_every = 10
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.max_nonfinite = 5  # consecutive non-finite generator gradients before the run stops
    # name -> dict(type=<dpdmd_jax.eval.EVALUATORS key>, every=<rounds; 0 = after training>, **kwargs)
    c.evals = ml_collections.ConfigDict()
    return c


def gan_on_real_data(c: ml_collections.ConfigDict) -> bool:
    """Whether the run's GAN classifies the data source's real images (`RoundBatch.real`)."""
    return c.gan.weight > 0 and c.gan.real == "data"


def regression_pairs(c: ml_collections.ConfigDict) -> str:
    """The pair cache DMD v1's regression reads its pairs from, or "" (no regression, or online)."""
    r = c.get("regression", {})
    return r.get("pairs", "") if r.get("weight", 0) > 0 else ""


def lpips_regression(c: ml_collections.ConfigDict) -> bool:
    """Whether the run has DMD v1's LPIPS regression: what makes it load a VAE and LPIPS."""
    r = c.get("regression", {})
    return r.get("weight", 0) > 0 and r.get("distance") == "lpips"


def baseline_problems(c: ml_collections.ConfigDict) -> list[str]:
    """The regression and GAN settings' problems, one sentence each (`run.preflight.config_problems`)."""
    p, r, g = [], c.regression, c.gan
    if r.weight < 0:
        p.append(f"regression.weight={r.weight} is negative; 0 turns the regression off (DMD v1: 0.25).")
    if r.distance not in REGRESSION_DISTANCES:
        p.append(f"regression.distance={r.distance!r}; choose one of {REGRESSION_DISTANCES}.")
    if r.pairs and not r.weight > 0:
        p.append(f"regression.pairs={r.pairs!r} is set but regression.weight={r.weight}: set a weight > 0 "
                 "(DMD v1: 0.25), or drop the pair cache.")
    if not isinstance(r.image_size, int) or r.image_size < 0:
        p.append(f"regression.image_size={r.image_size!r} must be an integer >= 0 (0 = the decoded size).")
    if g.weight < 0 or g.cls_weight < 0:
        p.append(f"gan.weight={g.weight} and gan.cls_weight={g.cls_weight} must be >= 0 (gan.weight 0 = no GAN).")
    if not isinstance(g.block, int) or not isinstance(g.head_width, int) or g.head_width < 0:
        p.append(f"gan.block={g.block!r} must be an integer (-1 = the last joint block) and gan.head_width="
                 f"{g.head_width!r} an integer >= 0 (0 = the features' width).")
    if g.real not in GAN_REAL:
        p.append(f"gan.real={g.real!r}; choose 'data' (the data source's images) or 'teacher' (teacher samples, "
                 "data-free).")
    if g.weight <= 0:
        return p
    if g.cls_weight == 0:
        p.append("gan.weight > 0 with gan.cls_weight=0 never trains the classifier: set gan.cls_weight > 0 "
                 "(DMD2: 1e-2).")
    if c.distill.fake_updates_per_student == 0:
        p.append("gan.weight > 0 needs distill.fake_updates_per_student >= 1: the classifier trains in the "
                 "critic updates.")
    if g.real == "data" and c.data.kind not in DATA_WITH_REAL:
        p.append(f"gan.real='data' needs real images from the data source, and data.kind={c.data.kind!r} has "
                 "none: build an embedding cache from an image folder with captions (python -m "
                 "dpdmd_jax.data.embedding_cache --images=FOLDER ...) and train from it (--config.data.kind="
                 "embeddings --config.data.cache_dir=...), or set --config.gan.real=teacher for the data-free "
                 "variant (teacher samples as the real side).")
    elif g.real == "data" and c.data.kind == "toy" and tuple(c.data.latent_size) != TOY_IMAGE_SIZE:
        p.append(f"gan.real='data' takes the toy's {TOY_IMAGE_SIZE[0]}x{TOY_IMAGE_SIZE[1]} images as latents: set "
                 f"--config.data.latent_size={TOY_IMAGE_SIZE}, or --config.gan.real=teacher.")
    return p


def override(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys in place, e.g. {"distill.anchor_k": 10}; returns `c`."""
    for key, value in values.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


# The short spellings of typed variants, kept so that nothing a user typed breaks: `k10` is `k=10`,
# `shift3` is `shift=3`, and a toy family name (`unet`) is `family=unet`.
_ALIASES = (("k", str.isdigit), ("shift", lambda v: _is_float(v) and v != ""))


def parse_arg(arg: str | None, flags: tuple[str, ...] = (), families: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """A config file's `:arg`, big_vision's `parse_arg` style: comma-separated `key=value` pairs
    (`:k=10,shift=0.375,family=unet`), a bare name for a switch (`:dmd` is `dmd=True`), and the short
    spellings `k10`, `shift3` and a family name (`unet`) as aliases. Returns (key, value) pairs in order."""
    pairs = []
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if eq:
            pairs.append((key.strip(), value.strip()))
            continue
        for name, ok in _ALIASES:
            if key.startswith(name) and ok(key[len(name):]):
                pairs.append((name, key[len(name):]))
                break
        else:
            pairs.append(("family", key) if key in families else (key, "True"))
    return pairs


def _bool(key: str, value: str) -> bool:
    if value not in ("True", "true", "1"):
        raise ValueError(f"config variant {key!r} is a switch: write ':{key}', not ':{key}={value}'")
    return True


def apply_method_variant(c: ml_collections.ConfigDict, key: str, value: str = "True") -> bool:
    """The typed variants every backbone config shares (`parse_arg`'s pairs); False if `key` is not one of
    them: dmd, backward, denoise, auto, bf16 (switches), k=INT | auto, shift=FLOAT, lora[=RANK], and the
    baselines gan[=WEIGHT] (DMD2's GAN term, default GAN_WEIGHT) and regression[=WEIGHT] (DMD v1's
    regression, default REGRESSION_WEIGHT), which leave lambda_div as it is (`dmd,gan` is DMD + GAN)."""
    if key == "k":
        c.distill.anchor_k = "auto" if value == "auto" else int(value)
    elif key == "shift":
        apply_flow_shift(c, float(value))
    elif key == "lora":  # `lora` = rank 64; `lora=R`
        rank = 64 if value in ("True", "true") else int(value)
        c.student.lora.rank = c.fake.lora.rank = rank
        if c.model.dtype == "bfloat16":  # the shared base in the dtype it is computed in: half the bytes
            c.model.teacher_dtype = "bfloat16"
    elif key == "gan":  # `gan` = DMD2's SDXL weight; `gan=W`
        c.gan.weight = GAN_WEIGHT if value in ("True", "true") else float(value)
    elif key == "regression":  # `regression` = DMD v1's weight; `regression=W`
        c.regression.weight = REGRESSION_WEIGHT if value in ("True", "true") else float(value)
    elif key in ("dmd", "backward", "denoise", "auto", "bf16"):
        _bool(key, value)
        if key == "dmd":
            c.distill.lambda_div = 0.0
        elif key == "backward":
            c.dmd.simulation = "backward"
        elif key == "denoise":
            c.distill.target = "denoise"
        elif key == "auto":
            c.distill.anchor_k = "auto"
        else:  # bfloat16 compute (fp32 master weights), as the full-size configs
            c.model.dtype = c.text.dtype = "bfloat16"
    else:
        return False
    return True


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_flow_shift(c: ml_collections.ConfigDict, shift: float) -> None:
    """One flow shift for every grid of the method: the teacher's anchor grid, the student's
    4-step grid (diffusers FlowMatchEuler at that shift, as the default is at 3) and the grid DMD
    and critic noise levels are drawn from. SD3 shifts with resolution (Esser et al. 2024, 5.3.2:
    shift ~ sqrt(pixels), i.e. linear in the latent side); its 3 is for 128 x 128 latents."""
    c.teacher.shift = c.dmd.shift = shift
    c.student.sigmas = tuple(float(x) for x in flow_match_sigmas(len(c.student.sigmas), shift)[:-1])


def apply_tiny_pipeline(c: ml_collections.ConfigDict) -> None:
    """The `:tiny` variant of the pipeline configs: the tiny random pipelines of
    `python -m dpdmd_jax.tools.tiny_pipeline` on a CPU, a few rounds. It shrinks sizes only: the
    real config's scan_layers, remat_policy and attention_impl stay as they are (a tiny run that
    switched them off once hid a round that could not trace with them). Compute is fp32 so that a
    tiny run's numbers can be held against diffusers to 1e-4; `:tiny,bf16` keeps the real
    config's bfloat16 compute too."""
    c.model.dtype = c.model.param_dtype = c.text.dtype = "float32"
    c.data.latent_size = (8, 8)
    c.batch_size = 8
    c.num_rounds = 4
    c.teacher.steps = 6
    c.distill.anchor_k = 2
    c.distill.fake_updates_per_student = 1
    c.log_every = 1
    c.checkpoint_every = 2
    c.evals.samples = dict(type="samples", every=2, num_prompts=2, seeds=2)
