"""The SDXL UNet (diffusers `UNet2DConditionModel`) as a Flax NNX module.

One module family covers SDXL base (and the SD 1.x / 2.x layouts: conv or linear projections,
no added embedding): down blocks `DownBlock2D` / `CrossAttnDownBlock2D`, the `UNetMidBlock2DCrossAttn`
mid block, up blocks `UpBlock2D` / `CrossAttnUpBlock2D`, in any order and depth the config names.
Attribute names follow diffusers so the key map in `dpdmd_jax.weights.unet` stays a one-to-one
table; the only flattenings are the one-element `downsamplers` / `upsamplers` lists (single
attributes), `to_out.0` (`to_out`) and the feed-forward's `net.0.proj` / `net.2` (`proj_in` /
`proj_out`).

Call convention: latents NHWC, timesteps [B] in the model's native units (DDPM steps 0..999,
float or int, per sample), encoder_hidden_states [B, L, cross_attention_dim], and for
`addition_embed_type="text_time"` (SDXL) the pooled text embedding [B, P] and the six micro-
conditioning time ids [B, 6] (original size, crop top-left, target size); returns eps NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpdmd_jax.models.clip import LayerNorm
from dpdmd_jax.models.layers import MLPEmbedder, attention, dense, shard_rows, timestep_embedding
from dpdmd_jax.models.mmdit import ATTENTION_IMPLS, REMAT_POLICIES
from dpdmd_jax.models.vae import GroupNorm, conv, upsample_nearest_2x

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK = "UNetMidBlock2DCrossAttn"
ADDITION_EMBED_TYPES = (None, "text_time")
_TRANSFORMER_GROUP_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm (fixed in diffusers)
_LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's norm1/2/3 (Transformer2DModel's norm_eps default)

# diffusers UNet2DConditionModel.__init__ defaults of the fields we implement: a config.json
# lacking a field means this value.
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8, use_linear_projection=False,
    addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None,
    time_embedding_dim=None, upcast_attention=False,
)
# Fields whose other values select variants this module does not implement: field -> accepted
# values (the first is what `to_diffusers` writes).
_FIXED: dict[str, tuple[Any, ...]] = dict(
    mid_block_type=(MID_BLOCK,), center_input_sample=(False,), only_cross_attention=(False,),
    downsample_padding=(1,), mid_block_scale_factor=(1,), dropout=(0.0,), act_fn=("silu",),
    reverse_transformer_layers_per_block=(None,), encoder_hid_dim=(None,), encoder_hid_dim_type=(None,),
    num_attention_heads=(None,), dual_cross_attention=(False,), class_embed_type=(None,), num_class_embeds=(None,),
    resnet_time_scale_shift=("default",), resnet_skip_time_act=(False,),
    resnet_out_scale_factor=(1.0,), time_embedding_type=("positional",), time_embedding_act_fn=(None,),
    timestep_post_act=(None,), time_cond_proj_dim=(None,), conv_in_kernel=(3,), conv_out_kernel=(3,),
    attention_type=("default",), class_embeddings_concat=(False,), mid_block_only_cross_attention=(None, False),
    cross_attention_norm=(None,),
)


def _accepted(value: Any, allowed: tuple[Any, ...]) -> bool:
    for a in allowed:
        if value is None or a is None or isinstance(value, bool) or isinstance(a, bool):
            if value is a:  # `True == 1` in Python: None and booleans match only themselves
                return True
        elif value == a:  # 1 == 1.0
            return True
    return False


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture (diffusers names and defaults) plus how we run it (dtypes, scan, remat).

    As in diffusers, `attention_head_dim` holds the number of attention HEADS per block (SDXL:
    (5, 10, 20)); each head is `channels // heads` wide. Per-block fields take an int (every
    block) or one value per down block; up blocks use them reversed, the mid block the last.
    """

    sample_size: int | tuple[int, int] | None = None  # carried through for the exported config.json
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = _DIFFUSERS_DEFAULTS["down_block_types"]
    up_block_types: tuple[str, ...] = _DIFFUSERS_DEFAULTS["up_block_types"]
    block_out_channels: tuple[int, ...] = _DIFFUSERS_DEFAULTS["block_out_channels"]
    layers_per_block: int | tuple[int, ...] = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # head COUNTS (diffusers' naming)
    use_linear_projection: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    # Carried through for export only: diffusers' default SDPA attention processor ignores it, and
    # ours always computes logits and softmax in float32 (what the flag asks for), whatever it says.
    upcast_attention: bool = False
    # Execution knobs (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False  # nnx.scan over each Transformer2DModel's blocks: fast compiles at depth 10
    remat_policy: str = "none"  # one of REMAT_POLICIES; applied per resnet and per transformer block
    attention_impl: str = "xla"  # "cudnn" selects cuDNN flash attention on NVIDIA GPUs

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "sample_size"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "upcast_attention", bool(self.upcast_attention))  # SDXL's config.json: null
        problems = []
        n = len(self.block_out_channels)
        if n == 0:
            problems.append("block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(f"{len(self.down_block_types)} down_block_types and {len(self.up_block_types)} "
                            f"up_block_types for {n} block_out_channels (need one each per block)")
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCKS]
        bad += [t for t in self.up_block_types if t not in UP_BLOCKS]
        if bad:
            problems.append(f"block types {bad} (supported: {DOWN_BLOCKS} down, {UP_BLOCKS} up)")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            if isinstance(value, tuple) and (len(value) != n or not all(isinstance(v, int) for v in value)):
                problems.append(f"{name}={list(value)} must be an int or {n} ints (nested per-layer lists are "
                                "not supported)")
            elif not isinstance(value, (int, tuple)) or isinstance(value, bool):
                problems.append(f"{name}={value!r} must be an int or a tuple of ints")
        if not isinstance(self.cross_attention_dim, int) or isinstance(self.cross_attention_dim, bool):
            problems.append(f"cross_attention_dim={self.cross_attention_dim!r} must be one int (per-block values "
                            "are not supported)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            problems.append(f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels {bad}")
        if not problems:
            for i, c in enumerate(self.block_out_channels):
                heads = self.per_block("attention_head_dim")[i]
                kinds = (self.down_block_types[i], self.up_block_types[n - 1 - i])
                attends = i == n - 1 or any(k.startswith("CrossAttn") for k in kinds)  # the mid block: last level
                if attends and c % heads:
                    problems.append(f"block {i}: {c} channels do not split into {heads} attention heads")
            if min(self.per_block("layers_per_block")) < 1:
                problems.append("layers_per_block must be >= 1")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            problems.append(f"addition_embed_type={self.addition_embed_type!r} (supported: {ADDITION_EMBED_TYPES})")
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            problems.append("addition_embed_type='text_time' needs addition_time_embed_dim and "
                            "projection_class_embeddings_input_dim")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                problems.append(f"{name}={getattr(self, name)!r} is not a dtype name")
        if problems:
            raise ValueError("Invalid UNet config: " + "; ".join(problems) + ".")

    def per_block(self, name: str) -> tuple[int, ...]:
        """A per-block field as one value per down block."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding every resnet receives (SDXL: 4 * 320 = 1280)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Latent pixels per bottleneck pixel; other latent sizes take diffusers' interpolate path."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any], **overrides: Any) -> "UNetConfig":
        """Builds the config from a diffusers UNet2DConditionModel `config.json` (as a dict).
        Raises ValueError for variants this module does not implement."""
        cfg = {**_DIFFUSERS_DEFAULTS, **{k: raw[k] for k in _DIFFUSERS_DEFAULTS if k in raw}}
        problems = []
        for name, allowed in _FIXED.items():
            if name in raw and not _accepted(raw[name], allowed):
                if not (name == "only_cross_attention" and isinstance(raw[name], list) and not any(raw[name])):
                    problems.append(f"{name}={raw[name]!r} (supported: {' or '.join(map(repr, allowed))})")
        if raw.get("norm_num_groups", 32) is None:
            problems.append("norm_num_groups=None (no output norm) is not supported")
        if problems:
            raise ValueError("unsupported UNet2DConditionModel config: " + "; ".join(problems))
        cfg.update(overrides)
        return cls(**cfg)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config.json for this architecture (`UNet2DConditionModel(**config)`)."""

        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        arch = {k: plain(getattr(self, k)) for k in _DIFFUSERS_DEFAULTS}
        fixed = {k: v[0] for k, v in _FIXED.items()}
        return {"_class_name": "UNet2DConditionModel", **arch, **fixed}


