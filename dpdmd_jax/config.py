"""The shared config skeleton and its up-front validation.

`base_config()` holds every knob of docs/DESIGN.md section 2 with the paper's values; configs in
`configs/` start from it and change what they need. `validate()` runs before anything is loaded
or compiled and raises one `ConfigError` paragraph per problem, naming the field and the fix.
"""

from __future__ import annotations

import ml_collections

from dpdmd_jax import backbones
from dpdmd_jax import eval as eval_lib
from dpdmd_jax.diffusion.flow import flow_match_sigmas
from dpdmd_jax.distill import anchor
from dpdmd_jax.parallel.mesh import DEFAULT_RULES, MESH_AXES

SIMULATIONS = ("rollout", "backward")
TARGETS = ("line", "denoise")
# anchor_k="auto": the smallest K whose target carries this share of the final samples' variation.
AUTO_ANCHOR_FRACTION = 0.75


class ConfigError(ValueError):
    """An invalid config value; the message names the field and how to fix it."""


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

    c.data = ml_collections.ConfigDict()
    c.data.kind = "prompts"  # toy | random | prompts | diffusiondb | embeddings (dpdmd_jax.data.SOURCES)
    c.data.prompt_file = ""  # kind "prompts": a UTF-8 text file, one prompt per line
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


def override(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys in place, e.g. {"distill.anchor_k": 10}; returns `c`."""
    for key, value in values.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def apply_method_variant(c: ml_collections.ConfigDict, variant: str) -> bool:
    """The `:variant` switches every backbone config shares; False if `variant` is not one of them."""
    if variant == "dmd":
        c.distill.lambda_div = 0.0
    elif variant == "backward":
        c.dmd.simulation = "backward"
    elif variant == "denoise":
        c.distill.target = "denoise"
    elif variant.startswith("k") and variant[1:].isdigit():
        c.distill.anchor_k = int(variant[1:])
    elif variant == "auto":
        c.distill.anchor_k = "auto"
    elif variant == "bf16":  # bfloat16 compute (fp32 master weights), as the full-size configs
        c.model.dtype = c.text.dtype = "bfloat16"
    elif variant.startswith("shift") and _is_float(variant[5:]):
        apply_flow_shift(c, float(variant[5:]))
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


def _problems(c: ml_collections.ConfigDict) -> list[str]:
    p = []
    try:
        schedule = backbones.backbone_class(c.backbone).schedule
    except (KeyError, ImportError) as e:
        p.append(f"backbone={c.backbone!r} is unknown ({e}); choose one of {backbones.names()} or register your "
                 "own and name it as 'package.module:name' (dpdmd_jax.backbones.register).")
        schedule = None
    if not c.model.source:
        p.append("model.source is empty: set it to a diffusers transformer folder, e.g. "
                 "--config.model.source=/ckpts/stable-diffusion-3.5-medium")
    T = c.teacher.steps
    if not isinstance(T, int) or T < 1:
        p.append(f"teacher.steps={T!r} must be a positive integer (the paper uses 30).")
    elif c.distill.anchor_k == "auto":
        p.extend(anchor.problems(c))
    elif not isinstance(c.distill.anchor_k, int) or not 1 <= c.distill.anchor_k <= T:
        p.append(f"distill.anchor_k={c.distill.anchor_k!r} must lie in 1..teacher.steps={T}, or be 'auto'; "
                 f"the anchor is the teacher state after K of its T steps (paper: K=5).")
    if c.distill.lambda_div < 0:
        p.append(f"distill.lambda_div={c.distill.lambda_div} is negative; use 0 for plain DMD or a positive weight "
                 "(paper: 0.05).")
    if c.distill.target not in TARGETS:
        p.append(f"distill.target={c.distill.target!r}; choose one of {TARGETS}.")
    elif schedule is not None and c.distill.target not in schedule.targets:
        p.append(f"distill.target={c.distill.target!r} does not fit backbone {c.backbone!r}'s {schedule.name} "
                 f"schedule; choose one of {schedule.targets}.")
    if not isinstance(c.distill.fake_updates_per_student, int) or c.distill.fake_updates_per_student < 0:
        p.append(f"distill.fake_updates_per_student={c.distill.fake_updates_per_student!r} must be an integer >= 0.")
    if c.dmd.simulation not in SIMULATIONS:
        p.append(f"dmd.simulation={c.dmd.simulation!r}; choose one of {SIMULATIONS}.")
    if schedule is not None:
        p.extend(schedule.problems(c))
    for name in ("teacher.cfg_scale", "dmd.real_cfg_scale"):
        sec, key = name.split(".")
        if c[sec][key] < 1.0:
            p.append(f"{name}={c[sec][key]} must be >= 1 (1 = no guidance).")
    if not isinstance(c.batch_size, int) or c.batch_size < 1:
        p.append(f"batch_size={c.batch_size!r} must be a positive integer.")
    if c.num_rounds < 1:
        p.append(f"num_rounds={c.num_rounds} must be >= 1.")
    for name in ("student", "fake"):
        o = c.optim[name]
        if o.lr <= 0 or o.weight_decay < 0 or o.grad_clip <= 0:
            p.append(f"optim.{name}: lr ({o.lr}) and grad_clip ({o.grad_clip}) must be > 0, weight_decay "
                     f"({o.weight_decay}) >= 0.")
    for rule in c.mesh.rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        targets = () if not ok or rule[1] is None else (rule[1],) if isinstance(rule[1], str) else tuple(rule[1])
        if not ok or any(t not in MESH_AXES for t in targets):
            p.append(f"mesh.rules entry {rule!r} must be (logical_axis, mesh_axis | None | (mesh_axes, ...)) with "
                     f"mesh axes from {MESH_AXES}.")
    if c.text.dtype not in ("float32", "bfloat16"):
        p.append(f"text.dtype={c.text.dtype!r}; choose 'bfloat16' or 'float32' (T5 overflows in float16).")
    if not isinstance(c.text.max_sequence_length, int) or not 1 <= c.text.max_sequence_length <= 512:
        p.append(f"text.max_sequence_length={c.text.max_sequence_length!r} must be an integer in 1..512 "
                 "(T5's tokens; SD3: 256).")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite"):
        if c[key] < 1:
            p.append(f"{key}={c[key]} must be >= 1.")
    return p + eval_lib.problems(c)


def problems(c: ml_collections.ConfigDict) -> list[str]:
    """Every invalid value of `c`, one sentence each (empty: the config is valid)."""
    return _problems(c)


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError listing every invalid value, before any weight is read or step compiled."""
    problems = _problems(c)
    if problems:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
