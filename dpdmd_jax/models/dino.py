"""DINOv2 (transformers `Dinov2Model`) and DINOv3 ViT (transformers `DINOv3ViTModel`) as Flax NNX
modules: the evaluator's DINO feature extractors (`pooler_output` = final LayerNorm of the CLS
token; DINOv3 ViT-L/16 is the method's choice, DINOv2 ViT-L/14 the alternative).

Attribute paths follow the checkpoints' key layout, which is also what transformers 5 writes:
DINOv2's published tree (`encoder.layer.N.attention.attention.query`, `...attention.output.dense`,
`mlp.fc1` or the SwiGLU `mlp.weights_in` / `mlp.weights_out`; transformers 5 renames them to
q_proj / o_proj / gate_proj+up_proj on load and back on save), DINOv3's top-level `layer.N`
(transformers' module path is `model.layer.N`). The key maps in `dpdmd_jax.weights.dino` are then
one-to-one tables.

Images are NHWC, already normalised. DINOv2 adds a learned position table for the pretraining
grid (image_size / patch_size per side; 37 x 37 for the published ViT-L/14 at 518 px) and, for any
other grid (224 px inputs: 16 x 16; non-square ones too), resamples it exactly as transformers'
`interpolate_pos_encoding` does: torch bicubic (A = -0.75, align_corners=False, no antialias) to
`size=(h, w)`, in float32. DINOv3 has no position table: RoPE on the patch tokens' normalised
centre coordinates, computed for whatever grid the input has.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpdmd_jax.models.clip import LayerNorm, PatchEmbedding, gelu_exact, quick_gelu, square_size
from dpdmd_jax.models.layers import dense, partitioned

ACTIVATIONS = {"gelu": gelu_exact, "quick_gelu": quick_gelu, "silu": jax.nn.silu}

DINOV2_CLASS_NAME = "Dinov2Model"
DINOV2_MODEL_TYPE = "dinov2"
DINOV3_CLASS_NAME = "DINOv3ViTModel"
DINOV3_MODEL_TYPE = "dinov3_vit"

# Fields of transformers' config.json that change the computation (or, layerscale_value, the
# initial LayerScale that a freshly built model starts from).
_DINOV2_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "hidden_act",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "layerscale_value",
    "use_swiglu_ffn",
    "use_mask_token",
)
_DINOV3_FIELDS = (
    "patch_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
    "rope_theta",
    "image_size",
    "num_channels",
    "query_bias",
    "key_bias",
    "value_bias",
    "proj_bias",
    "mlp_bias",
    "layerscale_value",
    "use_gated_mlp",
    "num_register_tokens",
)


def _check_common(cfg: Any, what: str, problems: list[str]) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        problems.append(
            f"hidden_size ({cfg.hidden_size}) is not a multiple of num_attention_heads ({cfg.num_attention_heads})"
        )
    if cfg.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act={cfg.hidden_act!r} is not supported (use one of {sorted(ACTIVATIONS)})")
    if problems:
        raise ValueError(f"Invalid {what} config: " + "; ".join(problems) + ".")


def _from_transformers(cls, fields: tuple[str, ...], raw: dict[str, Any], overrides: dict[str, Any]):
    kwargs: dict[str, Any] = {k: raw[k] for k in fields if k in raw and raw[k] is not None}
    for name in ("image_size", "patch_size"):
        if name in kwargs:
            kwargs[name] = square_size(kwargs[name], name)
    kwargs.update(overrides)
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """DINOv2 architecture (transformers names and defaults) plus how we run it (dtypes)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224  # sets the stored position grid: image_size // patch_size per side
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    use_mask_token: bool = True  # the (pretraining-only) mask token exists in the checkpoint
    # Execution knobs (not part of the checkpoint).
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        problems = []
        if self.image_size < self.patch_size:
            problems.append(f"image_size ({self.image_size}) is smaller than patch_size ({self.patch_size})")
        _check_common(self, "DINOv2", problems)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_hidden_size(self) -> int:
        """fc1's width; for SwiGLU the width of each of the gate / up halves of weights_in
        (two thirds of it, rounded up to a multiple of 8, as transformers' Dinov2SwiGLUFFN)."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden

    @classmethod
    def from_transformers(cls, raw: dict[str, Any], **overrides: Any) -> "Dinov2Config":
        return _from_transformers(cls, _DINOV2_FIELDS, raw, overrides)

    def to_transformers(self) -> dict[str, Any]:
        """A config.json that `Dinov2Model.from_pretrained` loads with this architecture."""
        return {"architectures": [DINOV2_CLASS_NAME], "model_type": DINOV2_MODEL_TYPE,
                **{k: getattr(self, k) for k in _DINOV2_FIELDS}}


@dataclasses.dataclass(frozen=True)
class DINOv3ViTConfig:
    """DINOv3 ViT architecture (transformers names and defaults; the training-only RoPE
    augmentations pos_embed_shift / jitter / rescale are not used at inference) plus dtypes."""

    patch_size: int = 16
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    image_size: int = 224  # unused by the computation (no position table); kept for export
    num_channels: int = 3
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    layerscale_value: float = 1.0
    use_gated_mlp: bool = False
    num_register_tokens: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        problems = []
        if (self.hidden_size // max(self.num_attention_heads, 1)) % 4:
            problems.append(f"head_dim ({self.hidden_size // self.num_attention_heads}) is not a multiple of 4 "
                            "(2-D RoPE splits it into y / x halves of sin-cos pairs)")
        _check_common(self, "DINOv3 ViT", problems)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, raw: dict[str, Any], **overrides: Any) -> "DINOv3ViTConfig":
        return _from_transformers(cls, _DINOV3_FIELDS, raw, overrides)

    def to_transformers(self) -> dict[str, Any]:
        """A config.json that `DINOv3ViTModel.from_pretrained` loads with this architecture."""
        return {"architectures": [DINOV3_CLASS_NAME], "model_type": DINOV3_MODEL_TYPE,
                **{k: getattr(self, k) for k in _DINOV3_FIELDS}}


# facebook/dinov2-large (pretrained at 518 px: a 37 x 37 position grid) and
# facebook/dinov3-vitl16-pretrain-lvd1689m.
DINOV2_VIT_L_14 = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, hidden_act="gelu",
    layer_norm_eps=1e-6, image_size=518, patch_size=14, num_channels=3, qkv_bias=True, layerscale_value=1.0,
    use_swiglu_ffn=False, use_mask_token=True,
)
DINOV3_VIT_L_16 = dict(
    patch_size=16, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    hidden_act="gelu", layer_norm_eps=1e-5, rope_theta=100.0, image_size=224, num_channels=3, query_bias=True,
    key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True, layerscale_value=1.0, use_gated_mlp=False,
    num_register_tokens=4,
)
DINOV2_PRESETS = {"dinov2-vit-l-14": DINOV2_VIT_L_14}
DINOV3_PRESETS = {"dinov3-vit-l-16": DINOV3_VIT_L_16}


# ---------------------------------------------------------------------------- shared pieces


def _kwargs(cfg: Any, rngs: nnx.Rngs) -> dict[str, Any]:
    return dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _token_param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, init=None) -> nnx.Param:
    """A [1, n, D] token / table parameter, sharded on D like the embedding matrices."""
    init = init or nnx.initializers.truncated_normal(0.02)  # a fresh model's draw; checkpoints replace it
    axes = (None,) * (len(shape) - 1) + ("embed",)
    return nnx.Param(partitioned(init, axes)(rngs.params(), shape, dtype))


class LayerScale(nnx.Module):
    """Per-channel residual-branch scale `lambda1` (transformers Dinov2LayerScale)."""

    def __init__(self, dim: int, value: float, *, param_dtype: Any):
        self.lambda1 = nnx.Param(jnp.full((dim,), value, param_dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.lambda1[...].astype(x.dtype)


def _heads(x: jax.Array, n: int) -> jax.Array:
    b, t, d = x.shape
    return x.reshape(b, t, n, d // n)


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 weights of torch `interpolate(mode="bicubic",
    align_corners=False, antialias=False)` along one axis with `size=` given: source index
    (i + 0.5) * in/out - 0.5 in float32, Keys cubic with A = -0.75 on the 4 nearest samples,
    indices clamped to the border (torch's CPU `upsample_bicubic2d`, `guard_index_and_lambda`)."""
    a = np.float32(-0.75)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    scale = np.float32(in_size) / np.float32(out_size)
    real = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.clip(real - index.astype(np.float32), np.float32(0), np.float32(1))
    one = np.float32(1)
    coeffs = (far(t + one), near(t), near(one - t), far(one - t + one))
    out = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    for j, c in enumerate(coeffs):
        np.add.at(out, (rows, np.clip(index - 1 + j, 0, in_size - 1)), c.astype(np.float32))
    return out


