r"""OpenCLIP checkpoints (open_clip's `CLIP` state dict: HPSv2 / HPSv2.1, LAION's ViT-H-14) -> our
CLIP towers with their projections and the logit scale.

    python -m dpdmd_jax.weights.open_clip --pt=HPS_v2.1_compressed.pt --out=hps_v2.1.safetensors

open_clip's layout (`open_clip.create_model('ViT-H-14').state_dict()`; HPSv2's `.pt` files hold the
same dict under "state_dict"):
  * text: `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.*`,
    `ln_final`, `text_projection` ([width, embed_dim], used as `x @ text_projection`);
  * vision: `visual.conv1.weight` (no bias), `visual.class_embedding`, `visual.positional_embedding`,
    `visual.ln_pre`, `visual.transformer.resblocks.N.*`, `visual.ln_post`, `visual.proj`
    ([width, embed_dim], `x @ proj`);
  * a resblock: `ln_1`, `attn.in_proj_weight` / `attn.in_proj_bias` (torch `nn.MultiheadAttention`:
    q, k, v stacked on the output axis), `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`;
  * `logit_scale` (a scalar, the log of the contrastive temperature's inverse).
Every key maps to exactly one of our leaves (the fused qkv to three), every leaf to one key; the
whole map is shape-checked against the file before anything is read.

The computation is the transformers CLIP towers' (`dpdmd_jax.models.clip`): pre-LN blocks, ln_pre
before the vision encoder, the CLS token through ln_post, the text pooled at the position of the
largest token id (open_clip's `pool_type='argmax'`; the EOT token 49407 is the largest id) after
ln_final, causal text attention with no padding mask. Our text config expresses argmax pooling as
transformers does for legacy configs: `eos_token_id=2` (`models.clip.LEGACY_EOS_TOKEN_ID`).

The tower sizes come from open_clip's model config (a preset name, a dict in the format of
open_clip's `model_configs/*.json`, or such a json file; a Hugging Face `open_clip_config.json`
with its "model_cfg" works too). ViT-H-14 (open_clip 3.3.0 and HPSv2's vendored copy agree):
vision width 1280, 32 layers, head_width 80 (16 heads), patch 14, image 224; text width 1024,
24 layers, 16 heads, context 77, vocab 49408; embed_dim 1024; exact GELU (no "quick_gelu").
Options that change the computation and that these towers do not implement (layer scale,
attentional pooling, timm / HF towers, projection bias, ...) are refused by name.

torch is not a runtime dependency: the loader reads `.safetensors` only. `convert_pt` (and the
command above) turns a `.pt` into one, importing torch when called.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax import cli
from dpdmd_jax.models.clip import (
    LEGACY_EOS_TOKEN_ID,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    square_size,
)
from dpdmd_jax.parallel.mesh import DEFAULT_RULES, replicated
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.clip import TEXT_MODEL_PREFIX, VISION_MODEL_PREFIX, abstract_clip_text, abstract_clip_vision
from dpdmd_jax.weights.safetensors_io import CheckpointError, TensorInfo, read_header, read_tensor
from dpdmd_jax.weights.torch_files import WRAPPER_PREFIXES, pt_to_safetensors

FLAGS = flags.FLAGS

VISION_PREFIX = "visual."
LOGIT_SCALE_KEY = "logit_scale"
# What open_clip / open_clip_torch's Hugging Face exports name their files.
HF_WEIGHTS_NAME = "open_clip_model.safetensors"
HF_CONFIG_NAME = "open_clip_config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CONVERT_HINT = ("convert it once with `python -m dpdmd_jax.weights.open_clip --pt={path} --out=OUT.safetensors` "
                "(or dpdmd_jax.weights.open_clip.convert_pt), then load the .safetensors")

# open_clip's model_configs/ViT-H-14.json (the HPSv2 / HPSv2.1 / LAION ViT-H-14 towers).
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
PRESETS = {"ViT-H-14": VIT_H_14}

# open_clip config fields and the values our towers compute with (open_clip's defaults). Any other
# value changes the computation in a way the transformers-style towers do not implement.
_VISION_DEFAULTS = {
    "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "pool_type": "tok", "output_tokens": False, "act_kwargs": None,
    "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    "timm_model_name": None, "input_patchnorm": False, "global_average_pool": False,
}
_TEXT_DEFAULTS = {
    "ls_init_value": None, "embed_cls": False, "pad_id": 0, "no_causal_mask": False, "pool_type": "argmax",
    "proj_bias": False, "proj_type": "linear", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None,
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "hf_model_name": None,
}
# Fields that do not change the towers' computation (tokenizer choice, training-only options, and
# final_ln_after_pool: LayerNorm acts per token, so pooling before or after it is the same).
_IGNORED = {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "eos_id", "final_ln_after_pool",
            "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
            "attn_pooler_queries", "attn_pooler_heads", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_scale",
              "init_logit_bias", "nonscalar_logit_scale", "cast_dtype"}


class OpenCLIPTowers(NamedTuple):
    """What an open_clip checkpoint gives: both towers with their projections, and `logit_scale`
    as stored (the log; open_clip's logits use its exp)."""

    text: CLIPTextModel
    vision: CLIPVisionModel
    logit_scale: jax.Array


# ---------------------------------------------------------------------------- configs


def read_model_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's model config as a dict: `config` is a preset name ("ViT-H-14"), such a dict, a
    json file in open_clip's `model_configs/` format, or a Hugging Face `open_clip_config.json`
    (the same under "model_cfg")."""
    if isinstance(config, Mapping):
        raw = dict(config)
    elif str(config) in PRESETS:
        raw = PRESETS[str(config)]
    else:
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise CheckpointError(f"open_clip config {path!r} is neither a preset ({', '.join(PRESETS)}) nor a json "
                                  "file (open_clip's model_configs/NAME.json or a Hugging Face open_clip_config.json)")
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not readable JSON ({e})") from e
    if isinstance(raw, dict) and isinstance(raw.get("model_cfg"), dict):
        raw = raw["model_cfg"]
    if not isinstance(raw, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(raw):
        raise CheckpointError(f"open_clip config {config!r} has no embed_dim / vision_cfg / text_cfg: not an "
                              "open_clip CLIP model config")
    return raw


def _config_name(config: str | os.PathLike | Mapping[str, Any]) -> str:
    return "(dict)" if isinstance(config, Mapping) else os.fspath(config)


def _unsupported(cfg: dict[str, Any], defaults: dict[str, Any], known: set[str], where: str) -> list[str]:
    out = []
    for k, v in cfg.items():
        if k in defaults and v != defaults[k] and not (defaults[k] is False and v is None):
            out.append(f"{where}.{k}={v!r}")
        elif k not in defaults and k not in known and k not in _IGNORED:
            out.append(f"{where}.{k} (unknown field)")
    return out


def tower_configs(config: str | os.PathLike | Mapping[str, Any], *, dtype: str = "float32",
                  param_dtype: str | None = None) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """Our text and vision tower configs (both with their projection to embed_dim) for an open_clip
    model config (see `read_model_config`); options the towers do not implement are named in one
    CheckpointError."""
    raw = read_model_config(config)
    v, t = dict(raw["vision_cfg"]), dict(raw["text_cfg"])
    problems = [f"{k} (unknown field)" for k in raw if k not in _TOP_LEVEL]
    if raw.get("custom_text"):  # CustomTextCLIP keeps the text tower under `text.`: another key layout
        problems.append("custom_text=true")
    if raw.get("init_logit_bias") is not None:  # SigLIP: sigmoid logits with a bias
        problems.append("init_logit_bias (a SigLIP model)")
    if raw.get("nonscalar_logit_scale"):
        problems.append("nonscalar_logit_scale=true")
    problems += _unsupported(v, _VISION_DEFAULTS, {"layers", "width", "head_width", "mlp_ratio", "patch_size",
                                                   "image_size"}, "vision_cfg")
    problems += _unsupported(t, _TEXT_DEFAULTS, {"context_length", "vocab_size", "width", "heads", "layers",
                                                 "mlp_ratio"}, "text_cfg")
    if not isinstance(v.get("layers", 12), int):
        problems.append("vision_cfg.layers is a ResNet stage list (a ModifiedResNet tower)")
    if problems:
        raise CheckpointError(f"open_clip config {_config_name(config)} uses what our CLIP towers do not implement: "
                              f"{', '.join(problems)}")
    act = "quick_gelu" if raw.get("quick_gelu") else "gelu"  # open_clip: QuickGELU iff quick_gelu, else nn.GELU
    dt = dict(dtype=dtype, param_dtype=param_dtype or dtype)
    try:
        vwidth, twidth = v.get("width", 768), t.get("width", 512)
        text = CLIPTextConfig(
            vocab_size=t.get("vocab_size", 49408), hidden_size=twidth,
            intermediate_size=int(twidth * t.get("mlp_ratio", 4.0)), projection_dim=raw["embed_dim"],
            num_hidden_layers=t.get("layers", 12), num_attention_heads=t.get("heads", 8),
            max_position_embeddings=t.get("context_length", 77), hidden_act=act, layer_norm_eps=1e-5,
            bos_token_id=None, eos_token_id=LEGACY_EOS_TOKEN_ID,  # pool at argmax(ids), as open_clip
            pad_token_id=0, with_projection=True, **dt,
        )
        vision = CLIPVisionConfig(
            hidden_size=vwidth, intermediate_size=int(vwidth * v.get("mlp_ratio", 4.0)),
            projection_dim=raw["embed_dim"], num_hidden_layers=v.get("layers", 12),
            num_attention_heads=vwidth // v.get("head_width", 64), num_channels=3,
            image_size=square_size(v.get("image_size", 224), "vision_cfg.image_size"),
            patch_size=v.get("patch_size", 16), hidden_act=act, layer_norm_eps=1e-5, with_projection=True, **dt,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"open_clip config: {e}") from e
    return text, vision


# ---------------------------------------------------------------------------- key map

# Our encoder-layer leaf (path after `encoder.layers.N`) -> the resblock key after `resblocks.N.`.
_LAYER = {
    ("layer_norm1", "weight"): "ln_1.weight", ("layer_norm1", "bias"): "ln_1.bias",
    ("self_attn", "out_proj", "kernel"): "attn.out_proj.weight",
    ("self_attn", "out_proj", "bias"): "attn.out_proj.bias",
    ("layer_norm2", "weight"): "ln_2.weight", ("layer_norm2", "bias"): "ln_2.bias",
    ("mlp", "fc1", "kernel"): "mlp.c_fc.weight", ("mlp", "fc1", "bias"): "mlp.c_fc.bias",
    ("mlp", "fc2", "kernel"): "mlp.c_proj.weight", ("mlp", "fc2", "bias"): "mlp.c_proj.bias",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}  # nn.MultiheadAttention's order in in_proj_*
_TEXT = {
    ("embeddings", "token_embedding", "embedding"): "token_embedding.weight",
    ("embeddings", "position_embedding", "embedding"): "positional_embedding",
    ("final_layer_norm", "weight"): "ln_final.weight", ("final_layer_norm", "bias"): "ln_final.bias",
    ("text_projection", "kernel"): "text_projection",
}
_VISION = {
    ("embeddings", "class_embedding"): "class_embedding",
    ("embeddings", "patch_embedding", "kernel"): "conv1.weight",
    ("embeddings", "position_embedding", "embedding"): "positional_embedding",
    ("pre_layrnorm", "weight"): "ln_pre.weight", ("pre_layrnorm", "bias"): "ln_pre.bias",
    ("post_layernorm", "weight"): "ln_post.weight", ("post_layernorm", "bias"): "ln_post.bias",
    ("visual_projection", "kernel"): "proj",
}


def _qkv_part(w: np.ndarray, part: int, transpose: bool) -> np.ndarray:
    """One of q / k / v from a fused in_proj weight [3D, D] (-> our kernel [D, D]) or bias [3D]."""
    d = w.shape[0] // 3
    w = w[part * d:(part + 1) * d]
    return w.T if transpose else w


def _source(path: tuple[Any, ...], shape: tuple[int, ...], tower: dict, prefix: str) -> loader.Source:
    """The open_clip key, checkpoint shape and layout change of one leaf of a tower's state."""
    if path[:2] == ("encoder", "layers"):
        block, rest = f"{prefix}transformer.resblocks.{path[2]}.", tuple(path[3:])
        if rest[0] == "self_attn" and rest[1] in _QKV:
            kernel = rest[2] == "kernel"
            key = block + ("attn.in_proj_weight" if kernel else "attn.in_proj_bias")
            fused = (3 * shape[1], shape[0]) if kernel else (3 * shape[0],)
            return loader.Source((key,), fused, functools.partial(_qkv_part, part=_QKV[rest[1]], transpose=kernel))
        key = block + _LAYER[rest]
        if rest[-1] == "kernel":
            return loader.Source((key,), shape[::-1], loader.linear_to_ours)
        return loader.Source((key,), shape)
    key = prefix + tower[tuple(path)]
    if path[-2:] == ("patch_embedding", "kernel"):
        kh, kw, i, o = shape
        return loader.Source((key,), (o, i, kh, kw), loader.conv_to_ours)
    return loader.Source((key,), shape)  # projections are stored [in, out] (used as x @ proj), as our kernels


def key_map(abstract_state: nnx.State, tower: str) -> dict[tuple, loader.Source]:
    """For every leaf of our `tower` ("text" | "vision") state: its open_clip key, checkpoint
    shape and layout change."""
    table, prefix = (_TEXT, "") if tower == "text" else (_VISION, VISION_PREFIX)
    return {path: _source(path, tuple(var.get_value().shape), table, prefix)
            for path, var in nnx.to_flat_state(abstract_state)}


# ---------------------------------------------------------------------------- files


def _looks_pickled(path: str) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a bare pickle."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def resolve_weights(path: str | os.PathLike) -> tuple[str, str | None]:
    """(the .safetensors file, the folder's open_clip_config.json or None) for `path`: a file, or a
    folder holding open_clip_model.safetensors. A transformers folder, a `.pt` and a missing path
    each give one error that names what to use instead."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = os.path.join(path, HF_WEIGHTS_NAME)
        if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(weights):
            raise CheckpointError(
                f"{path} is a transformers model folder (config.json), not an open_clip checkpoint; a transformers "
                "CLIPModel (e.g. PickScore) loads with dpdmd_jax.eval.preference.load_pickscore")
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path}: no {HF_WEIGHTS_NAME}; pass the open_clip .safetensors file itself")
        config = os.path.join(path, HF_CONFIG_NAME)
        return weights, config if os.path.isfile(config) else None
    if not os.path.isfile(path):
        raise CheckpointError(f"open_clip checkpoint {path!r} does not exist")
    if path.endswith(PICKLE_SUFFIXES) or _looks_pickled(path):
        raise CheckpointError(f"{path} is a PyTorch pickle, which the loader does not read (torch is not a "
                              f"runtime dependency); {CONVERT_HINT.format(path=path)}")
    return path, None


def check_layout(tensors: dict[str, TensorInfo], what: str) -> None:
    """Refuses a transformers CLIP checkpoint given where an open_clip one is expected, by name."""
    if any(k.startswith((TEXT_MODEL_PREFIX, VISION_MODEL_PREFIX)) for k in tensors):
        raise CheckpointError(
            f"{what} is a transformers CLIP checkpoint (text_model.* / vision_model.* keys), not an open_clip one; "
            "load its model folder with dpdmd_jax.eval.preference.load_pickscore")


def check_keys(tensors: Mapping[str, Any], text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig, what: str,
               config: str | os.PathLike | Mapping[str, Any]) -> None:
    """One CheckpointError naming every missing, unexpected and mis-shaped key of `tensors` (name ->
    anything with a `.shape`) for the two towers and the logit scale (shape-only models: no
    allocation), before anything is read."""
    _, text_state = nnx.split(abstract_clip_text(text_cfg))
    _, vision_state = nnx.split(abstract_clip_vision(vision_cfg))
    sources = {("text", *p): s for p, s in key_map(text_state, "text").items()}
    sources.update({("vision", *p): s for p, s in key_map(vision_state, "vision").items()})
    sources[(LOGIT_SCALE_KEY,)] = loader.Source((LOGIT_SCALE_KEY,), ())
    try:
        loader.validate(sources, tensors, what)
    except CheckpointError as e:  # the same lists, with the fix that applies to open_clip files (if the
        # loader's wording changes, the splits below keep its whole message)
        found = str(e).split(" does not match the model built from its config: ", 1)[-1].split(". Check that")[0]
        raise CheckpointError(f"{what} does not match the open_clip config {_config_name(config)}: {found}. Pass the "
                              "model config these weights were saved with (HPSv2: ViT-H-14)") from None


def load_open_clip(
    path: str | os.PathLike,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
) -> OpenCLIPTowers:
    """Loads an open_clip CLIP checkpoint (`.safetensors`, e.g. HPSv2 after `convert_pt`, or a
    Hugging Face open_clip folder with open_clip_model.safetensors) into our towers.

    Args:
      path: the .safetensors file, or a folder holding open_clip_model.safetensors.
      config: the open_clip model config (`read_model_config`); default: the folder's
        open_clip_config.json, else ViT-H-14 (HPSv2's).
      dtype / param_dtype: compute and storage dtypes; param_dtype defaults to dtype.
      mesh: place every parameter directly onto its sharding on this mesh (else device 0).
    """
    weights, folder_config = resolve_weights(path)
    config = config or folder_config or "ViT-H-14"
    text_cfg, vision_cfg = tower_configs(config, dtype=dtype, param_dtype=param_dtype)
    tensors = read_header(weights)
    check_layout(tensors, weights)
    wrapper = next((w for w in WRAPPER_PREFIXES if tensors and all(k.startswith(w) for k in tensors)), "")
    tensors = {k[len(wrapper):]: v for k, v in tensors.items()}
    check_keys(tensors, text_cfg, vision_cfg, weights, config)
    vision_keys = [k for k in tensors if k.startswith(VISION_PREFIX)]
    text_keys = [k for k in tensors if not k.startswith(VISION_PREFIX) and k != LOGIT_SCALE_KEY]
    kw = dict(prefix="", mesh=mesh, rules=rules, progress=progress, tensors=tensors)
    text = loader.load_module(abstract_clip_text(text_cfg), lambda st: key_map(st, "text"), weights,
                              ignore=[*vision_keys, LOGIT_SCALE_KEY], **kw)
    vision = loader.load_module(abstract_clip_vision(vision_cfg), lambda st: key_map(st, "vision"), weights,
                                ignore=[*text_keys, LOGIT_SCALE_KEY], **kw)
    scale = np.float32(read_tensor(tensors[LOGIT_SCALE_KEY]).astype(np.float32))
    logit_scale = jax.device_put(scale, replicated(mesh)) if mesh is not None else jnp.asarray(scale)
    return OpenCLIPTowers(text, vision, logit_scale)


def convert_pt(path_in: str | os.PathLike, path_out: str | os.PathLike,
               config: str | os.PathLike | Mapping[str, Any] = "ViT-H-14", *, overwrite: bool = False) -> str:
    """Writes the open_clip state dict of a `.pt` (e.g. HPSv2's HPS_v2_compressed.pt /
    HPS_v2.1_compressed.pt: a training checkpoint with it under "state_dict") as a `.safetensors` that
    `load_open_clip` reads, after checking every key and shape against `config`'s towers (nothing is
    written for a wrong file). Tensors keep their stored dtype. Needs torch (`torch_files`)."""

    def check(shapes: dict[str, tuple[int, ...]]) -> None:
        infos = {k: SimpleNamespace(shape=shape) for k, shape in shapes.items()}  # what the checks read
        check_layout(infos, os.fspath(path_in))
        check_keys(infos, *tower_configs(config), os.fspath(path_in), config)

    return pt_to_safetensors(path_in, path_out, check, overwrite=overwrite)


# ---------------------------------------------------------------------------- command line


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    flags.DEFINE_string("pt", None, "The open_clip .pt / .bin state dict (e.g. HPS_v2.1_compressed.pt).")
    flags.DEFINE_string("out", None, "The .safetensors file to write.")
    flags.DEFINE_string("config", "ViT-H-14", "open_clip model config: a preset name or a json file.")
    flags.mark_flags_as_required(["pt", "out"])


def main(argv):
    del argv
    print(f"Wrote {convert_pt(FLAGS.pt, FLAGS.out, FLAGS.config)}")


if __name__ == "__main__":
    define_flags()
    cli.run(main, user_errors=(CheckpointError,))
