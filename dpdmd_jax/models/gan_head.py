"""The GAN's classifier head (DMD2's `cls_pred_branch`): real vs generated from the fake score's
intermediate features (`core.Backbone.features`: the UNet's mid block output, the MMDiT's image
tokens after a chosen joint block, on the patch grid).

Two 4x4 convolutions, each followed by GroupNorm and SiLU, then a 1x1 convolution to one logit per
position, averaged over space: one logit per sample, "real" when positive. DMD2 stacks as many
stride-2 convolutions as its 16x16 SDXL features need to reach 1x1; the spatial mean makes two fit
any grid. A convolution strides by 2 only while its output keeps both sides >= 2: on a 1x1 grid a
GroupNorm of one channel per group normalises every value to 0 and the head could only say 0.
"SAME" padding equals DMD2's padding 1 on even sides.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dpdmd_jax.models.vae import GroupNorm, conv

_GROUPS = 32  # DMD2's GroupNorm(num_groups=32, ...)
_NORM_EPS = 1e-5  # torch GroupNorm's default, as DMD2 builds it


def strides(grid: tuple[int, int], n: int = 2) -> tuple[int, ...]:
    """The head's convolutions' strides on a feature grid (h, w): 2 while the output keeps both sides >= 2."""
    out, side = [], min(grid)
    for _ in range(n):
        out.append(2 if side >= 4 else 1)
        side = -(-side // out[-1])
    return tuple(out)


class GanHead(nnx.Module):
    """`features [B, h, w, in_features] -> logits [B]` (float32) for features on a `grid` of (h, w);
    `width` channels inside (DMD2: the features' own width, 1280 for SDXL). Parameters carry logical
    axes ("embed" on the wide channel axis, as `models.vae.conv`), so the head shards like the
    networks it reads."""

    def __init__(self, grid: tuple[int, int], in_features: int, width: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        groups = math.gcd(_GROUPS, width)  # 32 groups where the width allows (DMD2), else the most that divide it
        s1, s2 = strides(grid)
        self.conv1 = conv(in_features, width, 4, strides=s1, padding="SAME", **kw)
        self.norm1 = GroupNorm(groups, width, _NORM_EPS, param_dtype=param_dtype)
        self.conv2 = conv(width, width, 4, strides=s2, padding="SAME", **kw)
        self.norm2 = GroupNorm(groups, width, _NORM_EPS, param_dtype=param_dtype)
        self.conv_out = conv(width, 1, 1, **kw)

    def __call__(self, features: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.norm1(self.conv1(features)))
        h = jax.nn.silu(self.norm2(self.conv2(h)))
        return jnp.mean(self.conv_out(h).astype(jnp.float32), axis=(1, 2, 3))