def interpolate_grid(table: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resamples a [g, g, D] grid of embeddings to [h, w, D] as torch bicubic with `size=(h, w)`
    (see `torch_bicubic_matrix`), in float32 at full matmul precision."""
    g = table.shape[0]
    mh, mw = torch_bicubic_matrix(g, size[0]), torch_bicubic_matrix(table.shape[1], size[1])
    return jnp.einsum("oh,hwd,pw->opd", jnp.asarray(mh), table.astype(jnp.float32), jnp.asarray(mw),
                      precision=jax.lax.Precision.HIGHEST)


class DinoOutput(NamedTuple):
    """What the evaluator reads from a DINO tower (a pytree)."""

    last_hidden_state: jax.Array  # [B, T, D] after the final LayerNorm (CLS, [registers,] patches)
    pooler_output: jax.Array  # [B, D] last_hidden_state[:, 0]: the normalised CLS token


# ---------------------------------------------------------------------------- DINOv2


class Dinov2PatchEmbeddings(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.projection = PatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size, use_bias=True,
                                         **_kwargs(cfg, rngs))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        return self.projection(x)


class Dinov2Embeddings(nnx.Module):
    """CLS token + patch tokens + the (interpolated) position table. The mask token is kept for
    the checkpoint; it only replaces masked patches in pretraining, never at inference."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        d, param_dtype = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        self.dtype, self.grid_size = jnp.dtype(cfg.dtype), cfg.grid_size
        self.cls_token = _token_param(rngs, (1, 1, d), param_dtype)
        self.mask_token = (
            _token_param(rngs, (1, d), param_dtype, nnx.initializers.zeros_init()) if cfg.use_mask_token else None
        )
        self.patch_embeddings = Dinov2PatchEmbeddings(cfg, rngs=rngs)
        self.position_embeddings = _token_param(rngs, (1, cfg.grid_size**2 + 1, d), param_dtype)

    def position_table(self, grid: tuple[int, int]) -> jax.Array:
        """[1, 1 + h*w, D] position embeddings for an h x w patch grid (transformers
        `interpolate_pos_encoding`: the stored table on its own grid, else bicubic in float32)."""
        table = self.position_embeddings[...]
        if grid == (self.grid_size, self.grid_size):
            return table
        g, d = self.grid_size, table.shape[-1]
        patches = interpolate_grid(table[0, 1:].reshape(g, g, d), grid).astype(table.dtype)
        return jnp.concatenate([table[:, :1], patches.reshape(1, grid[0] * grid[1], d)], axis=1)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        tokens, grid = self.patch_embeddings(pixel_values)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1) + self.position_table(grid).astype(self.dtype)