# Full-size presets (the unet/config.json of the released pipelines).
SDXL_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
PRESETS = {"sdxl-base": SDXL_BASE}


# ---------------------------------------------------------------------------- building blocks


def _module_kwargs(cfg: UNetConfig, rngs: nnx.Rngs) -> dict[str, Any]:
    return dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _maybe_remat(fn, policy_name: str):
    if policy_name == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=False)


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` ("default" time embedding): norm-SiLU-conv, plus the projected
    SiLU(temb) per channel, norm-SiLU-conv, plus the input (1x1 `conv_shortcut` when the channel
    count changes). GroupNorm eps is the UNet's `norm_eps`."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        kw = _module_kwargs(cfg, rngs)
        groups, eps, pd = cfg.norm_num_groups, cfg.norm_eps, kw["param_dtype"]
        self.norm1 = GroupNorm(groups, in_ch, eps, param_dtype=pd)
        self.conv1 = conv(in_ch, out_ch, 3, **kw)
        self.time_emb_proj = dense(cfg.time_embed_dim, out_ch, (None, "embed"), **kw)
        self.norm2 = GroupNorm(groups, out_ch, eps, param_dtype=pd)
        self.conv2 = conv(out_ch, out_ch, 3, **kw)
        self.conv_shortcut = conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        x = shard_rows(x)
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # dropout 0
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shard_rows(skip + h)  # output_scale_factor 1


class Attention(nnx.Module):
    """diffusers `Attention` as BasicTransformerBlock builds it: q/k/v without bias (k/v from the
    context for cross-attention), scale head_dim^-1/2, output projection with bias."""

    def __init__(self, cfg: UNetConfig, dim: int, heads: int, context_dim: int | None, *, rngs: nnx.Rngs):
        kw = _module_kwargs(cfg, rngs)
        self.heads, self.head_dim, self.impl = heads, dim // heads, cfg.attention_impl
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = dense(dim, dim, ("embed", "heads"), use_bias=False, **kw)
        self.to_k = dense(kv_dim, dim, ("embed", "heads"), use_bias=False, **kw)
        self.to_v = dense(kv_dim, dim, ("embed", "heads"), use_bias=False, **kw)
        self.to_out = dense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context

        def heads(proj: nnx.Linear, src: jax.Array) -> jax.Array:
            return proj(src).reshape(src.shape[0], src.shape[1], self.heads, self.head_dim)

        out = attention(heads(self.to_q, x), heads(self.to_k, context), heads(self.to_v, context),
                        implementation=self.impl)
        return self.to_out(out.reshape(x.shape[0], x.shape[1], -1))


class FeedForward(nnx.Module):
    """GEGLU feed-forward (diffusers `FeedForward(activation_fn="geglu")`): one projection to
    [hidden | gate] (2 x 4D), hidden * exact-erf GELU(gate), projection back to D."""

    def __init__(self, cfg: UNetConfig, dim: int, *, rngs: nnx.Rngs):
        kw = _module_kwargs(cfg, rngs)
        self.proj_in = dense(dim, 2 * 4 * dim, ("embed", "mlp"), **kw)
        self.proj_out = dense(4 * dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj_in(x), 2, axis=-1)
        return self.proj_out(hidden * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """diffusers `BasicTransformerBlock` (layer_norm): LN -> self-attention, LN -> cross-attention
    on the text context, LN -> GEGLU feed-forward, each added to the stream."""

    def __init__(self, cfg: UNetConfig, dim: int, heads: int, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.norm1 = LayerNorm(dim, _LAYER_NORM_EPS, param_dtype=pd)
        self.attn1 = Attention(cfg, dim, heads, None, rngs=rngs)
        self.norm2 = LayerNorm(dim, _LAYER_NORM_EPS, param_dtype=pd)
        self.attn2 = Attention(cfg, dim, heads, cfg.cross_attention_dim, rngs=rngs)
        self.norm3 = LayerNorm(dim, _LAYER_NORM_EPS, param_dtype=pd)
        self.ff = FeedForward(cfg, dim, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = shard_rows(x)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return shard_rows(x + self.ff(self.norm3(x)))


class BlockStack(nnx.Module):
    """`n` BasicTransformerBlocks with parameters stacked on a leading "layers" axis, run by
    nnx.scan: one traced block instead of n keeps compile time flat in depth (SDXL: 10)."""

    def __init__(self, cfg: UNetConfig, n: int, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.remat_policy = cfg.remat_policy

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs: nnx.Rngs) -> BasicTransformerBlock:
            return BasicTransformerBlock(cfg, dim, heads, rngs=rngs)

        self.layers = create(rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        body = _maybe_remat(lambda block, x, context: block(x, context), self.remat_policy)

        @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, x, context):
            return body(block, x, context)

        return run(self.layers, x, context)


class Transformer2DModel(nnx.Module):
    """diffusers `Transformer2DModel` on continuous input: GroupNorm (eps 1e-6), `proj_in` (linear,
    or 1x1 conv), `depth` BasicTransformerBlocks over the H*W tokens, `proj_out`, plus the input."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int, depth: int, *, rngs: nnx.Rngs):
        kw = _module_kwargs(cfg, rngs)
        self.remat_policy = cfg.remat_policy
        self.norm = GroupNorm(cfg.norm_num_groups, channels, _TRANSFORMER_GROUP_NORM_EPS, param_dtype=kw["param_dtype"])
        if cfg.use_linear_projection:
            self.proj_in = dense(channels, channels, (None, "embed"), **kw)
            self.proj_out = dense(channels, channels, ("embed", None), **kw)
        else:  # 1x1 convs: the same maths on NHWC, stored (and mapped) as conv kernels
            self.proj_in = conv(channels, channels, 1, **kw)
            self.proj_out = conv(channels, channels, 1, **kw)
        if cfg.scan_layers:
            self.transformer_blocks = None
            self.block_stack = BlockStack(cfg, depth, channels, heads, rngs=rngs)
        else:
            self.block_stack = None
            self.transformer_blocks = nnx.List(
                BasicTransformerBlock(cfg, channels, heads, rngs=rngs) for _ in range(depth)
            )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        # proj_in / proj_out act on the channel axis, so in NHWC the linear and 1x1-conv variants
        # differ only in their kernel's layout.
        tokens = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        if self.block_stack is not None:
            tokens = self.block_stack(tokens, context)
        else:
            block_fn = _maybe_remat(lambda blk, t, ctx: blk(t, ctx), self.remat_policy)
            for block in self.transformer_blocks:
                tokens = block_fn(block, tokens, context)
        return self.proj_out(tokens.reshape(b, h, w, c)) + x


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size=size, mode="nearest")` on NHWC: source index floor(dst * in / out)
    in float32 (torch's legacy "nearest"), which is the plain 2x repeat when size is twice the input."""
    if (2 * x.shape[1], 2 * x.shape[2]) == tuple(size):
        return upsample_nearest_2x(x)
    for axis, out in ((1, size[0]), (2, size[1])):
        n = x.shape[axis]
        scale = np.float32(n) / np.float32(out)
        idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int32), n - 1)
        x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


