"""Attention variants equal `jax.nn.dot_product_attention`, forward and gradients: the CPU per-head
path and the padded, masked call the cuDNN path makes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpdmd_jax.models import layers
from tests.helpers import rel_err


def _qkv(dtype, b=2, t=37, s=53, n=3, h=16):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(key, (b, L, n, h), dtype) * 2 for key, L in ((kq, t), (kk, s), (kv, s)))


def _sq_loss(fn):
    return lambda q, k, v: jnp.sum(jnp.square(fn(q, k, v).astype(jnp.float32)) * jnp.arange(16.0))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_per_head_matches_xla(dtype, tol):
    q, k, v = _qkv(dtype)
    ref = jax.nn.dot_product_attention(q, k, v)
    ours = jax.jit(layers.attention_per_head)(q, k, v)
    assert ours.dtype == dtype
    assert rel_err(ours.astype(jnp.float32), ref.astype(jnp.float32)) < tol
    g_ref = jax.grad(_sq_loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    g_ours = jax.jit(jax.grad(_sq_loss(layers.attention_per_head), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(g_ours, g_ref):
        assert rel_err(a.astype(jnp.float32), r.astype(jnp.float32)) < 5 * tol


def test_dispatch_by_logits_size(monkeypatch):
    """Large logits on CPU take the per-head path (same numbers); small ones stay on XLA's."""
    calls = []
    real = layers.attention_per_head
    monkeypatch.setattr(layers, "attention_per_head", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv(jnp.float32)
    logits_bytes = 4 * 2 * 3 * 37 * 53
    monkeypatch.setattr(layers, "CPU_PER_HEAD_MIN_LOGITS_BYTES", logits_bytes)
    small = layers.attention(q, k, v)
    assert calls == []
    monkeypatch.setattr(layers, "CPU_PER_HEAD_MIN_LOGITS_BYTES", logits_bytes - 1)
    large = layers.attention(q, k, v)
    assert calls == [1]
    np.testing.assert_allclose(np.asarray(large), np.asarray(small), rtol=1e-5, atol=1e-5)

    # A program traced for another platform's devices (the planner compiling for a TPU topology on this
    # CPU host: `split_rows` names its mesh) takes that platform's path: XLA's attention, not the per-head
    # CPU loop (whose einsums have no batch dimension, so a dots_no_batch remat would save every [T, S] block).
    tpu = type("Device", (), {"platform": "tpu"})()
    mesh = type("Mesh", (), {"devices": np.array([tpu]), "axis_names": ("data",)})()
    with layers.split_rows(mesh, ("data",)):
        assert layers.compute_platform() == "tpu"
        np.testing.assert_array_equal(np.asarray(layers.attention(q, k, v)), np.asarray(small))
    assert calls == [1] and layers.compute_platform() == "cpu"


def test_padded_masked_attention_is_exact():
    """The cuDNN path pads T, S to a multiple of 64 and masks the padding; checked here with XLA's
    implementation of the same masked call (cuDNN itself needs a GPU: benchmarks/gpu_check.py)."""
    q, k, v = _qkv(jnp.float32)
    ref = jax.nn.dot_product_attention(q, k, v)
    ours = jax.jit(lambda *a: layers.attention_padded(*a, multiple=64))(q, k, v)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 2e-6
    g_ref = jax.grad(_sq_loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    g_ours = jax.grad(_sq_loss(lambda *a: layers.attention_padded(*a, multiple=64)), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g_ours, g_ref):
        assert rel_err(a, r) < 1e-5
