"""The toy teachers: small SD3.5-style MMDiT (rectified flow) and SDXL-style UNet (VP epsilon)
models trained on `dpdmd_jax.toy.data`.

A trained copy of each ships in `TEACHER_DIRS` (diffusers `SD3Transformer2DModel` /
`UNet2DConditionModel` folders), so toy distillation starts at once on either schedule;
`python -m dpdmd_jax.toy.train_teacher` re-trains them.

`sample_toy` samples any toy model (teacher or 4-step student, either family) with the project's
one sampler (`diffusion.sampler.sample`) over an explicit grid of the family's schedule levels
(flow sigmas, or VP timesteps ending at `VPEpsilon.clean`), with classifier-free guidance whose
unconditional branch is the NULL_CLASS embedding (all zeros), the same constant the teacher saw
under CFG dropout.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dpdmd_jax.core import SD3Cond, SDXLCond
from dpdmd_jax.diffusion import flow, sampler
from dpdmd_jax.diffusion.schedules import RectifiedFlow, Schedule, VPEpsilon
from dpdmd_jax.models.mmdit import MMDiT, MMDiTConfig
from dpdmd_jax.models.unet import UNet2DConditionModel, UNetConfig
from dpdmd_jax.toy import data, metrics
from dpdmd_jax.weights import sd3, unet

FLOW = RectifiedFlow()
VP = VPEpsilon()
CONTEXT_LEN = 4  # tokens of the toy "text encoder" (data.class_embedding)
# A small SD3.5-Medium lookalike: patch 2 on the 16x16x3 latent (8x8 = 64 image tokens + 4
# context tokens), MMDiT-X dual attention in layer 0 and qk RMSNorm, so toy runs exercise
# the same branches as SD3.5-M; the last layer is context_pre_only as in every SD3.
TOY_ARCH: dict[str, Any] = dict(
    sample_size=16,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=4,
    num_attention_heads=4,
    attention_head_dim=16,
    caption_projection_dim=64,  # = heads * head_dim
    joint_attention_dim=32,
    pooled_projection_dim=32,
    pos_embed_max_size=8,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)

# A small SDXL-base lookalike of the same diffusers class as SDXL's UNet: a plain down block then
# a cross-attention one (16x16 -> 8x8), transformer depth 2 in the second and the mid block, linear
# projections, head counts (2, 4), and SDXL's `text_time` add-embedding of the pooled vector and
# the six time ids. Width 32: training costs ~0.5 s per 64-sample step on 2 cores (TOY_ARCH
# ~0.35 s), but a distillation round at batch 8 costs ~4x TOY_ARCH's (5.3 s against 1.2 s on one
# core): many small convolutions and norms, where XLA:CPU's per-op overhead dominates.
TOY_UNET_ARCH: dict[str, Any] = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,  # = the toy text encoder's context width
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),  # head COUNTS, as diffusers names them
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled 32 + 6 time ids x 8
)
# SDXL's micro-conditioning of a 16 x 16 "image": original size, crop top-left, target size. Both
# CFG branches get them, as the SDXL pipeline does.
TOY_TIME_IDS = (16.0, 16.0, 0.0, 0.0, 16.0, 16.0)

FAMILIES = ("mmdit", "unet")  # the backbone names the toy teachers plug into
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TEACHER_DIRS = {"mmdit": os.path.join(_ASSETS, "teacher"), "unet": os.path.join(_ASSETS, "teacher_unet")}
TEACHER_DIR = TEACHER_DIRS["mmdit"]
TRAIN_COMMANDS = {
    "mmdit": "python -m dpdmd_jax.toy.train_teacher --config=configs/toy_teacher.py --workdir=runs/toy_teacher",
    "unet": ("python -m dpdmd_jax.toy.train_teacher --config=configs/toy_teacher.py:unet "
             "--workdir=runs/toy_teacher_unet"),
}
TRAIN_COMMAND = TRAIN_COMMANDS["mmdit"]

# Evaluation protocol of the toy teachers (docs/DESIGN.md): 30 steps, the shift-3 flow grid or
# the "leading" DDIM grid.
EVAL_STEPS = 30
EVAL_SHIFT = 3.0

ToyModel = MMDiT | UNet2DConditionModel


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"toy family {family!r}; choose one of {FAMILIES}")
    return family


def family_of(model: ToyModel) -> str:
    return "unet" if isinstance(model, UNet2DConditionModel) else "mmdit"


def schedule_of(family: str) -> Schedule:
    return VP if _check_family(family) == "unet" else FLOW


def toy_config(**overrides: Any) -> MMDiTConfig:
    """`MMDiTConfig` of the toy teacher; `overrides` replace TOY_ARCH entries or execution knobs."""
    return MMDiTConfig(**{**TOY_ARCH, **overrides})


def toy_unet_config(**overrides: Any) -> UNetConfig:
    """`UNetConfig` of the epsilon toy teacher; `overrides` replace TOY_UNET_ARCH entries or knobs."""
    return UNetConfig(**{**TOY_UNET_ARCH, **overrides})


def model_config(family: str, **overrides: Any) -> MMDiTConfig | UNetConfig:
    return toy_unet_config(**overrides) if _check_family(family) == "unet" else toy_config(**overrides)


def build_model(cfg: MMDiTConfig | UNetConfig, seed: int) -> ToyModel:
    """A freshly initialised toy model of `cfg` (either family)."""
    cls = UNet2DConditionModel if isinstance(cfg, UNetConfig) else MMDiT
    return cls(cfg, rngs=nnx.Rngs(seed))


def cond_dims(cfg: MMDiTConfig | UNetConfig) -> tuple[int, int]:
    """(context width, pooled width) the model's conditioning inputs take."""
    if isinstance(cfg, UNetConfig):
        return cfg.cross_attention_dim, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return cfg.joint_attention_dim, cfg.pooled_projection_dim


