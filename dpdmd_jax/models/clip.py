"""CLIP text encoder (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`) as a Flax NNX module.

SD3 conditions on two of them, SDXL on the same two: CLIP ViT-L/14 ("clip-l") and OpenCLIP
ViT-bigG/14 ("clip-bigg"). The pipelines use the second-to-last layer's hidden states (no final
LayerNorm) as token context and the projected (SD3: both; SDXL: bigG only) EOS-token state as the
pooled vector, so the model returns all of them in one pass.

Attribute names follow transformers so the key map in `dpdmd_jax.weights.clip` is a one-to-one
table. `CLIPEncoder` (the stack of pre-LN layers) takes the causal flag per call, so the CLIP
vision tower reuses it unmasked.

The vision tower (transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection`, or the vision
half of a `CLIPModel`) serves the evaluator: CLIP features are `last_hidden_state[:, 0]` (the CLS
token before `post_layernorm`) and the CLIP score uses `image_embeds` (post_layernorm(CLS) ->
visual_projection). Images are NHWC, already resized and normalised (`dpdmd_jax.eval.preprocess`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from dpdmd_jax.models.layers import default_kernel_init, dense, layer_norm, partitioned

# Fields of transformers' config.json for CLIPTextConfig that change the computation.
_TRANSFORMERS_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
CLASS_NAME = "CLIPTextModel"
CLASS_NAME_WITH_PROJECTION = "CLIPTextModelWithProjection"
MODEL_TYPE = "clip_text_model"

# The eos_token_id that configs converted before transformers PR #24773 carry (SD3's and SDXL's
# both do). transformers keeps their old pooling rule for it: the position of the largest token id
# (CLIP's EOS, 49407, is the largest id of its vocabulary); any other id pools at its first occurrence.
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: jax.Array) -> jax.Array:
    """transformers `QuickGELUActivation`: x * sigmoid(1.702 x) (OpenAI CLIP)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the erf (torch `nn.functional.gelu` default; OpenCLIP bigG)."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact}


def _tower_problems(cfg: Any) -> list[str]:
    """The checks the text and vision tower configs share, one sentence per problem."""
    problems = []
    if cfg.hidden_size % cfg.num_attention_heads:
        problems.append(
            f"hidden_size ({cfg.hidden_size}) is not a multiple of num_attention_heads ({cfg.num_attention_heads})"
        )
    if cfg.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act={cfg.hidden_act!r} is not supported (use one of {sorted(ACTIVATIONS)})")
    if cfg.with_projection and not cfg.projection_dim:
        problems.append("with_projection needs a projection_dim")
    return problems


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture (transformers names and defaults) plus whether the projection head exists and
    how we run it (dtypes)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    pad_token_id: int | None = 1
    with_projection: bool = False  # CLIPTextModelWithProjection: text_projection (no bias) on the pooled state
    # Execution knobs (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        problems = _tower_problems(self)
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            problems.append(f"eos_token_id={self.eos_token_id!r}: the pooled output needs one integer EOS id")
        if problems:
            raise ValueError("Invalid CLIP text config: " + "; ".join(problems) + ".")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def legacy_pooling(self) -> bool:
        """Pool at argmax(input_ids) (True) or at the first eos_token_id (False), as transformers."""
        return self.eos_token_id == LEGACY_EOS_TOKEN_ID

    @classmethod
    def from_transformers(cls, raw: dict[str, Any], **overrides: Any) -> "CLIPTextConfig":
        """Builds the config from a transformers `config.json` (as a dict).
        `with_projection` is true when `architectures` names CLIPTextModelWithProjection."""
        kwargs: dict[str, Any] = {k: raw[k] for k in _TRANSFORMERS_FIELDS if k in raw}
        if kwargs.get("layer_norm_eps") is None:  # transformers allows null and then uses its default
            kwargs.pop("layer_norm_eps", None)
        kwargs["with_projection"] = CLASS_NAME_WITH_PROJECTION in (raw.get("architectures") or [])
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_transformers(self) -> dict[str, Any]:
        """A config.json that `CLIPTextModel` / `CLIPTextModelWithProjection` (as `architectures`
        says) loads with this architecture."""
        arch = CLASS_NAME_WITH_PROJECTION if self.with_projection else CLASS_NAME
        return {
            "architectures": [arch],
            "model_type": MODEL_TYPE,
            **{k: getattr(self, k) for k in _TRANSFORMERS_FIELDS},
        }


