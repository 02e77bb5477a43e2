"""The diffusers `AutoencoderKL` (the SD3 / SD3.5 and SDXL VAEs) as a Flax NNX module.

`encode(x)` maps NHWC images in [-1, 1] to the mean and log-variance of the latent Gaussian
(diffusers' `DiagonalGaussianDistribution`, logvar clamped to [-30, 20]); `decode(z)` maps NHWC
latents back to images. Latents here are the VAE's own ("raw") latents: the denoiser sees
`to_model_latent(cfg, z)`, as the diffusers pipelines scale and shift them.

Attribute names follow diffusers so the key map in `dpdmd_jax.weights.vae` stays a one-to-one
table; the only flattenings are the one-element `downsamplers` / `upsamplers` / `attentions`
lists (single attributes here) and `to_out.0` (`to_out`).

The VAE runs in float32 by default: the SDXL VAE overflows fp16 (NaNs); bfloat16 has fp32's
range and stays finite, at ~1e-2 relative error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpdmd_jax.models.layers import attention, default_kernel_init, dense, partitioned

_EPS = 1e-6  # every GroupNorm of the diffusers VAE (resnets, mid-block attention, conv_norm_out)
_LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"

# diffusers AutoencoderKL.__init__ defaults: a config.json lacking a field means this value.
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1, latent_channels=4,
    norm_num_groups=32, sample_size=32, scaling_factor=0.18215, shift_factor=None, force_upcast=True,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture (diffusers names and defaults) plus how we run it (dtypes)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Carried through for the exported config.json (tiling size, pipelines' fp16 upcast hint).
    sample_size: int = 32
    force_upcast: bool = True
    # Execution knobs (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype; fp32 by default (see the module docstring)
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.shift_factor is not None:
            object.__setattr__(self, "shift_factor", float(self.shift_factor))
        problems = []
        if not self.block_out_channels:
            problems.append("block_out_channels is empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            problems.append(f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels {bad}")
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block={self.layers_per_block} must be >= 1")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                problems.append(f"{name}={getattr(self, name)!r} is not a dtype name")
        if problems:
            raise ValueError("Invalid VAE config: " + "; ".join(problems) + ".")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SD3 / SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any], **overrides: Any) -> "VAEConfig":
        """Builds the config from a diffusers AutoencoderKL `config.json` (as a dict).
        Raises ValueError for variants this module does not implement."""
        cfg = {**_DIFFUSERS_DEFAULTS, **{k: raw[k] for k in _DIFFUSERS_DEFAULTS if k in raw}}
        n = len(cfg["block_out_channels"])
        problems = []
        down = tuple(raw.get("down_block_types", (_DOWN_BLOCK,)))
        up = tuple(raw.get("up_block_types", (_UP_BLOCK,)))
        if down != (_DOWN_BLOCK,) * n:
            problems.append(f"down_block_types {list(down)} (supported: {n} x {_DOWN_BLOCK})")
        if up != (_UP_BLOCK,) * n:
            problems.append(f"up_block_types {list(up)} (supported: {n} x {_UP_BLOCK})")
        if raw.get("act_fn", "silu") != "silu":
            problems.append(f"act_fn={raw['act_fn']!r} (supported: 'silu')")
        for name in ("latents_mean", "latents_std"):
            if raw.get(name) is not None:
                problems.append(f"{name} is set (per-channel latent statistics are not supported)")
        if problems:
            raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))
        cfg.update(overrides)
        return cls(**cfg)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config.json for this architecture (`AutoencoderKL(**config)`)."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [_DOWN_BLOCK] * n,
            "up_block_types": [_UP_BLOCK] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": None,
            "latents_std": None,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


# Full-size presets (the vae/config.json of the released pipelines).
_FULL = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             norm_num_groups=32, sample_size=1024, force_upcast=True, mid_block_add_attention=True)
SD3_VAE = dict(_FULL, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
SDXL_VAE = dict(_FULL, latent_channels=4, scaling_factor=0.13025, shift_factor=None,
                use_quant_conv=True, use_post_quant_conv=True)
PRESETS = {"sd3": SD3_VAE, "sdxl": SDXL_VAE}


def to_model_latent(cfg: VAEConfig, z: jax.Array) -> jax.Array:
    """VAE latent -> the denoiser's latent, `(z - shift) * scaling` (diffusers pipelines)."""
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def from_model_latent(cfg: VAEConfig, latent: jax.Array) -> jax.Array:
    """The denoiser's latent -> VAE latent, `latent / scaling + shift` (before `decode`)."""
    return latent / cfg.scaling_factor + (cfg.shift_factor or 0.0)


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the posterior `encode` describes (`DiagonalGaussianDistribution.sample`)."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


# ---------------------------------------------------------------------------- building blocks


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    dtype: Any,
    param_dtype: Any,
    strides: int = 1,
    padding: Any = None,
) -> nnx.Conv:
    """`nnx.Conv` (kernel (kh, kw, in, out)) with logical axes: "embed" on the wider channel axis
    (the output one on ties), so the 3-channel image convs and the latent convs shard on their
    128 / 512-wide side; the bias follows the output axis. Default padding keeps the size."""
    embed_in = in_features > out_features
    kernel_axes = (None, None, "embed" if embed_in else None, None if embed_in else "embed")
    pad = kernel_size // 2
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=strides,
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(default_kernel_init, kernel_axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), (kernel_axes[3],)),
        rngs=rngs,
    )


