"""The FID Inception network as a Flax NNX module: exactly pytorch-fid's `fid_inception_v3()` (the
TensorFlow 2015-12-05 Inception graph that FID is defined on, ported with its weights; clean-fid's
torchscript `inception-2015-12-05.pt` is the same graph and weights), returning the 2048-d pool3
features.

It is torchvision's `Inception3` with the FID patches of `pytorch_fid/inception.py`:
  * every conv is `BasicConv2d`: Conv2d without bias, BatchNorm2d (eps 0.001) in eval mode, i.e.
    with its running statistics, then ReLU;
  * the 3x3 stride-1 average pools in the branch_pool of Mixed_5b..5d (FIDInceptionA), 6b..6e
    (FIDInceptionC) and 7b (FIDInceptionE_1) leave the zero padding out of the mean
    (`count_include_pad=False`, TensorFlow's convention);
  * Mixed_7c (FIDInceptionE_2) max-pools in its branch_pool instead (a quirk of the TF graph);
  * Mixed_6a / 7a (InceptionB / D, unpatched) and the stem max-pool 3x3 with stride 2, unpadded;
  * pool3 is the global average of Mixed_7c's output; `fc` (2048 -> 1008, the TF graph's classes)
    is kept so that the published state dict maps one to one (`logits`, for an Inception Score).

Attribute paths are the state dict's module names (`Mixed_6b.branch7x7dbl_3.conv`, `...bn`), so the
key map in `dpdmd_jax.weights.inception` is a table of renames.

Input: NHWC float images already normalised to [-1, 1]: what pytorch-fid's blocks see after its
`normalize_input` (2 x - 1 of [0, 1] images) and clean-fid's torchscript after its `(x - 128) / 128`
of [0, 255] images. `dpdmd_jax.eval.fid` does clean-fid's resize and normalisation. FID is defined
at 299 x 299; any size of at least 75 x 75 (the smallest that leaves Mixed_7a a 1 x 1 map) runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

FEATURE_DIM = 2048
MIN_SIZE = 75  # stem (stride 2, two valid 3x3, two stride-2 pools) and two stride-2 reductions
BN_EPS = 1e-3  # torchvision's BasicConv2d: BatchNorm2d(eps=0.001), as the TF graph
PRECISIONS = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """How we run the (fixed) FID Inception architecture.

    num_classes: the classifier head of the published weights (1008, the TF graph's).
    precision: of the convolutions; "highest" computes fp32 as fp32 on TPU / GPU too (their default
      takes bf16 / TF32 passes, which moves FID against statistics computed in fp32).
    """

    num_classes: int = 1008
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str = "highest"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {sorted(PRECISIONS)}")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm with running statistics -> ReLU."""

    def __init__(self, cfg: InceptionConfig, cin: int, cout: int, kernel_size, *, stride=1, padding=0,
                 rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.conv = nnx.Conv(cin, cout, _pair(kernel_size), strides=_pair(stride),
                             padding=[(p, p) for p in _pair(padding)], use_bias=False, dtype=dtype,
                             param_dtype=param_dtype, precision=PRECISIONS[cfg.precision], rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """F.avg_pool2d(k=3, s=1, p=1, count_include_pad=False): the mean over the window's in-image pixels."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x: jax.Array) -> jax.Array:
    """F.max_pool2d(k=3, s=1, p=1): padding never wins the max."""
    return nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """F.max_pool2d(k=3, s=2), unpadded (floor of the output size)."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nnx.Module):
    """Mixed_5b..5d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool (no padding counted) -> 1x1."""

    def __init__(self, cfg: InceptionConfig, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        conv = lambda *a, **k: BasicConv2d(cfg, *a, rngs=rngs, **k)
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid 35 -> 17 at 299 px): 3x3 s2 | 1x1 -> 3x3 -> 3x3 s2 | max pool s2."""

    def __init__(self, cfg: InceptionConfig, cin: int, *, rngs: nnx.Rngs):
        conv = lambda *a, **k: BasicConv2d(cfg, *a, rngs=rngs, **k)
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool_3x3_s2(x),
        ], axis=-1)


class FIDInceptionC(nnx.Module):
    """Mixed_6b..6e: factorised 7x7 branches (1x7 / 7x1) and an avg pool without padding counted."""

    def __init__(self, cfg: InceptionConfig, cin: int, channels_7x7: int, *, rngs: nnx.Rngs):
        conv = lambda *a, **k: BasicConv2d(cfg, *a, rngs=rngs, **k)
        c7 = channels_7x7
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return jnp.concatenate([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_3x3(x))], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid 17 -> 8 at 299 px): 1x1 -> 3x3 s2 | 1x1 -> 1x7 -> 7x1 -> 3x3 s2 | max pool s2."""

    def __init__(self, cfg: InceptionConfig, cin: int, *, rngs: nnx.Rngs):
        conv = lambda *a, **k: BasicConv2d(cfg, *a, rngs=rngs, **k)
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nnx.Module):
    """Mixed_7b (FIDInceptionE_1, `pool="avg"`, padding not counted) and Mixed_7c (FIDInceptionE_2,
    `pool="max"`): 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1."""

    def __init__(self, cfg: InceptionConfig, cin: int, pool: str, *, rngs: nnx.Rngs):
        conv = lambda *a, **k: BasicConv2d(cfg, *a, rngs=rngs, **k)
        self.pool = {"avg": avg_pool_3x3, "max": max_pool_3x3}[pool]
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
            self.branch_pool(self.pool(x)),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """pytorch-fid's FID Inception: `x [B, H, W, 3]` (NHWC, normalised to [-1, 1], H, W >= 75)
    -> pool3 features [B, 2048]."""

    def __init__(self, cfg: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        conv = lambda *a, **k: BasicConv2d(cfg, *a, rngs=rngs, **k)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(cfg, 192, 32, rngs=rngs)
        self.Mixed_5c = FIDInceptionA(cfg, 256, 64, rngs=rngs)
        self.Mixed_5d = FIDInceptionA(cfg, 288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(cfg, 288, rngs=rngs)
        self.Mixed_6b = FIDInceptionC(cfg, 768, 128, rngs=rngs)
        self.Mixed_6c = FIDInceptionC(cfg, 768, 160, rngs=rngs)
        self.Mixed_6d = FIDInceptionC(cfg, 768, 160, rngs=rngs)
        self.Mixed_6e = FIDInceptionC(cfg, 768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(cfg, 768, rngs=rngs)
        self.Mixed_7b = FIDInceptionE(cfg, 1280, "avg", rngs=rngs)
        self.Mixed_7c = FIDInceptionE(cfg, 2048, "max", rngs=rngs)
        self.fc = nnx.Linear(FEATURE_DIM, cfg.num_classes, dtype=jnp.dtype(cfg.dtype),
                             param_dtype=jnp.dtype(cfg.param_dtype), precision=PRECISIONS[cfg.precision], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"the FID Inception takes NHWC images [batch, H, W, 3] with H, W >= {MIN_SIZE} "
                             f"(299 x 299 for FID), got {list(x.shape)}")
        x = x.astype(jnp.dtype(self.cfg.dtype))
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool_3x3_s2(x)))
        x = max_pool_3x3_s2(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        # AdaptiveAvgPool2d((1, 1)), in fp32 whatever the compute dtype.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def logits(self, pool3: jax.Array) -> jax.Array:
        """The 1008 class logits of pool3 features (torchvision's fc; dropout is off in eval)."""
        return self.fc(pool3)