class DownBlock(nnx.Module):
    """diffusers `DownBlock2D` / `CrossAttnDownBlock2D`: `layers` resnets (each followed by a
    Transformer2DModel in the cross-attention kind), then, in all but the last block, a 3x3
    stride-2 conv padded by one on every side (`Downsample2D(padding=1)`). Returns the output and
    every intermediate state (the up path's skips)."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, *, rngs: nnx.Rngs):
        out_ch, n = cfg.block_out_channels[i], cfg.per_block("layers_per_block")[i]
        self.resnets = nnx.List(ResnetBlock2D(cfg, in_ch if j == 0 else out_ch, out_ch, rngs=rngs) for j in range(n))
        heads, depth = cfg.per_block("attention_head_dim")[i], cfg.per_block("transformer_layers_per_block")[i]
        self.attentions = (
            nnx.List(Transformer2DModel(cfg, out_ch, heads, depth, rngs=rngs) for _ in range(n))
            if cfg.down_block_types[i] == "CrossAttnDownBlock2D" else None
        )
        last = i == len(cfg.block_out_channels) - 1
        self.downsampler = None if last else conv(out_ch, out_ch, 3, strides=2, **_module_kwargs(cfg, rngs))
        self.remat_policy = cfg.remat_policy

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        resnet_fn = _maybe_remat(lambda blk, x, t: blk(x, t), self.remat_policy)
        states = []
        for j, resnet in enumerate(self.resnets):
            x = resnet_fn(resnet, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            states.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            states.append(x)
        return x, states


class MidBlock(nnx.Module):
    """diffusers `UNetMidBlock2DCrossAttn` (one layer): resnet, Transformer2DModel, resnet."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        c = cfg.block_out_channels[-1]
        heads, depth = cfg.per_block("attention_head_dim")[-1], cfg.per_block("transformer_layers_per_block")[-1]
        self.resnets = nnx.List(ResnetBlock2D(cfg, c, c, rngs=rngs) for _ in range(2))
        self.attentions = nnx.List([Transformer2DModel(cfg, c, heads, depth, rngs=rngs)])
        self.remat_policy = cfg.remat_policy

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        resnet_fn = _maybe_remat(lambda blk, x, t: blk(x, t), self.remat_policy)
        x = resnet_fn(self.resnets[0], x, temb)
        x = self.attentions[0](x, context)
        return resnet_fn(self.resnets[1], x, temb)