# Full-size presets: the text encoders of SD3 (text_encoder / text_encoder_2, both
# CLIPTextModelWithProjection). Their config.json files were converted before transformers PR #24773
# and say bos 0, eos 2, pad 1; eos 2 selects the legacy argmax pooling, which finds the real EOS
# (49407, the largest id) whether prompts are padded with EOS (CLIP-L) or with "!" = 0 (bigG).
# SDXL's text_encoder is CLIP-L without the projection: pass with_projection=False.
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, with_projection=True,
)
CLIP_BIGG = dict(
    CLIP_L, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, hidden_act="gelu",
)
PRESETS = {"clip-l": CLIP_L, "clip-bigg": CLIP_BIGG}


class CLIPEncoderConfig(Protocol):
    """What `CLIPEncoder` reads from a config: the text and the vision configs both provide it."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: str
    param_dtype: str


def _module_kwargs(cfg: CLIPEncoderConfig, rngs: nnx.Rngs) -> dict[str, Any]:
    return dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class LayerNorm(nnx.Module):
    """torch `nn.LayerNorm` with weight and bias; statistics and affine in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x.astype(jnp.float32), self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with q/k/v/out projections (all with bias), scale 1/sqrt(head_dim)."""

    def __init__(self, cfg: CLIPEncoderConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        kw = _module_kwargs(cfg, rngs)
        self.k_proj = dense(d, d, ("embed", "heads"), **kw)
        self.v_proj = dense(d, d, ("embed", "heads"), **kw)
        self.q_proj = dense(d, d, ("embed", "heads"), **kw)
        self.out_proj = dense(d, d, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, *, causal: bool) -> jax.Array:
        b, t, _ = x.shape

        def heads(proj: nnx.Linear) -> jax.Array:
            return proj(x).reshape(b, t, self.heads, self.head_dim)

        out = jax.nn.dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), is_causal=causal)
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    """fc1 -> activation (quick_gelu or exact gelu) -> fc2."""

    def __init__(self, cfg: CLIPEncoderConfig, *, rngs: nnx.Rngs):
        kw = _module_kwargs(cfg, rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, cfg: CLIPEncoderConfig, *, rngs: nnx.Rngs):
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, *, causal: bool) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """`num_hidden_layers` CLIPEncoderLayers. Returns every hidden state as transformers'
    `hidden_states` does: the input, then each layer's output (no final LayerNorm), L + 1 arrays.
    Under jit the states nobody reads are not kept."""

    def __init__(self, cfg: CLIPEncoderConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers))

    def __call__(self, x: jax.Array, *, causal: bool = False) -> tuple[jax.Array, ...]:
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], causal=causal))
        return tuple(states)


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding + learned absolute position embedding (positions 0..L-1)."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)  # transformers' init (factor 1)
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=param_dtype,
            embedding_init=partitioned(init, ("vocab", "embed")), rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, param_dtype=param_dtype,
            embedding_init=partitioned(init, (None, "embed")), rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[1]
        positions = self.position_embedding.embedding[...]
        if length > positions.shape[0]:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings={positions.shape[0]}")
        # Summed in the storage dtype, as torch does, then cast to the compute dtype.
        tokens = jnp.take(self.token_embedding.embedding[...], input_ids, axis=0)
        return (tokens + positions[None, :length]).astype(self.dtype)


class CLIPTextOutput(NamedTuple):
    """What the SD pipelines read from the text encoder (a pytree; `text_embeds` is None without
    the projection)."""

    last_hidden_state: jax.Array  # [B, L, D] after the final LayerNorm
    penultimate: jax.Array  # [B, L, D] transformers hidden_states[-2]: second-to-last layer, no final LN
    pooled: jax.Array  # [B, D] last_hidden_state at the EOS position (transformers pooler_output)
    text_embeds: jax.Array | None  # [B, projection_dim] pooled @ text_projection


class CLIPTextModel(nnx.Module):
    """CLIP text transformer: `input_ids [B, L] -> CLIPTextOutput`, causal self-attention and no
    other mask (the SD pipelines pass none: padding after EOS is attended to, as in the reference)."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = _module_kwargs(cfg, rngs)
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=kw["param_dtype"])
        self.text_projection = (
            dense(cfg.hidden_size, cfg.projection_dim, ("embed", None), use_bias=False, **kw)
            if cfg.with_projection else None
        )

    def eos_positions(self, input_ids: jax.Array) -> jax.Array:
        """[B] index of the pooled token, by transformers' rule for this config's eos_token_id."""
        if self.cfg.legacy_pooling:
            return jnp.argmax(input_ids, axis=-1)  # first occurrence of the largest id
        return jnp.argmax((input_ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)  # first EOS (or 0)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer [batch, length], got {input_ids.dtype}{list(input_ids.shape)}")
        states = self.encoder(self.embeddings(input_ids), causal=True)
        last = self.final_layer_norm(states[-1])
        pooled = jnp.take_along_axis(last, self.eos_positions(input_ids)[:, None, None], axis=1)[:, 0]
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(last_hidden_state=last, penultimate=states[-2], pooled=pooled, text_embeds=text_embeds)


# ---------------------------------------------------------------------------- vision tower

# Fields of transformers' config.json for CLIPVisionConfig that change the computation.
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)
VISION_CLASS_NAME = "CLIPVisionModel"
VISION_CLASS_NAME_WITH_PROJECTION = "CLIPVisionModelWithProjection"
VISION_MODEL_TYPE = "clip_vision_model"


