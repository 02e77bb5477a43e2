"""Shared test utilities of the parity and integration tiers: small random diffusers reference models
saved to temp folders, torch <-> NHWC conversions (imports torch: never import this from tests/unit)."""

from __future__ import annotations

import numpy as np
import torch

from tests.helpers import rel_err  # noqa: F401  (re-exported: parity files import it from here too)


def save_random_sd3(folder, seed: int = 0, dtype=torch.float32, **config) -> "torch.nn.Module":
    """Builds a small random diffusers SD3Transformer2DModel, perturbs every parameter (so
    zero-initialised ones are exercised too), saves it with save_pretrained, returns it (eval)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    return model.to(dtype)


def save_random_unet(folder, arch: dict, seed: int = 0, max_shard_size=None) -> "torch.nn.Module":
    """A small random diffusers UNet2DConditionModel with every parameter perturbed (so the norms'
    scales and shifts are not just ones and zeros), saved; returned in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**arch).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    ref.save_pretrained(folder, safe_serialization=True, **kw)
    return ref


def unet_torch_kwargs(x: dict) -> dict:
    """Our NHWC numpy inputs {sample, timesteps, context[, text_embeds, time_ids]} as
    `UNet2DConditionModel` kwargs (int timesteps as int64, as the pipelines pass them)."""
    added = {k: torch.from_numpy(x[k]) for k in ("text_embeds", "time_ids") if k in x}
    t = x["timesteps"]
    t = torch.from_numpy(t.astype(np.int64) if t.dtype.kind == "i" else t)
    return dict(sample=nchw(x["sample"]), timestep=t, encoder_hidden_states=torch.from_numpy(x["context"]),
                added_cond_kwargs=added or None, return_dict=False)


def unet_torch_forward(ref, x: dict) -> np.ndarray:
    with torch.no_grad():
        return nhwc(ref(**unet_torch_kwargs(x))[0])


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def sd3_torch_kwargs(x: dict) -> dict:
    """Our NHWC numpy inputs {latents, timesteps, context, pooled} as `SD3Transformer2DModel` kwargs."""
    return dict(
        hidden_states=nchw(x["latents"]),
        encoder_hidden_states=torch.from_numpy(x["context"]),
        pooled_projections=torch.from_numpy(x["pooled"]),
        timestep=torch.from_numpy(x["timesteps"]),
        return_dict=False,
    )


def copy_checkpoint(src, dst, weights_name: str, edit_tensors=None, edit_config=None) -> str:
    """Copies a one-file model folder (config.json + `weights_name`) to `dst`, letting
    `edit_tensors(dict)` / `edit_config(dict)` change it in place on the way (bad-input tests)."""
    import json
    import os

    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, weights_name))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, os.path.join(dst, weights_name))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if edit_config:
        edit_config(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)