class GroupNorm(nnx.Module):
    """torch `GroupNorm` (affine) on NHWC: contiguous channel groups, biased variance over
    (group channels, H, W), statistics in float32 (exact two-pass variance)."""

    def __init__(self, num_groups: int, channels: int, eps: float = _EPS, *, param_dtype: Any = jnp.float32):
        self.num_groups, self.eps = num_groups, eps
        self.weight = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        g = x.astype(jnp.float32).reshape(b, -1, self.num_groups, c // self.num_groups)
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` without a time embedding: norm-SiLU-conv twice, plus the input
    (through a 1x1 `conv_shortcut` when the channel count changes)."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        groups, pd = cfg.norm_num_groups, kw["param_dtype"]
        self.norm1 = GroupNorm(groups, in_ch, param_dtype=pd)
        self.conv1 = conv(in_ch, out_ch, 3, **kw)
        self.norm2 = GroupNorm(groups, out_ch, param_dtype=pd)
        self.conv2 = conv(out_ch, out_ch, 3, **kw)
        self.conv_shortcut = conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # dropout 0
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h  # output_scale_factor 1


class Attention(nnx.Module):
    """The mid block's spatial self-attention: GroupNorm, one head over all C channels (scale
    C^-1/2), output projection, residual (diffusers `Attention`, `_from_deprecated_attn_block`)."""

    def __init__(self, cfg: VAEConfig, channels: int, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.group_norm = GroupNorm(cfg.norm_num_groups, channels, param_dtype=kw["param_dtype"])
        self.to_q, self.to_k, self.to_v = (dense(channels, channels, ("embed", None), **kw) for _ in range(3))
        self.to_out = dense(channels, channels, (None, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)

        def one_head(proj: nnx.Linear) -> jax.Array:
            return proj(tokens).reshape(b, h * w, 1, c)

        out = attention(one_head(self.to_q), one_head(self.to_k), one_head(self.to_v))
        return self.to_out(out.reshape(b, h * w, c)).reshape(b, h, w, c) + x  # rescale_output_factor 1


class MidBlock(nnx.Module):
    """diffusers `UNetMidBlock2D` (one layer): resnet, [attention], resnet."""

    def __init__(self, cfg: VAEConfig, channels: int, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cfg, channels, channels, rngs=rngs) for _ in range(2)])
        self.attention = Attention(cfg, channels, rngs=rngs) if cfg.mid_block_add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """`layers_per_block` resnets, then (all but the last block) a stride-2 3x3 conv after zero
    padding bottom/right by one (`Downsample2D(padding=0)`: pad (0, 1, 0, 1), VALID conv)."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, add_downsample: bool, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.resnets = nnx.List(
            ResnetBlock2D(cfg, in_ch if i == 0 else out_ch, out_ch, rngs=rngs) for i in range(cfg.layers_per_block)
        )
        self.downsampler = (
            conv(out_ch, out_ch, 3, strides=2, padding=((0, 1), (0, 1)), **kw) if add_downsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsampler(x) if self.downsampler is not None else x


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """`F.interpolate(scale_factor=2, mode="nearest")` on NHWC."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class UpDecoderBlock2D(nnx.Module):
    """`layers_per_block + 1` resnets, then (all but the last block) nearest 2x upsampling and a
    3x3 conv (`Upsample2D(use_conv=True)`)."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, add_upsample: bool, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.resnets = nnx.List(
            ResnetBlock2D(cfg, in_ch if i == 0 else out_ch, out_ch, rngs=rngs) for i in range(cfg.layers_per_block + 1)
        )
        self.upsampler = conv(out_ch, out_ch, 3, **kw) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsampler(upsample_nearest_2x(x)) if self.upsampler is not None else x


class Encoder(nnx.Module):
    """diffusers `Encoder` (double_z): image -> 2 * latent_channels moments."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        ch = cfg.block_out_channels
        self.conv_in = conv(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List(
            DownEncoderBlock2D(cfg, ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, rngs=rngs) for i in range(len(ch))
        )
        self.mid_block = MidBlock(cfg, ch[-1], rngs=rngs)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], param_dtype=kw["param_dtype"])
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers `Decoder` (group norm): latent -> image."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        rev = cfg.block_out_channels[::-1]
        self.conv_in = conv(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock(cfg, rev[0], rngs=rngs)
        self.up_blocks = nnx.List(
            UpDecoderBlock2D(cfg, rev[max(i - 1, 0)], rev[i], i < len(rev) - 1, rngs=rngs) for i in range(len(rev))
        )
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, rev[-1], param_dtype=kw["param_dtype"])
        self.conv_out = conv(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers `AutoencoderKL`: `encode(x) -> (mean, logvar)`, `decode(z) -> x`, all NHWC.

    Outputs are in the compute dtype (`cfg.dtype`). Image sides must be multiples of
    `cfg.downsample_factor` for `decode(encode(x))` to return the input size.
    """

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        lat = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quant_conv = conv(2 * lat, 2 * lat, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, **kw) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent]."""
        h = self.encoder(x.astype(jnp.dtype(self.cfg.dtype)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """VAE latents [B, h, w, latent_channels] (unscaled: see `from_model_latent`) -> images."""
        z = z.astype(jnp.dtype(self.cfg.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
