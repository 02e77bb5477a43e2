"""LoRA adapters <-> diffusers LoRA files (`pytorch_lora_weights.safetensors`), the way users load them.

A LoRA student (`distill.adapters`) is the teacher plus low-rank adapters; diffusers loads such a
student onto the teacher's pipeline with `pipe.load_lora_weights(folder)` (peft under the hood).
The file holds, for every adapted linear layer, peft's `<component>.<module>.lora_A.weight` (r, in)
and `.lora_B.weight` (out, r), `<component>` being `transformer` (SD3) or `unet` (SDXL); the key maps
of `weights.sd3` / `weights.unet` name them, scanned stacks one key per layer, as for the kernels.

Scale. Our branch is `scale * (x A) B` with scale = alpha / r (`models.lora`). A file without
adapter metadata (ours) makes diffusers build the adapter with lora_alpha = r, i.e. scale 1, so
`save_lora` folds our scale into lora_B (B_file = scale * B): the file's `lora_B @ lora_A` is the
whole update, whatever rank and alpha the run used. `load_lora` undoes it with the run's scale
(B = B_file * file_scale / scale), where file_scale is 1 unless the file carries diffusers'
`lora_adapter_metadata` (lora_alpha / r, as files saved by diffusers' training scripts do): the
loaded adapters compute the file's update for any alpha; only the rank and targets must match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from dpdmd_jax.weights import loader, sd3, unet
from dpdmd_jax.weights.export import ExportError, student_scheduler, write_new_folder, write_scheduler
from dpdmd_jax.weights.safetensors_io import CheckpointError, read_header, write_file

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (peft LoraConfig, prefixed)
COMPONENTS = {"mmdit": "transformer", "unet": "unet"}  # the state-dict prefix of the denoiser's adapters
PIPELINES = {"mmdit": "StableDiffusion3Pipeline", "unet": "StableDiffusionXLPipeline"}
MODELS = {"mmdit": "SD3Transformer2DModel", "unet": "UNet2DConditionModel"}
_KEY_MAPS = {"mmdit": sd3.key_map, "unet": unet.key_map}

Path = tuple[Any, ...]


def _component(backbone: str) -> str:
    if backbone not in COMPONENTS:
        raise ValueError(f"backbone {backbone!r}: LoRA files are written for {tuple(COMPONENTS)}")
    return COMPONENTS[backbone]


def sources(backbone: str, cfg: Any, adapters: nnx.State) -> dict[Path, loader.Source]:
    """Each adapter leaf's keys in the LoRA file (prefixed with the denoiser's component name)."""
    prefix = _component(backbone)
    return {path: dataclasses.replace(src, keys=tuple(f"{prefix}.{k}" for k in src.keys))
            for path, src in _KEY_MAPS[backbone](cfg, adapters).items()}


def _folded(adapters: nnx.State, factor: float) -> nnx.State:
    """The adapters with every B multiplied by `factor` (on the host, in float32: they are small)."""
    return nnx.from_flat_state([
        (path, var.replace(np.asarray(jax.device_get(var.get_value()), np.float32) * factor)
         if path[-1] == "b" else var) for path, var in nnx.to_flat_state(adapters)])


def save_lora(backbone: str, cfg: Any, adapters: nnx.State, out_dir: str | os.PathLike, scale: float, *,
              dtype: Any = None, overwrite: bool = False) -> str:
    """Writes `adapters` (a role's adapter state; `cfg` the denoiser's config, for the key map) as
    `out_dir/pytorch_lora_weights.safetensors`, which `StableDiffusion3Pipeline` /
    `StableDiffusionXLPipeline.load_lora_weights(out_dir)` load. `scale` (alpha / rank of the role:
    it lives in the graphdef, not in the state) is folded into lora_B. Returns the file's path."""
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, WEIGHTS_NAME)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another folder")
    os.makedirs(out_dir, exist_ok=True)
    # diffusers reads a file without adapter metadata as lora_alpha = r (scale 1): the file's B
    # carries our scale, so B_file @ A_file is the whole update.
    state = _folded(adapters, scale)
    srcs = sources(backbone, cfg, state)
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    write_file(path, loader.export_tensors(state, srcs, np_dtype), loader.checkpoint_shapes(state, srcs, np_dtype))
    return path