def toy_cond(class_ids: np.ndarray | Sequence[int], cond_type: type, context_dim: int, pooled_dim: int
             ) -> SD3Cond | SDXLCond:
    """Class ids of any shape (NULL_CLASS = -1: unconditional) -> `cond_type` (SD3Cond or SDXLCond)
    of numpy arrays with that leading shape, from the toy's fixed "text encoder"."""
    ids = np.asarray(class_ids)
    context, pooled = data.class_embedding(ids.reshape(-1), context_dim, pooled_dim, CONTEXT_LEN)
    context, pooled = context.reshape(*ids.shape, *context.shape[1:]), pooled.reshape(*ids.shape, -1)
    if cond_type is SDXLCond:
        time_ids = np.broadcast_to(np.asarray(TOY_TIME_IDS, np.float32), (*ids.shape, 6)).copy()
        return SDXLCond(context=context, text_embeds=pooled, time_ids=time_ids)
    if cond_type is SD3Cond:
        return SD3Cond(context=context, pooled=pooled)
    raise ValueError(f"the toy makes SD3Cond or SDXLCond conditioning, not {cond_type.__name__}")


def model_cond(model_or_cfg: ToyModel | MMDiTConfig | UNetConfig, class_ids) -> SD3Cond | SDXLCond:
    """The toy conditioning of `class_ids` shaped for this model (or config), as jax arrays."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    cond_type = SDXLCond if isinstance(cfg, UNetConfig) else SD3Cond
    return jax.tree.map(jnp.asarray, toy_cond(class_ids, cond_type, *cond_dims(cfg)))


def toy_conditioning(
    class_ids: np.ndarray | Sequence[int],
    context_dim: int = TOY_ARCH["joint_attention_dim"],
    pooled_dim: int = TOY_ARCH["pooled_projection_dim"],
) -> tuple[jax.Array, jax.Array]:
    """Class ids (NULL_CLASS = -1 for the unconditional branch) -> (context [B, 4, 32], pooled [B, 32])."""
    c = toy_cond(class_ids, SD3Cond, context_dim, pooled_dim)
    return jnp.asarray(c.context), jnp.asarray(c.pooled)


def apply(model: ToyModel, z: jax.Array, level: jax.Array, cond: SD3Cond | SDXLCond) -> jax.Array:
    """The model's prediction (v for the MMDiT, eps for the UNet) at schedule `level` [B]."""
    if isinstance(model, UNet2DConditionModel):
        return model(z, VP.model_time(level), cond.context, cond.text_embeds, cond.time_ids)
    return model(z, FLOW.model_time(level), cond.context, cond.pooled)


def teacher_grid(family: str = "mmdit", steps: int = EVAL_STEPS) -> np.ndarray:
    """The toy teacher's evaluation grid: `steps` shift-3 flow sigmas, or `steps` leading DDIM
    timesteps, each ending clean."""
    if _check_family(family) == "unet":
        return VP.teacher_grid(ml_collections.ConfigDict(dict(steps=steps)))
    return flow.flow_match_sigmas(steps, EVAL_SHIFT)


def load_toy_teacher(path: str | os.PathLike | None = None, family: str = "mmdit", **overrides: Any) -> ToyModel:
    """The shipped toy teacher of `family` (or the teacher folder at `path`, of that family).

    `overrides` go to `load_mmdit` / `load_unet` (dtype, mesh, scan_layers, remat_policy, ...).
    """
    folder = os.fspath(path) if path is not None else TEACHER_DIRS[_check_family(family)]
    weights = unet if family == "unet" else sd3
    if not (os.path.isfile(os.path.join(folder, "config.json"))
            and os.path.isfile(os.path.join(folder, weights.WEIGHTS_NAME))):
        raise FileNotFoundError(
            f"no toy teacher at {folder} (expected config.json and {weights.WEIGHTS_NAME}). Train one with\n"
            f"  {TRAIN_COMMANDS[family]}\n(RESULTS.md in {TEACHER_DIRS[family]} gives the shipped teacher's "
            f"schedule) and copy the run's teacher/* into {TEACHER_DIRS[family]}, "
            "or pass --config.export_dir to write it there directly."
        )
    overrides.setdefault("progress", False)
    return (weights.load_unet if family == "unet" else weights.load_mmdit)(folder, **overrides)


