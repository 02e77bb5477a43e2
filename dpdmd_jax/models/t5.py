"""T5 v1.1 encoder (transformers `T5EncoderModel`; SD3's text_encoder_3 is T5-XXL) as a Flax NNX module.

The maths follows transformers 5.24 `modeling_t5.py` exactly:
  - pre-norm blocks, T5 LayerNorm = RMS norm without mean subtraction or bias (fp32 statistics);
  - attention logits are NOT scaled by 1/sqrt(d_kv) and get a learned relative position bias;
    the bias table lives only in block 0 of the checkpoint and the bias it gives is computed once and
    shared by every layer (`T5Stack.forward` passes block 0's `position_bias` on);
  - the feed-forward is gated tanh-GELU for v1.1 ("gated-gelu": wo(gelu_new(wi_0 x) * wi_1 x)), or
    original T5's wo(relu(wi x)) ("relu");
  - output = `last_hidden_state`, after the final RMS norm. No attention mask (SD3 passes none).

bfloat16: transformers keeps `wo` in float32 only for float16 (`_keep_in_fp32_modules`: fp16 overflows in
the FF output); bf16 shares fp32's exponent range, so nothing overflows there and the weights may all be
bf16. What bf16 loses is precision in the residual stream, whose adds of small updates onto a large,
growing sum are rounded to 8 mantissa bits 2 * num_layers times. We carry the residual stream in float32
(matmuls, attention and the FF still run in the compute dtype) so those adds are exact to fp32. On a
12-layer random encoder with one large residual channel (tests/test_t5.py, "test_bf16_residual_stream")
that cuts the bf16 error on the other channels from 1.05e-2 (bf16 adds, as transformers) to 6.1e-3; the
stream costs 4 bytes x B x L x d_model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpdmd_jax.models.layers import RMSNorm, dense, gelu_tanh, partitioned

# Fields of transformers' T5Config that describe the encoder's architecture.
_TRANSFORMERS_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "layer_norm_epsilon",
    "feed_forward_proj",
)
# feed_forward_proj -> (gated, activation). T5Config maps "gated-gelu" to "gelu_new" (tanh GELU) for
# backwards compatibility; plain "relu" is original T5's non-gated T5DenseActDense.
FEED_FORWARD = {"gated-gelu": (True, gelu_tanh), "relu": (False, jax.nn.relu)}
RESIDUAL_DTYPES = ("float32", "compute")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Encoder architecture (transformers names and T5Config defaults) plus how we run it."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    # Execution knobs (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    residual_dtype: str = "float32"  # "float32", or "compute": the residual stream in `dtype`, as transformers

    def __post_init__(self):
        problems = []
        if self.feed_forward_proj not in FEED_FORWARD:
            problems.append(
                f"feed_forward_proj={self.feed_forward_proj!r} is not supported (use one of {sorted(FEED_FORWARD)})"
            )
        if jnp.dtype(self.dtype) == jnp.float16:
            problems.append(
                "dtype='float16': T5 v1.1 activations overflow float16 (transformers keeps `wo` in float32 for it); "
                "use 'bfloat16' or 'float32'"
            )
        if self.residual_dtype not in RESIDUAL_DTYPES:
            problems.append(f"residual_dtype={self.residual_dtype!r}; choose one of {RESIDUAL_DTYPES}")
        max_exact = self.relative_attention_num_buckets // 4  # bidirectional: half per direction, half exact
        if max_exact < 1:
            problems.append(f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4")
        elif self.relative_attention_max_distance <= max_exact:
            problems.append(
                f"relative_attention_max_distance={self.relative_attention_max_distance} must exceed the exact "
                f"range relative_attention_num_buckets // 4 = {max_exact} (the log-spaced buckets divide by "
                "log(max_distance / exact range))"
            )
        if problems:
            raise ValueError("Invalid T5 config: " + "; ".join(problems) + ".")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_transformers(cls, raw: dict[str, Any], **overrides: Any) -> "T5Config":
        """Builds the config from a transformers T5 `config.json` (as a dict)."""
        kwargs = {k: raw[k] for k in _TRANSFORMERS_FIELDS if k in raw}
        if "feed_forward_proj" not in raw:
            kwargs["feed_forward_proj"] = "relu"  # T5Config's default (original T5)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_transformers(self) -> dict[str, Any]:
        """A config.json that `T5EncoderModel.from_pretrained` loads as this architecture."""
        d = {k: getattr(self, k) for k in _TRANSFORMERS_FIELDS}
        return {
            "architectures": ["T5EncoderModel"], "model_type": "t5", **d,
            "is_encoder_decoder": False, "use_cache": False,
        }


# Full-size preset: google/t5-v1_1-xxl (= SD3 / SD3.5 text_encoder_3).
T5_V1_1_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
)
PRESETS = {"t5-v1_1-xxl": T5_V1_1_XXL}


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """transformers `T5Attention._relative_position_bucket(bidirectional=True)`, in numpy.

    Half of the buckets per direction (positive offsets get the upper half); in each, offsets below
    `num_buckets // 4` get their own bucket, larger ones log-spaced buckets up to `max_distance`, beyond
    it the last bucket. The log term is computed in float32 in the reference's operation order (offsets
    that are exact powers land on bucket boundaries, where float64 would round differently). The
    positions are static, so this runs once on the host at trace time.
    """
    rp = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    buckets = (rp > 0).astype(np.int64) * half
    rp = np.abs(rp)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) for the offsets that take the exact branch anyway
        scaled = (
            np.log(rp.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact)
        )
    large = max_exact + np.where(rp < max_exact, 0, scaled).astype(np.int64)  # .to(long) truncates
    large = np.minimum(large, half - 1)
    return buckets + np.where(rp < max_exact, rp, large)


def position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[L, L] bucket of (key position - query position) for an encoder of `length` tokens."""
    pos = np.arange(length)
    return relative_position_bucket(pos[None, :] - pos[:, None], num_buckets, max_distance)


