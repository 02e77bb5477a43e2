"""What the backbones read from a diffusers pipeline folder share: the folder itself (local, or a
hub snapshot), the cheap up-front checks of its text side, its VAE for decoding samples.

A subclass sets `components` (the pipeline's subfolders), `text_check(root)` (config and tokenizer
checks of its encoders) and `load_text_encoder`; `model.source` is the pipeline root (or, for the
denoiser alone, its folder), `text.source` overrides where the encoders and the VAE come from.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax.config import lpips_regression
from dpdmd_jax.models.vae import from_model_latent, to_model_latent
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.weights.loader import abstract_model
from dpdmd_jax.weights.pipeline import component_folder, component_problems, resolve_pipeline
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.vae import load_vae, read_config

TEXT_KINDS = ("prompts", "diffusiondb")  # data sources that need the text encoders
PRESET = "preset:"  # model.source="preset:NAME": a named architecture with random weights


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where a backbone's teacher comes from (`model.source`): a diffusers folder, the shipped toy
    teacher, or random weights for tests. Each backbone picks one strategy once
    (`PipelineBackbone.weight_source`), and nothing else asks what the source string says."""

    builtin: bool  # not a pipeline folder: no text encoders or VAE of its own (text.source may lend them)
    arch: Callable[[], Any]  # the denoiser's architecture config
    load: Callable[[Mesh, Any], Any]  # (mesh, rules) -> the teacher, each parameter on its sharding
    context_len: int | None = None  # tokens of the conditioning its own text encoder makes (the toy's)


def preset_source(c: ml_collections.ConfigDict, model_class: type, config_class: type, presets: dict[str, dict],
                  overrides: dict[str, Any]) -> WeightSource:
    """`model.source="preset:NAME"`: the architecture of `presets[NAME]` with random weights from
    `seed`, initialised directly on their shardings (full-size shapes without a checkpoint: plans,
    benchmarks, smoke tests on real hardware). The text side and the VAE come from `text.source`."""
    name = c.model.source[len(PRESET):]
    arch = lambda: config_class(**presets[name])
    build = lambda rngs: model_class(dataclasses.replace(arch(), **overrides), rngs=rngs)
    return WeightSource(True, arch, lambda mesh, rules: random_model(build, c.seed, mesh, rules))


def random_model(build: Callable[[nnx.Rngs], nnx.Module], seed: int, mesh: Mesh, rules) -> nnx.Module:
    """`build(nnx.Rngs(seed))`, its parameters initialised by one jitted program directly on their
    shardings (eagerly, every initializer would be a small compile of its own: seconds per model)."""
    graphdef, state = nnx.split(abstract_model(build, seed))
    init = jax.jit(lambda: nnx.state(build(nnx.Rngs(seed))), out_shardings=mesh_lib.state_shardings(state, mesh, rules))
    return nnx.merge(graphdef, init())