def save_toy_model(model: ToyModel, out_dir: str, overwrite: bool = False) -> str:
    """Exports a toy model as its diffusers folder (fp32)."""
    save = unet.save_unet if family_of(model) == "unet" else sd3.save_mmdit
    return save(model, out_dir, dtype="float32", overwrite=overwrite)


def _sample_impl(graphdef, state, noise, cond, grid, cfg_scale, key, guided, student):
    model = nnx.merge(graphdef, state)
    schedule = schedule_of(family_of(model))
    predict = lambda z, level, c: apply(model, z, level, c)
    # NULL_CLASS embeds to exact zeros (data.class_embedding), so no lookup is needed here; the
    # time ids (the UNet's) are the same in both branches, as SDXL's pipeline builds them.
    uncond = None
    if guided:
        uncond = jax.tree.map(jnp.zeros_like, cond)
        if isinstance(cond, SDXLCond):
            uncond = uncond.replace(time_ids=cond.time_ids)
    return sampler.sample(predict, schedule, noise, grid, cond, uncond, cfg_scale, student=student, key=key)


# The grid and the guidance scale are traced (one compile per batch shape and grid length);
# whether guidance runs at all, and teacher vs student steps, change the graph and are static.
_sample_jit = jax.jit(_sample_impl, static_argnames=("graphdef", "guided", "student"))


def sample_toy(
    model: ToyModel,
    noise: jax.Array | np.ndarray,
    class_ids: np.ndarray | Sequence[int],
    grid: np.ndarray | Sequence[float],
    cfg_scale: float = 1.0,
    *,
    student: bool = False,
    key: jax.Array | None = None,
) -> jax.Array:
    """Samples from `noise` [B, 16, 16, 3] (at grid[0]) along `grid` (ending clean for samples),
    class-conditioned, with CFG `cfg_scale` (1 = conditional only).

    Teacher steps (flow Euler / DDIM) by default; `student=True` takes the schedule's student steps
    (for VP: x0 then re-noise with noise from `key`). Pure: the model's state is read, never
    changed; jitted (compiled once per batch shape, grid length, guided/unguided, teacher/student).
    """
    graphdef, state = nnx.split(model)
    grid = jnp.asarray(np.asarray(grid, np.float32))
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"the grid must be 1-D with >= 2 levels, got shape {grid.shape}")
    key = jax.random.key(0) if key is None else key
    return _sample_jit(graphdef, state, jnp.asarray(noise, jnp.float32), model_cond(model, class_ids), grid,
                       jnp.float32(cfg_scale), key, guided=float(cfg_scale) != 1.0, student=student)


def sample_flow(model: MMDiT, noise, class_ids, sigmas, cfg_scale: float = 1.0) -> jax.Array:
    """`sample_toy` with the flow teacher's Euler steps along `sigmas`."""
    return sample_toy(model, noise, class_ids, sigmas, cfg_scale)


def eval_class_ids(seeds: int = 9, repeats: int = 4) -> np.ndarray:
    """Prompts laid out as toy_metrics expects: (6 classes x `repeats`) prompts x `seeds`
    consecutive samples each."""
    prompts = np.tile(np.arange(data.NUM_CLASSES), repeats)
    return np.repeat(prompts, seeds).astype(np.int32)


def evaluate_sampler(
    model: ToyModel,
    cfg_scales: Sequence[float] = (1.0, 3.5),
    *,
    sigmas: np.ndarray | None = None,
    seeds: int = 9,
    repeats: int = 4,
    seed: int = 0,
    student: bool = False,
) -> dict[float, dict[str, float]]:
    """toy_metrics of `model` sampled on the grid `sigmas` (flow sigmas or VP timesteps; default:
    the family's 30-step teacher grid) at each CFG scale, from the same noise for every scale;
    `student=True` takes student steps (VP: re-noised with a fixed key). Returns {cfg_scale: metrics}."""
    if sigmas is None:
        sigmas = teacher_grid(family_of(model))
    ids = eval_class_ids(seeds, repeats)
    noise = jax.random.normal(jax.random.key(seed), (ids.size, data.IMAGE_SIZE, data.IMAGE_SIZE, 3), jnp.float32)
    out = {}
    for w in cfg_scales:
        images = np.asarray(sample_toy(model, noise, ids, sigmas, w, student=student,
                                       key=jax.random.key(seed + 1)))
        out[float(w)] = metrics.toy_metrics(images, ids, seeds)
    return out


def data_metrics(seeds: int = 9, repeats: int = 4, seed: int = 0) -> dict[str, float]:
    """toy_metrics of real data samples in the same prompts x seeds layout (the reference row)."""
    ids = eval_class_ids(seeds, repeats)
    return metrics.toy_metrics(data.sample_batch(seed, ids.size, ids)["images"], ids, seeds)
