"""LPIPS (Zhang et al. 2018, the `lpips` package's v0.1 metric with `net='vgg'`) as Flax NNX modules:
the torchvision VGG16 `features` trunk as lpips slices it, and the learned linear heads on top.

`VGG16Features` is torchvision's `vgg16().features` up to relu5_3 (its last max-pool is never
used): 13 3x3 convs (padding 1) with ReLUs, a 2x2 stride-2 max-pool before blocks 2..5 (torch's
floor mode: an odd last row / column is dropped). It returns the five activations lpips taps,
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (lpips' `pretrained_networks.vgg16` slices).
`LPIPS` maps images in [-1, 1] through lpips' ScalingLayer (ImageNet statistics in [-1, 1]
units), both images of a pair through one trunk pass, unit-normalises each tapped activation over
channels (`normalize_tensor`, eps 1e-10), takes the squared difference, weights the channels with a
1x1 conv without bias (`lin0..lin4`; the dropout before it is inactive at eval), averages over
space and sums the five layers: `lpips.LPIPS(net='vgg')(in0, in1, normalize=False)`, one
distance per pair.

Images are NHWC, as for every model here (torch's NCHW appears only in the checkpoint layout,
which `dpdmd_jax.weights.lpips` converts). The distances are differentiable in the images (the
distillation's regression loss takes their gradient); see `normalize_tensor` for the one place
where that needs care.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Width of each VGG16 block (= the channels of the activation lpips taps after it) and its
# number of 3x3 convs (torchvision's cfgs["D"]).
VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_BLOCK_CONVS = (2, 2, 3, 3, 3)
# lpips' ScalingLayer: (x - shift) / scale maps [-1, 1] images to ImageNet-normalised ones.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
NORMALIZE_EPS = 1e-10  # lpips.normalize_tensor's eps


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """torch `MaxPool2d(kernel_size=2, stride=2)` on NHWC (floor mode: VALID windows)."""
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def normalize_tensor(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """`lpips.normalize_tensor` on NHWC: x / (||x||_channels + eps), in x's dtype.

    Where every channel is zero (all ReLUs dead at a location; it happens on flat image regions),
    torch's gradient is NaN: sqrt's derivative at 0 is infinite and meets the sum of squares' zero
    derivative. The value there is 0 either way, and the exact derivative is I / eps (the norm's
    own term is multiplied by x = 0), which is what the double `where` gives: sqrt never sees 0.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    live = sq > 0
    norm = jnp.where(live, jnp.sqrt(jnp.where(live, sq, 1)), 0)
    return x / (norm + eps)


class VGG16Features(nnx.Module):
    """torchvision VGG16 `features[:30]` on NHWC images; `convs[i]` is `features[FEATURES_CONV_INDICES[i]]`
    (see `dpdmd_jax.weights.lpips`)."""

    def __init__(self, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        convs, c_in = [], 3
        for width, n in zip(VGG16_CHANNELS, VGG16_BLOCK_CONVS, strict=True):
            for _ in range(n):
                convs.append(nnx.Conv(c_in, width, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs))
                c_in = width
        self.convs = nnx.List(convs)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """[N, H, W, 3] (ImageNet-normalised) -> [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3], NHWC."""
        taps, i = [], 0
        for block, n in enumerate(VGG16_BLOCK_CONVS):
            if block:
                x = max_pool_2x2(x)
            for _ in range(n):
                x = jax.nn.relu(self.convs[i](x))
                i += 1
            taps.append(x)
        return taps


class LPIPS(nnx.Module):
    """LPIPS v0.1 with the VGG16 trunk: `model(x0, x1)` -> [N] distances of images in [-1, 1].

    `net` is the trunk, `lins[k]` lpips' `lin{k}` (a 1x1 conv C_k -> 1 without bias). Build it with
    `dpdmd_jax.weights.lpips.load_lpips`; a freshly initialised one is only a shape template.
    """

    def __init__(self, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.net = VGG16Features(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lins = nnx.List([
            nnx.Conv(c, 1, (1, 1), use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for c in VGG16_CHANNELS
        ])
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """x0, x1: [N, H, W, 3] in [-1, 1] (lpips' `normalize=False`) -> [N] float32 distances."""
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS takes two NHWC RGB batches of one shape, got {x0.shape} and {x1.shape}")
        n = x0.shape[0]
        x = (jnp.concatenate([x0, x1]).astype(jnp.float32) - SHIFT) / SCALE  # both images in one trunk pass
        total = jnp.zeros((n,), jnp.float32)
        for feat, lin in zip(self.net(x.astype(self.dtype)), self.lins, strict=True):
            # Normalised in float32: a bf16 trunk's activations square to values bf16 sums poorly.
            feat = normalize_tensor(feat.astype(jnp.float32))
            diff = jnp.square(feat[:n] - feat[n:])
            total = total + jnp.mean(lin(diff.astype(self.dtype)).astype(jnp.float32), axis=(1, 2, 3))
        return total