def _file_of(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    file = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}; expected a diffusers LoRA folder (what "
                              "`pipe.save_lora_weights` or `python -m dpdmd_jax.export` writes) or its "
                              ".safetensors file")
    return file


def file_scale(file: str, component: str) -> float:
    """The scale diffusers gives the file's adapters: 1 (lora_alpha = r) unless the file carries
    peft settings in its `lora_adapter_metadata`."""
    with safe_open(file, framework="numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return 1.0
    meta = {k.removeprefix(component + "."): v for k, v in json.loads(raw).items() if k.startswith(component + ".")}
    if not meta:
        return 1.0
    if meta.get("rank_pattern") or meta.get("alpha_pattern") or meta.get("use_dora"):
        raise CheckpointError(f"{file}: its adapters have per-layer ranks / alphas or are DoRA "
                              f"({METADATA_KEY}); our LoRA adapters share one rank and scale and are plain LoRA")
    if "r" not in meta or "lora_alpha" not in meta:
        raise CheckpointError(f"{file}: {METADATA_KEY} names no r / lora_alpha for {component}")
    return float(meta["lora_alpha"]) / (math.sqrt(meta["r"]) if meta.get("use_rslora") else float(meta["r"]))


def _kinds(keys: Sequence[str], component: str) -> str:
    """The layer kinds of LoRA keys, e.g. 'transformer_blocks.N.attn.to_q' (peft target names)."""
    names = {re.sub(r"\.\d+\.", ".N.", re.sub(r"\.lora_[AB]\.weight$", "", k.removeprefix(component + ".")))
             for k in keys}
    names = sorted(names)
    return ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")


def check_file(tensors: dict[str, Any], expected: dict[str, tuple[int, ...]], component: str, file: str,
               field: str) -> None:
    """Raises one CheckpointError naming what differs between a LoRA file's tensors and what the
    role's adapters expect (rank, layers, components), and the setting that fixes it."""
    ours = f"{component}."
    other = sorted({k.split(".")[0] for k in tensors if not k.startswith(ours)})
    if other:
        raise CheckpointError(f"{file} also adapts {', '.join(other)} (keys not under '{ours}'); a dpdmd student "
                              f"adapts the {component} only: keep just its '{ours}' keys")
    got_rank = sorted({t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight")})
    if not got_rank:
        raise CheckpointError(f"{file} holds no peft LoRA weights ('{ours}<module>.lora_A.weight'); other LoRA "
                              "formats (kohya's lora_down / lora_up) load in diffusers, which can re-save them")
    want_rank = sorted({s[0] for k, s in expected.items() if k.endswith(".lora_A.weight")})
    if got_rank != want_rank:
        raise CheckpointError(f"{file} has adapters of rank {', '.join(map(str, got_rank))}, the config's "
                              f"{field}.rank is {', '.join(map(str, want_rank))}: set --config.{field}.rank="
                              f"{got_rank[0]}")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"it has no adapters for layers the config's {field}.targets select "
                        f"({_kinds(missing, component)})")
    if unexpected:
        problems.append(f"it adapts layers the targets do not select ({_kinds(unexpected, component)})")
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems) + f". Set --config.{field}.targets to the layers it "
                              f"adapts: {_kinds(list(tensors), component)} (peft target_modules names)")
    mismatched = [f"{k} (file {list(tensors[k].shape)}, expected {list(s)})" for k, s in expected.items()
                  if tuple(tensors[k].shape) != tuple(s)]
    if mismatched:
        raise CheckpointError(f"{file}: shape mismatches, {', '.join(mismatched[:6])}: it is a LoRA of another "
                              "architecture than the config's model.source")


def load_lora(path: str | os.PathLike, backbone: str, cfg: Any, template: nnx.State, scale: float, *,
              shardings: Any = None, field: str = "student.lora") -> nnx.State:
    """A diffusers LoRA folder (or its .safetensors file) as our adapter state, shaped and placed as
    `template` (the role's abstract adapters, `distill.adapters.adapted`) on `shardings` (a matching
    tree of shardings, or one for all; default device 0). `scale` is the role's alpha / rank: the
    loaded B is B_file * file_scale / scale, so the adapters compute the file's update
    (module docstring). `field` names the config block in error messages."""
    file = _file_of(path)
    component = _component(backbone)
    tensors = read_header(file)
    srcs = sources(backbone, cfg, template)
    check_file(tensors, {k: s.shape for s in srcs.values() for k in s.keys}, component, file, field)
    factor = file_scale(file, component) / scale
    unfold = lambda w: loader.linear_to_ours(w).astype(np.float32) * factor
    srcs = {p: dataclasses.replace(s, transform=unfold) if p[-1] == "b" else s for p, s in srcs.items()}
    return loader.load_state(template, srcs, tensors, jax.devices()[0] if shardings is None else shardings, file,
                             progress=False)


