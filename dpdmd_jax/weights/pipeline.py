"""diffusers pipeline folders (`model_index.json` + one subfolder per component): finding them
(local, or a hub snapshot where the network allows) and checking their components up front."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from dpdmd_jax.weights.safetensors_io import CheckpointError

# Component subfolders of a StableDiffusion3Pipeline, and what each holds.
SD3_COMPONENTS = {
    "transformer": "SD3Transformer2DModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModelWithProjection (CLIP-L)",
    "text_encoder_2": "CLIPTextModelWithProjection (OpenCLIP-bigG)",
    "text_encoder_3": "T5EncoderModel (T5-XXL)",
    "tokenizer": "CLIPTokenizer",
    "tokenizer_2": "CLIPTokenizer",
    "tokenizer_3": "T5TokenizerFast",
}

# ... and of a StableDiffusionXLPipeline.
SDXL_COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel (CLIP-L)",
    "text_encoder_2": "CLIPTextModelWithProjection (OpenCLIP-bigG)",
    "tokenizer": "CLIPTokenizer",
    "tokenizer_2": "CLIPTokenizer",
}


def resolve_pipeline(path: str | os.PathLike, components: Iterable[str] = ()) -> str:
    """A local pipeline root: `path` itself, or (when it is not a local path and looks like a hub
    id) a snapshot of `components` fetched from the hub."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(path, allow_patterns=["model_index.json", *(f"{c}/*" for c in components)])
        except Exception as e:  # offline, unknown repo, gated...
            raise CheckpointError(
                f"{path!r} is not a local folder and could not be fetched from the hub ({type(e).__name__}: {e}). "
                "Pass the path of a local diffusers pipeline folder."
            ) from e
    raise CheckpointError(f"pipeline folder {path!r} does not exist")


def component_folder(path: str | os.PathLike, component: str) -> str:
    """A model folder: `path` itself when it holds a config.json, else its `component/` subfolder
    (`path` is a pipeline root)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist")
    nested = os.path.join(path, component)
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(nested):
        return nested
    return path


def component_problems(root: str, components: Iterable[str]) -> list[str]:
    """One sentence per component subfolder of `root` that is missing or empty."""
    problems = []
    table = {**SD3_COMPONENTS, **SDXL_COMPONENTS}
    for name in components:
        folder = os.path.join(root, name)
        if not os.path.isdir(folder) or not os.listdir(folder):
            problems.append(f"{root} has no {name}/ folder (the pipeline's {table.get(name, name)}); "
                            "point the config at a complete diffusers pipeline folder")
    return problems
