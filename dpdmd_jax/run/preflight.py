"""Everything a training run needs, checked before the first byte is written into its workdir, and
the dry run (`python -m dpdmd_jax.main ... --dry_run`) that shows it.

`run_problems` collects every problem at once, one sentence each: the config's values, the model
and data sources (each component folder and file the run will read, the tokenizers), and the
workdir (creatable, writable, holding this experiment or none). The config's values are checked
here rather than in `config.py` (a leaf), with each component's own checks from its registry. A run
refuses to start while any problem is left, so a failed start never leaves a workdir that refuses
the corrected command.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import uuid
from typing import Any

import ml_collections
from etils import epath

from dpdmd_jax import backbones
from dpdmd_jax import config as config_lib
from dpdmd_jax import data as data_lib
from dpdmd_jax.data import pairs
from dpdmd_jax import eval as eval_lib
from dpdmd_jax.distill import adapters, anchor
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.run.workdir import check_workdir_config, checkpoint_steps
from dpdmd_jax.run_config import is_uri


def workdir_problems(workdir: str, flag: str = "--workdir") -> list[str]:
    """Whether `workdir` is (or can be made) a folder this process can write into; a URI (gs://...)
    through `etils.epath`, as the run will write it (run/workdir.py)."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        return [f"{flag}={workdir} exists and is a file, not a folder: choose another {flag}."]
    if is_uri(workdir):  # an object store has no folders to create: try writing an object where the run will
        probe = path / f".write_test_{uuid.uuid4().hex}"
        try:
            probe.write_text("")
            probe.unlink()
        except Exception as e:  # the store's own errors (permissions, no bucket) are not all OSErrors
            return [f"{flag}={workdir} cannot be written ({type(e).__name__}: {e}): check the bucket and your "
                    f"credentials, or choose another {flag}."]
        return []
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"{flag}={workdir} cannot be created: {existing} is a file, not a folder. Choose another {flag}."]
    try:  # os.access says yes to root on a read-only mount: try it (a local folder: leaves no file, even if killed)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return [f"{flag}={workdir} cannot be written ({existing}: {e.strerror}): choose a folder you can write, "
                f"or fix the permissions of {existing}."]
    return []


def source_problems(c: ml_collections.ConfigDict) -> list[str]:
    """The model and data sources' cheap checks (folders, configs, tokenizers; no weights read)."""
    try:
        backbone = backbones.get(c)
    except (KeyError, ImportError):
        return []  # reported by the config's own checks
    problems = data_lib.problems(c) + backbone.check_source() + regression_problems(c, backbone)
    if not problems:  # LoRA's targets against the architecture (its config only, no weights)
        problems += adapters.problems(c, backbone)
    return problems


def regression_problems(c: ml_collections.ConfigDict, backbone) -> list[str]:
    """DMD v1's regression: its pair cache, if it has one (`data.pairs.problems`); with LPIPS, a backbone
    whose latents a VAE decodes (a pipeline backbone checks its VAE in `vae_problems`), and LPIPS' two
    weight files (their keys are checked when they load)."""
    r = c.regression
    # DMD v1's pair cache: made by this run's teacher (model, grid, CFG).
    p = pairs.problems(c, backbone.schedule.teacher_grid(c.teacher)) if config_lib.regression_pairs(c) else []
    if not config_lib.lpips_regression(c):
        return p
    if not hasattr(backbone, "vae_problems"):  # a pipeline backbone checks its VAE itself
        p.append(f"regression.distance='lpips' compares VAE-decoded images, and backbone {c.backbone!r} has no "
                 "VAE: use regression.distance='l2'.")
    for key, what in (("vgg", "torchvision's VGG16 state dict"),
                      ("lpips_heads", "the lpips package's weights/v0.1/vgg.pth")):
        if not r[key]:
            p.append(f"regression.distance='lpips' needs --config.regression.{key}: {what} as .safetensors "
                     "(python -m dpdmd_jax.weights.lpips IN.pth OUT.safetensors).")
        elif not epath.Path(r[key]).is_file():
            p.append(f"regression.{key}={r[key]!r} does not exist ({what} as .safetensors).")
    return p


def mesh_problems(c: ml_collections.ConfigDict, devices=None) -> list[str]:
    """Whether the mesh sizes fit `devices` (default: all of this run's) and the batch splits over them."""
    try:
        mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    except ValueError as e:
        return [f"mesh: {e} (--config.mesh.data / .fsdp / .tensor)"]
    try:
        mesh_lib.check_batch_divisible(c.batch_size, mesh, "batch_size")
    except ValueError as e:
        return [f"{e} (--config.batch_size)"]
    return []


def run_problems(c: ml_collections.ConfigDict, workdir: str | None = None, check_mesh: bool = True,
                 devices=None) -> list[str]:
    """Every problem of a run of `c` in `workdir`, one sentence each (empty: it can start). The mesh is
    checked against `devices` (default: all JAX sees; `check_mesh=False`: a dry run before the processes of a
    multi-process run have joined, when only this process's devices are known)."""
    problems = config_problems(c)
    if not any(p.startswith(("backbone=", "model.source is empty")) for p in problems):
        problems += source_problems(c)
    if check_mesh and isinstance(c.batch_size, int) and c.batch_size > 0:
        problems += mesh_problems(c, devices)
    if workdir is not None:
        here = workdir_problems(workdir)
        if not here and epath.Path(workdir).is_dir():
            try:
                check_workdir_config(workdir, c, write=False)
            except config_lib.ConfigError as e:
                here = [str(e)]
        problems += here
    return problems