class T5Attention(nnx.Module):
    """Self-attention without 1/sqrt(d) scaling; the relative position bias comes from the caller."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), use_bias=False)
        self.q, self.k, self.v = (dense(cfg.d_model, cfg.inner_dim, ("embed", "heads"), **kw) for _ in range(3))
        self.o = dense(cfg.inner_dim, cfg.d_model, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        b, length, _ = x.shape
        q, k, v = (p(x).reshape(b, length, self.num_heads, self.d_kv) for p in (self.q, self.k, self.v))
        # Logits and softmax in float32; the [1, N, L, L] float32 bias is added to the fp32 logits.
        out = jax.nn.dot_product_attention(q, k, v, bias=position_bias, scale=1.0)
        return self.o(out.reshape(b, length, -1))


class T5FeedForward(nnx.Module):
    """`T5DenseGatedActDense` (wi_0, wi_1, wo) or `T5DenseActDense` (wi, wo), without dropout."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.gated, self.act = FEED_FORWARD[cfg.feed_forward_proj]
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), use_bias=False)
        if self.gated:
            self.wi_0 = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
            self.wi_1 = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        else:
            self.wi = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wo = dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5Block(nnx.Module):
    """`T5Block` of the encoder: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        norm_kw = dict(eps=cfg.layer_norm_epsilon, param_dtype=jnp.dtype(cfg.param_dtype))
        self.attn_norm = RMSNorm(cfg.d_model, **norm_kw)
        self.attn = T5Attention(cfg, rngs=rngs)
        self.ff_norm = RMSNorm(cfg.d_model, **norm_kw)
        self.ff = T5FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        # `x` is the residual stream (float32 or the compute dtype); the norms read it in float32 and the
        # sublayers run in the compute dtype; their outputs are added in the stream's dtype.
        x = x + self.attn(self.attn_norm(x).astype(self.dtype), position_bias).astype(x.dtype)
        return x + self.ff(self.ff_norm(x).astype(self.dtype)).astype(x.dtype)


class T5Encoder(nnx.Module):
    """T5 encoder stack: `input_ids [B, L] int -> last_hidden_state [B, L, d_model]` (compute dtype)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.residual_dtype = jnp.dtype(jnp.float32 if cfg.residual_dtype == "float32" else cfg.dtype)
        # One table: `shared` and `encoder.embed_tokens` are tied in T5EncoderModel. Looked up straight
        # into the residual stream's dtype.
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.d_model, dtype=self.residual_dtype, param_dtype=param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(1.0), ("vocab", "embed")), rngs=rngs,
        )
        # Block 0's `relative_attention_bias` (buckets x heads); the checkpoint has no other.
        init = partitioned(nnx.initializers.normal(cfg.d_model**-0.5), (None, "heads"))
        self.relative_attention_bias = nnx.Param(
            init(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), param_dtype)
        )
        self.blocks = nnx.List(T5Block(cfg, rngs=rngs) for _ in range(cfg.num_layers))
        self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)

    def position_bias(self, length: int) -> jax.Array:
        """[1, num_heads, L, L] float32 bias (`T5Attention.compute_bias`), shared by every layer."""
        cfg = self.cfg
        buckets = position_buckets(length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        values = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), jnp.asarray(buckets), axis=0)
        return values.transpose(2, 0, 1)[None]

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            got = f"{input_ids.dtype}{list(input_ids.shape)}"
            raise ValueError(f"input_ids must be [batch, length] integers, got {got}")
        bias = self.position_bias(input_ids.shape[1])
        x = self.embed_tokens(input_ids)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_layer_norm(x).astype(jnp.dtype(cfg.dtype))