class PipelineBackbone:
    components: tuple[str, ...] = ()
    family: str = ""  # "SD3/SD3.5", "SDXL": for messages
    model_class: type  # the denoiser (MMDiT, UNet2DConditionModel)
    presets: dict[str, dict] = {}  # architectures `model.source="preset:NAME"` names
    default_preset: str = ""  # what the planner assumes when model.source is empty
    key_map: Callable  # the weights' key map (cfg, abstract state) -> {our path: diffusers keys}
    lora_targets: tuple[str, ...] = ()  # LoRA's default targets (peft names of linear layers)

    def __init__(self, config: ml_collections.ConfigDict):
        self.c = config
        self.source = config.model.source
        self.weights = self.weight_source(config)

    def weight_source(self, config: ml_collections.ConfigDict) -> WeightSource:
        raise NotImplementedError

    def builtin_source(self) -> bool:
        """Sources that are not folders (toy / random weights)."""
        return self.weights.builtin

    @functools.cached_property
    def arch(self):
        return self.weights.arch()

    def load(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
        return self.weights.load(mesh, rules)

    def exec_overrides(self) -> dict[str, Any]:
        """How the run executes the denoiser (dtypes, scan, remat, ...): the config's, over the
        architecture's defaults."""
        raise NotImplementedError

    def abstract_teacher(self) -> nnx.Module:
        """The teacher as `load` builds it (architecture, dtypes, scan, remat), shapes only: no
        weights read, nothing allocated (`run.plan`)."""
        arch = dataclasses.replace(self.arch, **self.exec_overrides())
        return abstract_model(lambda rngs: self.model_class(arch, rngs=rngs), self.c.seed)

    def module_names(self, model: nnx.Module) -> dict[tuple, tuple[str, ...]]:
        """Each kernel-holding layer's module names in the diffusers model, one per layer of a scanned
        stack (what LoRA targets match, as peft's target_modules: `distill.adapters`)."""
        sources = type(self).key_map(model.cfg, nnx.state(model))
        return {path[:-1]: tuple(k.removesuffix(".weight") for k in src.keys)
                for path, src in sources.items() if path[-1] == "kernel"}

    def abstract_text_encoders(self) -> dict[str, nnx.Module]:
        """The pipeline's text encoders in `text.dtype`, shapes only (their published architectures:
        the planner counts what they hold on device)."""
        raise NotImplementedError

    def text_check(self, root: str) -> list[str]:
        raise NotImplementedError

    @functools.cached_property
    def pipeline_root(self) -> str:
        """The local diffusers pipeline folder the text encoders and the VAE come from
        (`text.source`, else `model.source`; a hub id is fetched where the network allows)."""
        return resolve_pipeline(self.c.text.source or self.source, self.components)

    def check_source(self) -> list[str]:
        """Cheap checks of `model.source` (its config) and, when the data are prompts, of the
        pipeline's text side, before anything is loaded."""
        builtin = self.builtin_source()
        if self.source.startswith(PRESET) and self.source[len(PRESET):] not in self.presets:
            return [f"model.source={self.source!r}: no such {self.family} architecture; presets: "
                    + ", ".join(f"{PRESET}{name}" for name in self.presets)]
        if not builtin:
            try:
                self.arch  # noqa: B018  (reads config.json: the folder, or a hub snapshot of it)
            except CheckpointError as e:
                return [f"model.source={self.source!r}: {e}. Set --config.model.source to a diffusers {self.family} "
                        "pipeline folder (or its denoiser's folder)."]
        problems = [] if builtin else self.weights_problems()
        if self.needs_vae():
            problems += self.vae_problems()
        if self.c.data.kind not in TEXT_KINDS:
            return problems
        if builtin and not self.c.text.source:
            return [*problems, f"data.kind={self.c.data.kind!r} needs the text encoders of a diffusers pipeline, "
                    f"and model.source={self.source!r} is not one: set --config.text.source to its folder."]
        try:
            return problems + self.text_check(self.pipeline_root)
        except CheckpointError as e:
            return [*problems, f"text.source: {e}"]

    def weights_problems(self) -> list[str]:
        """The denoiser's folder must hold its weights, not only its config.json."""
        folder = component_folder(self.source, next(iter(self.components)))  # the denoiser
        if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
            return [f"model.source={self.source!r}: {folder} has no .safetensors weights (diffusers' "
                    "save_pretrained(..., safe_serialization=True) writes them)."]
        return []

    def needs_vae(self) -> bool:
        """The VAE is read to decode sample grids (evaluators of type "samples") and the samples of
        DMD v1's LPIPS regression."""
        return bool(self._vae_uses())

    def _vae_uses(self) -> dict[str, str]:
        """What the VAE decodes in this run -> how to do without it."""
        uses = {}
        if any(e.get("type") == "samples" for e in self.c.get("evals", {}).values()):
            uses["the sample grids of evals of type 'samples'"] = "drop those evals (--config.evals={})"
        if lpips_regression(self.c):
            uses["the samples of regression.distance='lpips'"] = ("use regression.distance='l2' (on the toy the "
                                                                   "latents are the images)")
        return uses

    def vae_problems(self) -> list[str]:
        without = self._vae_uses()
        uses = " and ".join(without)
        if self.builtin_source() and not self.c.text.source:
            return [f"{uses} decode with a pipeline's VAE, and model.source={self.source!r} has none: set "
                    f"--config.text.source to a pipeline folder, or {' and '.join(without.values())}."]
        try:
            root = self.pipeline_root
        except CheckpointError as e:
            return [f"text.source: {e}"]
        missing = component_problems(root, ["vae"])
        if missing:
            return [f"{m} (its VAE decodes {uses})" for m in missing]
        try:
            read_config(os.path.join(root, "vae"))
        except CheckpointError as e:
            return [f"vae: {e}"]
        return []

    def has_vae(self) -> bool:
        """Whether samples are decoded by a pipeline's VAE (the toy's latents are its images)."""
        return not self.builtin_source() or bool(self.c.text.source)

    def load_vae(self, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES, dtype: str = "float32"):
        return load_vae(os.path.join(self.pipeline_root, "vae"), dtype=dtype, mesh=mesh, rules=rules)

    def decode(self, vae, z: jax.Array) -> jax.Array:
        """Latents (as the denoiser sees them) -> images NHWC in [-1, 1]."""
        return vae.decode(from_model_latent(vae.cfg, z))

    def encode(self, vae, images: jax.Array) -> jax.Array:
        """Images NHWC in [-1, 1] -> latents as the denoiser sees them: the posterior's mean (diffusers'
        `latent_dist.mode()`), not a draw, so a cache of real latents is one fixed set."""
        return to_model_latent(vae.cfg, vae.encode(images)[0])