def config_problems(c: ml_collections.ConfigDict) -> list[str]:
    """Every invalid value of `c`, one sentence each (empty: the config is valid); each component's
    own checks (the backbone's schedule, the auto anchor, the evaluators) come from its registry."""
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
    if c.model.teacher_dtype not in ("", "float32", "bfloat16", "float16"):
        p.append(f"model.teacher_dtype={c.model.teacher_dtype!r}: choose float32, bfloat16 or float16 ('' = "
                 "model.param_dtype).")
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
    if c.distill.target not in config_lib.TARGETS:
        p.append(f"distill.target={c.distill.target!r}; choose one of {config_lib.TARGETS}.")
    elif schedule is not None and c.distill.target not in schedule.targets:
        p.append(f"distill.target={c.distill.target!r} does not fit backbone {c.backbone!r}'s {schedule.name} "
                 f"schedule; choose one of {schedule.targets}.")
    if not isinstance(c.distill.fake_updates_per_student, int) or c.distill.fake_updates_per_student < 0:
        p.append(f"distill.fake_updates_per_student={c.distill.fake_updates_per_student!r} must be an integer >= 0.")
    if c.dmd.simulation not in config_lib.SIMULATIONS:
        p.append(f"dmd.simulation={c.dmd.simulation!r}; choose one of {config_lib.SIMULATIONS}.")
    p.extend(config_lib.baseline_problems(c))  # regression and GAN
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
        if not ok or any(t not in mesh_lib.MESH_AXES for t in targets):
            p.append(f"mesh.rules entry {rule!r} must be (logical_axis, mesh_axis | None | (mesh_axes, ...)) with "
                     f"mesh axes from {mesh_lib.MESH_AXES}.")
    if c.text.dtype not in ("float32", "bfloat16"):
        p.append(f"text.dtype={c.text.dtype!r}; choose 'bfloat16' or 'float32' (T5 overflows in float16).")
    if not isinstance(c.text.max_sequence_length, int) or not 1 <= c.text.max_sequence_length <= 512:
        p.append(f"text.max_sequence_length={c.text.max_sequence_length!r} must be an integer in 1..512 "
                 "(T5's tokens; SD3: 256).")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite"):
        if c[key] < 1:
            p.append(f"{key}={c[key]} must be >= 1.")
    return p + eval_lib.problems(c)


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError listing every invalid value, before any weight is read or step compiled."""
    problems = config_problems(c)
    if problems:
        raise config_lib.ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))


def check_can_start(c: ml_collections.ConfigDict, workdir: str | None = None, devices=None) -> None:
    """Raises ConfigError listing every problem of the run (config, sources and, given one, the
    workdir) at once, before anything is loaded or written."""
    problems = run_problems(c, workdir, devices=devices)
    if problems:
        raise config_lib.ConfigError("the run cannot start:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------- dry run


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, ml_collections.ConfigDict):
        d = d.to_dict()
    if not isinstance(d, dict) or not d:
        return {prefix[:-1]: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _load_config_file(path: str, arg: str | None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("_dry_run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def field_sources(config_file: str | None, overrides: dict[str, Any]) -> dict[str, str]:
    """Where each field's value came from: "default" (the config file), "variant" (its `:arg`),
    "recorded" (a workdir's config.json, `dpdmd_jax.run_config`) or "command line" (a
    `--config.field=value` override, or a field under one)."""
    sources: dict[str, str] = {}
    if config_file:
        path, _, arg = config_file.partition(":")
        if arg:
            try:
                plain = _flatten(_load_config_file(path, None))
            except TypeError:  # its argument is required: run_config.py's is the workdir whose record it reads
                plain = None
            varied = _flatten(_load_config_file(path, arg))
            label = "variant" if plain is not None else "recorded"
            sources = {k: label for k in varied if plain is None or plain.get(k, object()) != varied[k]}
    for key in overrides:
        sources[key] = "command line"
    return sources


def config_table(c: ml_collections.ConfigDict, sources: dict[str, str]) -> str:
    """Every field of `c`, its value and where it came from, one line each."""
    flat = _flatten(c)
    width = max(len(k) for k in flat)
    lines = []
    for key, value in flat.items():
        origin = next((s for k, s in sources.items() if key == k or key.startswith(k + ".")), "default")
        lines.append(f"  {key:<{width}}  {json.dumps(value, default=str):<40}  {origin}")
    return "\n".join(lines)


def plan(c: ml_collections.ConfigDict, workdir: str) -> str:
    """What a run would load and write, read from the folders without loading any weight."""
    lines = [f"  backbone      {c.backbone} (model.source={c.model.source!r}, {c.model.dtype} compute, "
             f"scan_layers={c.model.scan_layers}, remat_policy={c.model.remat_policy!r})",
             f"  data          {c.data.kind}" + (f" ({c.data.prompt_file})" if c.data.kind == "prompts" else "")]
    try:
        backbone = backbones.get(c)
        if not getattr(backbone, "builtin_source", lambda: True)():  # a diffusers pipeline folder
            lines.append(f"  pipeline      {backbone.pipeline_root}")
            if backbone.needs_vae():
                lines.append("  vae           decodes the sample grids (evals of type 'samples')")
    except Exception as e:  # noqa: BLE001 (a dry run reports, the problems list says what to fix)
        lines.append(f"  backbone      cannot be built: {e}")
    steps = checkpoint_steps(workdir)
    if not steps:
        state = "new run (nothing is written until the run starts)"
    elif steps[-1] >= c.num_rounds:
        state = f"already finished at round {steps[-1]} (num_rounds={c.num_rounds})"
    else:
        state = f"resumes from round {steps[-1]} of {c.num_rounds}"
    lines.append(f"  workdir       {workdir}: {state}")
    lines.append(f"  rounds        {c.num_rounds} x (M={c.distill.fake_updates_per_student} critic updates + 1 "
                 f"generator update), global batch {c.batch_size}, checkpoint every {c.checkpoint_every}")
    return "\n".join(lines)
