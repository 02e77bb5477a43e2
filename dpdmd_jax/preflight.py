"""Everything a training run needs, checked before the first byte is written into its workdir, and
the dry run (`python -m dpdmd_jax.main ... --dry_run`) that shows it.

`run_problems` collects every problem at once, one sentence each: the config's values, the model
and data sources (each component folder and file the run will read, the tokenizers), and the
workdir (creatable, writable, holding this experiment or none). The trainer refuses to start while
any is left, so a failed start never leaves a workdir that refuses the corrected command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from typing import Any

import ml_collections

from dpdmd_jax import backbones
from dpdmd_jax import config as config_lib
from dpdmd_jax import data as data_lib
from dpdmd_jax.run_config import check_workdir_config


def workdir_problems(workdir: str, flag: str = "--workdir") -> list[str]:
    """Whether `workdir` is (or can be made) a folder this process can write into."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        return [f"{flag}={workdir} exists and is a file, not a folder: choose another {flag}."]
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [f"{flag}={workdir} cannot be created: {existing} is a file, not a folder. Choose another {flag}."]
    try:  # os.access says yes to root on a read-only mount: try it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return [f"{flag}={workdir} cannot be written ({existing}: {e.strerror}): choose a folder you can write, "
                f"or fix the permissions of {existing}."]
    return []


def checkpoint_steps(workdir: str) -> list[int]:
    """The rounds saved in `workdir`/checkpoints (Orbax names each step's folder by its number)."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if os.path.isdir(folder) else []


def source_problems(c: ml_collections.ConfigDict) -> list[str]:
    """The model and data sources' cheap checks (folders, configs, tokenizers; no weights read)."""
    try:
        backbone = backbones.get(c)
    except (KeyError, ImportError):
        return []  # reported by the config's own checks
    return data_lib.problems(c) + backbone.check_source()


def run_problems(c: ml_collections.ConfigDict, workdir: str | None = None) -> list[str]:
    """Every problem of a run of `c` in `workdir`, one sentence each (empty: it can start)."""
    problems = config_lib.problems(c)
    if not any(p.startswith(("backbone=", "model.source is empty")) for p in problems):
        problems += source_problems(c)
    if workdir is not None:
        here = workdir_problems(workdir)
        if not here and os.path.isdir(workdir):
            try:
                check_workdir_config(workdir, c, write=False)
            except config_lib.ConfigError as e:
                here = [str(e)]
        problems += here
    return problems


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