class UpBlock(nnx.Module):
    """diffusers `UpBlock2D` / `CrossAttnUpBlock2D` (up block i, counted from the bottom): `layers
    + 1` resnets, each on [stream, skip] concatenated on channels (skips taken last-first), each
    followed by a Transformer2DModel in the cross-attention kind; then, in all but the last block,
    nearest upsampling to the next skip's size and a 3x3 conv (`Upsample2D(use_conv=True)`)."""

    def __init__(self, cfg: UNetConfig, i: int, *, rngs: nnx.Rngs):
        rev = cfg.block_out_channels[::-1]
        n_blocks = len(rev)
        out_ch, prev_ch, skip_in_ch = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, n_blocks - 1)]
        n = cfg.per_block("layers_per_block")[::-1][i] + 1
        self.resnets = nnx.List(
            # The last resnet's skip comes from the level above (the previous down block's output).
            ResnetBlock2D(cfg, (prev_ch if j == 0 else out_ch) + (skip_in_ch if j == n - 1 else out_ch), out_ch,
                          rngs=rngs)
            for j in range(n)
        )
        heads = cfg.per_block("attention_head_dim")[::-1][i]
        depth = cfg.per_block("transformer_layers_per_block")[::-1][i]
        self.attentions = (
            nnx.List(Transformer2DModel(cfg, out_ch, heads, depth, rngs=rngs) for _ in range(n))
            if cfg.up_block_types[i] == "CrossAttnUpBlock2D" else None
        )
        self.upsampler = conv(out_ch, out_ch, 3, **_module_kwargs(cfg, rngs)) if i < n_blocks - 1 else None
        self.remat_policy = cfg.remat_policy

    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array,
                 size: tuple[int, int] | None) -> jax.Array:
        resnet_fn = _maybe_remat(lambda blk, x, t: blk(x, t), self.remat_policy)
        for j, resnet in enumerate(self.resnets):
            x = resnet_fn(resnet, jnp.concatenate([x, skips[-1 - j]], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsampler is not None:
            x = self.upsampler(upsample_nearest(x, size))
        return x


class UNet2DConditionModel(nnx.Module):
    """The SDXL UNet: `(latents NHWC, timesteps [B], context, text_embeds, time_ids) -> eps NHWC`.

    Outputs are in the compute dtype (`cfg.dtype`). Any latent size works; sides that are not
    multiples of `cfg.downsample_factor` upsample to each skip's size (diffusers' `upsample_size`).
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = _module_kwargs(cfg, rngs)
        ch, temb_dim = cfg.block_out_channels, cfg.time_embed_dim
        self.conv_in = conv(cfg.in_channels, ch[0], 3, **kw)
        self.time_embedding = MLPEmbedder(ch[0], temb_dim, **kw)
        self.add_embedding = (
            MLPEmbedder(cfg.projection_class_embeddings_input_dim, temb_dim, **kw)
            if cfg.addition_embed_type == "text_time" else None
        )
        self.down_blocks = nnx.List(DownBlock(cfg, i, ch[max(i - 1, 0)], rngs=rngs) for i in range(len(ch)))
        self.mid_block = MidBlock(cfg, rngs=rngs)
        self.up_blocks = nnx.List(UpBlock(cfg, i, rngs=rngs) for i in range(len(ch)))
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps, param_dtype=kw["param_dtype"])
        self.conv_out = conv(ch[0], cfg.out_channels, 3, **kw)

    def time_embed(self, timesteps: jax.Array, text_embeds: jax.Array | None,
                   time_ids: jax.Array | None) -> jax.Array:
        """The [B, time_embed_dim] embedding every resnet receives: timestep sinusoid (fp32) ->
        MLP, plus for "text_time" the MLP of [text_embeds, sinusoid of each time id]."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        sinusoid = dict(flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
        t_freq = timestep_embedding(timesteps, cfg.block_out_channels[0], **sinusoid)
        emb = self.time_embedding(t_freq.astype(dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("addition_embed_type='text_time' needs text_embeds and time_ids")
            b = text_embeds.shape[0]
            ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, **sinusoid).reshape(b, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), ids], axis=-1)
            emb = emb + self.add_embedding(add.astype(dtype))
        return emb

    def _to_mid(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                text_embeds: jax.Array | None, time_ids: jax.Array | None):
        """(mid block output, skips, temb, context): the down path and the mid block."""
        dtype = jnp.dtype(self.cfg.dtype)
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = self.time_embed(timesteps, text_embeds, time_ids)
        context = shard_rows(encoder_hidden_states.astype(dtype))

        x = shard_rows(self.conv_in(shard_rows(sample.astype(dtype))))
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, context)
            skips += states
        return self.mid_block(x, temb, context), skips, temb, context

    def features(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> jax.Array:
        """The mid block's output [B, H / f, W / f, block_out_channels[-1]] in the compute dtype (what
        DMD2's classifier head reads); the forward stops there."""
        return shard_rows(self._to_mid(sample, timesteps, encoder_hidden_states, text_embeds, time_ids)[0])

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> jax.Array:
        x, skips, temb, context = self._to_mid(sample, timesteps, encoder_hidden_states, text_embeds, time_ids)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if skips and block.upsampler is not None else None
            x = block(x, mine, temb, context, size)
        return shard_rows(self.conv_out(jax.nn.silu(self.conv_norm_out(x))))
