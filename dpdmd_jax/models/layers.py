"""Building blocks shared by the backbones: dense layers with logical axes, norms, attention,
timestep embeddings.

Every parameter carries logical axis names (``nnx.with_partitioning``); `dpdmd_jax.parallel`
maps them onto the mesh axes ("data", "fsdp", "tensor") with rules from the config.
Norm statistics and timestep sinusoids are computed in float32 whatever the compute dtype,
as the PyTorch references do.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpdmd_jax.models.lora import Dense

Dtype = Any
default_kernel_init = nnx.initializers.lecun_normal()


# ---------------------------------------------------------------------------- activation sharding

# (mesh, the mesh axes a batch's rows are split over) while a program is traced under `split_rows`.
_ROWS: contextvars.ContextVar[tuple[Mesh, tuple[str, ...]] | None] = contextvars.ContextVar("rows", default=None)


@contextlib.contextmanager
def split_rows(mesh: Mesh, axes: Sequence[str]) -> Iterator[None]:
    """While a program is traced inside, `shard_rows` splits activations' rows over `axes` of `mesh`.

    The models constrain their activations so because XLA's sharding propagation would otherwise
    follow the (FSDP-sharded) parameters, gather them, and have every device compute the model for
    the whole global batch: the same numbers, but #devices times the FLOPs and the activations."""
    token = _ROWS.set((mesh, tuple(a for a in axes if a in mesh.axis_names)))
    try:
        yield
    finally:
        _ROWS.reset(token)


def compute_platform() -> str:
    """The platform the program being traced will run on: that of `split_rows`'s mesh (the planner
    traces a TPU program on a CPU host), else JAX's default backend."""
    rows = _ROWS.get()
    return rows[0].devices.flat[0].platform if rows is not None else jax.default_backend()


def shard_rows(x: jax.Array) -> jax.Array:
    """`x`'s leading (batch) axis over the batch axes of `split_rows`'s mesh; `x` itself outside
    `split_rows` or where the rows do not divide over those axes (one sample, say)."""
    rows = _ROWS.get()
    if rows is None:
        return x
    mesh, axes = rows
    n = math.prod(mesh.shape[a] for a in axes)
    if n <= 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(axes)))