class Dinov2SelfAttention(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, _kwargs(cfg, rngs)
        self.heads = cfg.num_attention_heads
        self.query = dense(d, d, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.key = dense(d, d, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.value = dense(d, d, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
        return jax.nn.dot_product_attention(q, k, v).reshape(x.shape[0], x.shape[1], -1)


class Dinov2SelfOutput(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), **_kwargs(cfg, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(x)


class Dinov2Attention(nnx.Module):
    """Unmasked multi-head self-attention, scale 1/sqrt(head_dim)."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.attention = Dinov2SelfAttention(cfg, rngs=rngs)
        self.output = Dinov2SelfOutput(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(self.attention(x))


class Dinov2MLP(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        kw = _kwargs(cfg, rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = dense(cfg.hidden_size, cfg.mlp_hidden_size, ("embed", "mlp"), **kw)
        self.fc2 = dense(cfg.mlp_hidden_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class Dinov2SwiGLUFFN(nnx.Module):
    """weights_out(silu(gate) * up) with [gate | up] = weights_in(x), the fused projection the
    checkpoint stores (transformers 5 chunks it into gate_proj / up_proj on load)."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        kw, f = _kwargs(cfg, rngs), cfg.mlp_hidden_size
        self.weights_in = dense(cfg.hidden_size, 2 * f, ("embed", "mlp"), **kw)
        self.weights_out = dense(f, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
        return self.weights_out(jax.nn.silu(gate) * up)


class Dinov2Layer(nnx.Module):
    """Pre-LN block with LayerScale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        d, param_dtype = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attention = Dinov2Attention(cfg, rngs=rngs)
        self.layer_scale1 = LayerScale(d, cfg.layerscale_value, param_dtype=param_dtype)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = Dinov2SwiGLUFFN(cfg, rngs=rngs) if cfg.use_swiglu_ffn else Dinov2MLP(cfg, rngs=rngs)
        self.layer_scale2 = LayerScale(d, cfg.layerscale_value, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Encoder(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.layer = nnx.List(Dinov2Layer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layer:
            x = layer(x)
        return x


class Dinov2Model(nnx.Module):
    """DINOv2 ViT: `pixel_values [B, H, W, C]` (NHWC, normalised; any size of at least one patch,
    non-square included) -> DinoOutput."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Dinov2Embeddings(cfg, rngs=rngs)
        self.encoder = Dinov2Encoder(cfg, rngs=rngs)
        self.layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))

    def __call__(self, pixel_values: jax.Array) -> DinoOutput:
        last = self.layernorm(self.encoder(self.embeddings(pixel_values)))
        return DinoOutput(last_hidden_state=last, pooler_output=last[:, 0])


# ---------------------------------------------------------------------------- DINOv3


def rope_tables(cfg: DINOv3ViTConfig, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [h*w, head_dim] (float32) of transformers' DINOv3ViTRopePositionEmbedding at
    inference: patch centres ((i + 0.5) / n) * 2 - 1 per axis, angles 2 pi * coord * inv_freq
    with inv_freq = 1 / theta ** arange(0, 1, 4 / head_dim), laid out [y freqs, x freqs] twice."""
    h, w = grid
    inv_freq = 1 / np.float32(cfg.rope_theta) ** np.arange(0, 1, 4 / cfg.head_dim, dtype=np.float32)
    ys = np.arange(0.5, h, dtype=np.float32) / np.float32(h)
    xs = np.arange(0.5, w, dtype=np.float32) / np.float32(w)
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(h * w, 2)
    coords = np.float32(2.0) * coords - np.float32(1.0)
    angles = (np.float32(2 * math.pi) * coords[:, :, None] * inv_freq[None, None, :]).reshape(h * w, -1)
    angles = np.tile(angles, 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class DINOv3ViTEmbeddings(nnx.Module):
    """[CLS, register tokens, patch tokens] (no position table: RoPE acts inside attention).
    The mask token is kept for the checkpoint; it is pretraining-only."""

    def __init__(self, cfg: DINOv3ViTConfig, *, rngs: nnx.Rngs):
        d, param_dtype = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.cls_token = _token_param(rngs, (1, 1, d), param_dtype)
        self.mask_token = _token_param(rngs, (1, 1, d), param_dtype, nnx.initializers.zeros_init())
        self.register_tokens = _token_param(rngs, (1, cfg.num_register_tokens, d), param_dtype)
        self.patch_embeddings = PatchEmbedding(cfg.num_channels, d, cfg.patch_size, use_bias=True,
                                               **_kwargs(cfg, rngs))

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        tokens, grid = self.patch_embeddings(pixel_values)
        b, _, d = tokens.shape
        prefix = jnp.concatenate([self.cls_token[...], self.register_tokens[...]], axis=1).astype(self.dtype)
        return jnp.concatenate([jnp.broadcast_to(prefix, (b, prefix.shape[1], d)), tokens], axis=1), grid


class DINOv3ViTAttention(nnx.Module):
    """Self-attention with 2-D RoPE on the patch tokens' queries and keys (CLS and register
    tokens are not rotated); q / k / v / o biases as the config says (DINOv3: no key bias)."""

    def __init__(self, cfg: DINOv3ViTConfig, *, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, _kwargs(cfg, rngs)
        self.heads = cfg.num_attention_heads
        self.k_proj = dense(d, d, ("embed", "heads"), use_bias=cfg.key_bias, **kw)
        self.v_proj = dense(d, d, ("embed", "heads"), use_bias=cfg.value_bias, **kw)
        self.q_proj = dense(d, d, ("embed", "heads"), use_bias=cfg.query_bias, **kw)
        self.o_proj = dense(d, d, ("heads", "embed"), use_bias=cfg.proj_bias, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        q, k, v = (_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        n_prefix = x.shape[1] - cos.shape[0]
        cos, sin = cos[None, :, None, :].astype(q.dtype), sin[None, :, None, :].astype(q.dtype)

        def rotate(t: jax.Array) -> jax.Array:
            patches = t[:, n_prefix:]
            return jnp.concatenate([t[:, :n_prefix], patches * cos + _rotate_half(patches) * sin], axis=1)

        out = jax.nn.dot_product_attention(rotate(q), rotate(k), v)
        return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1))


class DINOv3ViTMLP(nnx.Module):
    """down(act(up(x))), or with use_gated_mlp down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: DINOv3ViTConfig, *, rngs: nnx.Rngs):
        kw, d, f = _kwargs(cfg, rngs), cfg.hidden_size, cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_proj = dense(d, f, ("embed", "mlp"), use_bias=cfg.mlp_bias, **kw) if cfg.use_gated_mlp else None
        self.up_proj = dense(d, f, ("embed", "mlp"), use_bias=cfg.mlp_bias, **kw)
        self.down_proj = dense(f, d, ("mlp", "embed"), use_bias=cfg.mlp_bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DINOv3ViTLayer(nnx.Module):
    """Pre-LN block with LayerScale, as Dinov2Layer, with RoPE attention."""

    def __init__(self, cfg: DINOv3ViTConfig, *, rngs: nnx.Rngs):
        d, param_dtype = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attention = DINOv3ViTAttention(cfg, rngs=rngs)
        self.layer_scale1 = LayerScale(d, cfg.layerscale_value, param_dtype=param_dtype)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = DINOv3ViTMLP(cfg, rngs=rngs)
        self.layer_scale2 = LayerScale(d, cfg.layerscale_value, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.layer_scale1(self.attention(self.norm1(x), cos, sin))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class DINOv3ViTModel(nnx.Module):
    """DINOv3 ViT: `pixel_values [B, H, W, C]` (NHWC, normalised; any size of at least one patch,
    non-square included) -> DinoOutput. Tokens: CLS, num_register_tokens registers, patches."""

    def __init__(self, cfg: DINOv3ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = DINOv3ViTEmbeddings(cfg, rngs=rngs)
        self.layer = nnx.List(DINOv3ViTLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers))
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))

    def __call__(self, pixel_values: jax.Array) -> DinoOutput:
        x, grid = self.embeddings(pixel_values)
        cos, sin = (jnp.asarray(t) for t in rope_tables(self.cfg, grid))
        for layer in self.layer:
            x = layer(x, cos, sin)
        last = self.norm(x)
        return DinoOutput(last_hidden_state=last, pooler_output=last[:, 0])