def merge_adapters(base: nnx.State, adapters: nnx.State, scale: float) -> nnx.State:
    """`base` with every adapted kernel replaced by W + scale * A @ B, computed in float32 (and kept
    float32); the other leaves are `base`'s own arrays. What a diffusers model holds after
    `fuse_lora`, as a whole model for `from_pretrained`."""
    layers: dict[Path, dict[str, jax.Array]] = {}
    for path, var in nnx.to_flat_state(adapters):
        layers.setdefault(tuple(path[:-2]), {})[path[-1]] = var.get_value()
    fold = jax.jit(lambda w, a, b: w.astype(jnp.float32) + scale * jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST))
    merged, done = [], set()
    for path, var in nnx.to_flat_state(base):
        layer = tuple(path[:-1])
        if path[-1] == "kernel" and layer in layers:
            var = var.replace(fold(var.get_value(), layers[layer]["a"], layers[layer]["b"]))
            done.add(layer)
        merged.append((path, var))
    if done != set(layers):
        raise AssertionError(f"adapters without a kernel in the base: {sorted(set(layers) - done, key=str)[:5]}")
    return nnx.from_flat_state(merged)


def usage(backbone: str, teacher: str | None, out: str, scheduler_class: str, call: dict) -> list[str]:
    """The Python lines that sample the exported LoRA with diffusers (`teacher`: its pipeline folder,
    None for a teacher that has none, the toy / random models)."""
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    if teacher is None:
        # (a model's load_lora_adapter looks for .safetensors only when asked, unlike the pipelines')
        return [f"model.load_lora_adapter({out!r}, prefix={_component(backbone)!r}, use_safetensors=True)  "
                f"# model: the teacher as a diffusers {MODELS[backbone]} (it has no pipeline; --merged writes the "
                "student whole)", f"# sample it with the scheduler in {out}/scheduler and {args}"]
    pipeline = PIPELINES[backbone]
    return [f"from diffusers import {pipeline}, {scheduler_class}",
            f"pipe = {pipeline}.from_pretrained({teacher!r})",
            f"pipe.load_lora_weights({out!r})",
            f"pipe.scheduler = {scheduler_class}.from_pretrained({out!r}, subfolder='scheduler')",
            f"image = pipe(prompt, {args}).images[0]"]


def write_lora_folder(backbone: str, out: str, write_weights: Callable[[str], object], grid, meta: dict,
                      root: str | None, teacher_scheduler: dict | None = None) -> str:
    """A LoRA export at `out`: `pytorch_lora_weights.safetensors` (`write_weights(folder)` writes it),
    the student's scheduler (`weights.export.student_scheduler` of `root`'s, or of `teacher_scheduler`
    without a pipeline `root`) and `dpdmd_student.json` (`meta`, the grid, the call arguments and
    the `load` recipe), written to a temporary sibling and renamed into place."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise ExportError(f"--out={out} exists; exports never overwrite: choose a new folder or remove it.")
    if root is not None:
        with open(os.path.join(root, "scheduler", "scheduler_config.json")) as f:
            teacher_scheduler = json.load(f)
    if teacher_scheduler is None:
        raise ExportError("a LoRA export without a pipeline root needs its teacher_scheduler (export.toy_scheduler)")
    scheduler, call = student_scheduler(backbone, grid, teacher_scheduler)
    record = dict(meta, teacher=root, student_grid=[float(x) for x in grid], call=call,
                  load=usage(backbone, root, out, scheduler["_class_name"], call))

    def fill(tmp: str) -> None:
        write_weights(tmp)
        write_scheduler(tmp, scheduler)
        with open(os.path.join(tmp, "dpdmd_student.json"), "w") as f:
            json.dump(record, f, indent=2)

    return write_new_folder(out, fill)