def partitioned(init, axes: tuple[str | None, ...]):
    """Tags an initializer's Param with logical `axes`.

    Placement is explicit (`dpdmd_jax.parallel` turns the names into shardings for jit /
    device_put), so modules build the same on any mesh or none: no eager sharding at creation.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    kernel_init=default_kernel_init,
) -> Dense:
    """A linear layer (`models.lora.Dense`: `nnx.Linear` that can take adapters) whose kernel is
    tagged with logical `axes` (in, out) and bias with (out,)."""
    return Dense(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters; statistics in float32 (exact two-pass variance)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale (diffusers `RMSNorm`): fp32 variance, no mean subtraction."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype: Dtype = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation `x * (1 + scale) + shift` with per-sample [B, D] shift/scale."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (SD3 feed-forward, T5)."""
    return jax.nn.gelu(x, approximate=True)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (float) timesteps, as diffusers `get_timestep_embedding`, in fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - downscale_freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class MLPEmbedder(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection`)."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = dense(in_dim, out_dim, (None, "embed"), **kw)
        self.linear_2 = dense(out_dim, out_dim, ("embed", "mlp"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


# Above this many bytes of fp32 logits, CPU attention loops over (batch, head); see `attention`.
CPU_PER_HEAD_MIN_LOGITS_BYTES = 4 << 20


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None
) -> jax.Array:
    """Multi-head attention on [B, T, N, H] tensors, scale 1/sqrt(H), no mask.

    `jax.nn.dot_product_attention` dispatches to cuDNN flash attention on GPUs when
    `implementation="cudnn"` (bf16/fp16), and to XLA elsewhere. On CPU, XLA materialises all
    [B, N, T, S] logits and runs QK^T, softmax and PV through DRAM (4.4x slower than torch SDPA at
    1357 tokens: docs/benchmarks/mmdit-forward.md); for large
    logits we loop over (batch, head) instead, which keeps one [T, S] block in cache
    (`attention_per_head`).
    """
    impl = None if implementation in (None, "xla", "auto") else implementation
    b, t, n, _ = q.shape
    logits_bytes = 4 * b * n * t * k.shape[1]
    if impl is None and compute_platform() == "cpu" and logits_bytes > CPU_PER_HEAD_MIN_LOGITS_BYTES:
        return attention_per_head(q, k, v)
    if impl == "cudnn":
        return attention_padded(q, k, v, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


# cuDNN flash attention's backward only takes sequence lengths that are multiples of 64 (SD3's
# 4096 + 333 tokens fail with "Unsupported sequence length"); we pad and mask instead.
CUDNN_SEQ_MULTIPLE = 64


def attention_padded(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None,
    multiple: int = CUDNN_SEQ_MULTIPLE,
) -> jax.Array:
    """`attention` with T and S zero-padded to a multiple of `multiple`; padded keys are masked
    through `key_value_seq_lengths` and padded query rows are sliced off, so the result is exact."""
    b, t, _, _ = q.shape
    s = k.shape[1]
    pad_t, pad_s = -t % multiple, -s % multiple
    if pad_t == pad_s == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    def pad(x: jax.Array, amount: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, amount), (0, 0), (0, 0)))

    out = jax.nn.dot_product_attention(
        pad(q, pad_t), pad(k, pad_s), pad(v, pad_s),
        query_seq_lengths=jnp.full((b,), t, jnp.int32), key_value_seq_lengths=jnp.full((b,), s, jnp.int32),
        implementation=implementation,
    )
    return out[:, :t]


def attention_per_head(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`attention` computed one (batch, head) at a time; same maths, fp32 softmax statistics."""
    b, t, n, h = q.shape
    s = k.shape[1]

    def heads(x: jax.Array, length: int) -> jax.Array:  # [B, L, N, H] -> [B*N, L, H]
        return x.transpose(0, 2, 1, 3).reshape(b * n, length, h)

    out = _heads_attention(heads(q * jnp.asarray(h**-0.5, q.dtype), t), heads(k, s), heads(v, s))
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _heads_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q [G, T, H] (pre-scaled), k/v [G, S, H] -> out [G, T, H] and logsumexp [G, T] (fp32)."""

    def one(args):
        qq, kk, vv = args
        logits = jnp.einsum("th,sh->ts", qq, kk, preferred_element_type=jnp.float32)
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("ts,sh->th", (p / denom).astype(vv.dtype), vv)
        return o, (m + jnp.log(denom))[:, 0]

    return jax.lax.map(one, (q, k, v))


@jax.custom_vjp
def _heads_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return _heads_forward(q, k, v)[0]


def _heads_attention_fwd(q, k, v):
    o, lse = _heads_forward(q, k, v)
    return o, (q, k, v, o, lse)


def _heads_attention_bwd(res, do):
    """Flash-attention style backward: recompute P per head from the saved logsumexp rather than
    letting autodiff store every [T, S] block."""
    q, k, v, o, lse = res

    def one(args):
        qq, kk, vv, oo, ll, dd = args
        p = jnp.exp(jnp.einsum("th,sh->ts", qq, kk, preferred_element_type=jnp.float32) - ll[:, None])
        dv = jnp.einsum("ts,th->sh", p.astype(dd.dtype), dd)
        dp = jnp.einsum("th,sh->ts", dd, vv, preferred_element_type=jnp.float32)
        delta = jnp.sum(dd.astype(jnp.float32) * oo.astype(jnp.float32), axis=-1, keepdims=True)
        ds = (p * (dp - delta)).astype(qq.dtype)
        return jnp.einsum("ts,sh->th", ds, kk), jnp.einsum("ts,th->sh", ds, qq), dv

    return jax.lax.map(one, (q, k, v, o, lse, do))


_heads_attention.defvjp(_heads_attention_fwd, _heads_attention_bwd)
