"""A tiny convolutional denoiser: the network of the two test backbones (`backbones/tiny.py`).

Small enough to compile in seconds, with every parameter tagged with logical axes so it shards
like the real backbones. It predicts whatever its schedule asks for (v or eps); the conditioning
arrives as one vector per sample, built by the backbone from its own conditioning pytree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dpdmd_jax.models.layers import dense, partitioned, timestep_embedding


class TinyDenoiser(nnx.Module):
    def __init__(self, channels: int, cond_dim: int, width: int = 16, *, rngs: nnx.Rngs):
        conv = lambda i, o: nnx.Conv(
            i, o, (3, 3), padding="SAME", rngs=rngs,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
        )
        self.width = width
        self.conv_in = conv(channels, width)
        self.time_proj = dense(width, width, (None, "embed"), rngs=rngs)
        self.cond_proj = dense(cond_dim, width, (None, "embed"), rngs=rngs)
        self.conv_mid = conv(width, width)
        self.conv_out = nnx.Conv(width, channels, (3, 3), padding="SAME", rngs=rngs,
                                 kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, None, "embed", None)))

    def hidden(self, z: jax.Array, timesteps: jax.Array, cond_vec: jax.Array) -> jax.Array:
        """The hidden features before `conv_out`, [B, H, W, width] (what the GAN's head reads)."""
        emb = self.time_proj(timestep_embedding(timesteps, self.width)) + self.cond_proj(cond_vec)
        h = jax.nn.silu(self.conv_in(z) + jax.nn.silu(emb)[:, None, None, :])
        return h + jax.nn.silu(self.conv_mid(h))

    def __call__(self, z: jax.Array, timesteps: jax.Array, cond_vec: jax.Array) -> jax.Array:
        return self.conv_out(self.hidden(z, timesteps, cond_vec)).astype(jnp.float32)