def square_size(value: Any, name: str) -> int:
    """An image / patch size that transformers allows as an int or an [h, w] pair, as one int
    (the position tables of CLIP and DINOv2 are square grids)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={list(value)}: only square sizes are supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The CLIP vision tower's architecture (transformers names and defaults) plus whether the
    projection head exists (CLIPVisionModelWithProjection, or CLIPModel's visual_projection) and
    how we run it (dtypes)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    with_projection: bool = False  # visual_projection (no bias) on the pooled state
    # Execution knobs (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        problems = _tower_problems(self)
        if self.image_size < self.patch_size:
            problems.append(f"image_size ({self.image_size}) is smaller than patch_size ({self.patch_size})")
        if problems:
            raise ValueError("Invalid CLIP vision config: " + "; ".join(problems) + ".")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side at image_size (the conv drops a remainder, as torch's does)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_transformers(cls, raw: dict[str, Any], **overrides: Any) -> "CLIPVisionConfig":
        """Builds the config from a transformers `config.json` (as a dict) of a CLIPVisionModel /
        CLIPVisionModelWithProjection, or from a CLIPModel's nested `vision_config`.
        `with_projection` is true when `architectures` names CLIPVisionModelWithProjection."""
        kwargs: dict[str, Any] = {k: raw[k] for k in _VISION_FIELDS if k in raw}
        if kwargs.get("layer_norm_eps") is None:  # transformers allows null and then uses its default
            kwargs.pop("layer_norm_eps", None)
        for name in ("image_size", "patch_size"):
            if kwargs.get(name) is None:
                kwargs.pop(name, None)
            else:
                kwargs[name] = square_size(kwargs[name], name)
        kwargs["with_projection"] = VISION_CLASS_NAME_WITH_PROJECTION in (raw.get("architectures") or [])
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_transformers(self) -> dict[str, Any]:
        """A config.json that `CLIPVisionModel` / `CLIPVisionModelWithProjection` (as
        `architectures` says) loads with this architecture."""
        arch = VISION_CLASS_NAME_WITH_PROJECTION if self.with_projection else VISION_CLASS_NAME
        fields = {k: getattr(self, k) for k in _VISION_FIELDS}
        if fields["projection_dim"] is None:  # transformers' CLIPVisionConfig wants an int
            fields.pop("projection_dim")
        return {"architectures": [arch], "model_type": VISION_MODEL_TYPE, **fields}


# openai/clip-vit-large-patch14's vision_config (CLIPModel's visual_projection maps 1024 -> 768).
CLIP_VIT_L_14 = dict(
    hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24, num_attention_heads=16,
    num_channels=3, image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    with_projection=True,
)
VISION_PRESETS = {"clip-vit-l-14": CLIP_VIT_L_14}


class PatchEmbedding(nnx.Module):
    """torch `nn.Conv2d(C, D, kernel_size=p, stride=p)` on NHWC images, as a matmul over flattened
    non-overlapping patches (the kernel is stored in flax's (kh, kw, in, out) layout). A remainder
    of fewer than p rows / columns is dropped, as the strided conv does. Returns [B, h*w, D] tokens
    in row-major (h, w) order (torch's `flatten(2).transpose(1, 2)`) and the grid (h, w)."""

    def __init__(
        self, in_channels: int, dim: int, patch_size: int, *, use_bias: bool, rngs: nnx.Rngs,
        dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    ):
        self.patch_size, self.in_channels, self.dtype = patch_size, in_channels, jnp.dtype(dtype)
        init = partitioned(default_kernel_init, (None, None, None, "embed"))
        self.kernel = nnx.Param(init(rngs.params(), (patch_size, patch_size, in_channels, dim), param_dtype))
        self.bias = (
            nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",), eager_sharding=False)
            if use_bias else None
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"pixel values must be NHWC [batch, height, width, {self.in_channels}], got {list(x.shape)}"
            )
        b, hh, ww, c = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        if h == 0 or w == 0:
            raise ValueError(f"image {hh}x{ww} is smaller than one {p}x{p} patch")
        patches = x[:, : h * p, : w * p].reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
        kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        tokens = patches.reshape(b, h * w, p * p * c).astype(self.dtype) @ kernel
        if self.bias is not None:
            tokens = tokens + self.bias[...].astype(self.dtype)
        return tokens, (h, w)


class CLIPVisionEmbeddings(nnx.Module):
    """Patch conv (no bias) tokens after a learned class embedding, plus the learned position
    table (one row per position of the image_size grid, CLS first)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.grid_size = cfg.grid_size
        param_dtype = jnp.dtype(cfg.param_dtype)
        d = cfg.hidden_size
        self.class_embedding = nnx.Param(
            partitioned(nnx.initializers.normal(d**-0.5), ("embed",))(rngs.params(), (d,), param_dtype)
        )
        self.patch_embedding = PatchEmbedding(
            cfg.num_channels, d, cfg.patch_size, use_bias=False, rngs=rngs, dtype=self.dtype, param_dtype=param_dtype
        )
        self.position_embedding = nnx.Embed(
            self.grid_size**2 + 1, d, dtype=self.dtype, param_dtype=param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(0.02), (None, "embed")), rngs=rngs,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        tokens, grid = self.patch_embedding(pixel_values)
        if grid != (self.grid_size, self.grid_size):
            raise ValueError(
                f"image {pixel_values.shape[1]}x{pixel_values.shape[2]} gives a {grid[0]}x{grid[1]} patch grid; "
                f"the model's position table is {self.grid_size}x{self.grid_size} (resize to image_size first)"
            )
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        positions = self.position_embedding.embedding[...].astype(self.dtype)
        return jnp.concatenate([cls, tokens], axis=1) + positions[None]


class CLIPVisionOutput(NamedTuple):
    """What the evaluator reads from the vision tower (a pytree; `image_embeds` is None without
    the projection)."""

    last_hidden_state: jax.Array  # [B, 1 + h*w, D] encoder output (no post_layernorm); [:, 0] = CLS
    pooler_output: jax.Array  # [B, D] post_layernorm(CLS)
    image_embeds: jax.Array | None  # [B, projection_dim] pooler_output @ visual_projection


class CLIPVisionModel(nnx.Module):
    """CLIP vision transformer (transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection`):
    `pixel_values [B, H, W, C]` (NHWC, already normalised, H = W = image_size) -> CLIPVisionOutput.
    Unmasked pre-LN encoder between `pre_layrnorm` (transformers' spelling) and `post_layernorm`,
    which only the pooled CLS token goes through."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = _module_kwargs(cfg, rngs)
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=kw["param_dtype"])
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=kw["param_dtype"])
        self.visual_projection = (
            dense(cfg.hidden_size, cfg.projection_dim, ("embed", None), use_bias=False, **kw)
            if cfg.with_projection else None
        )

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        last = self.encoder(x, causal=False)[-1]
        pooled = self.post_layernorm(last[:, 0])
        image_embeds = self.visual_projection(pooled) if self.visual_projection is not None else None
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled, image_embeds=image_embeds)
