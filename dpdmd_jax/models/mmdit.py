"""SD3 / SD3.5 MMDiT (diffusers `SD3Transformer2DModel`) as a Flax NNX module.

One module family covers SD3-Medium, SD3.5-Medium (MMDiT-X: dual attention in the first
layers, qk RMSNorm) and SD3.5-Large. Attribute names follow diffusers so the key map in
`dpdmd_jax.weights.sd3` stays a readable one-to-one table.

Call convention: latents NHWC, timesteps in the model's native units (`1000 * sigma`, float),
context [B, L, joint_attention_dim], pooled [B, pooled_projection_dim]; returns the velocity
NHWC.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpdmd_jax.models.layers import (
    MLPEmbedder,
    RMSNorm,
    attention,
    default_kernel_init,
    dense,
    gelu_tanh,
    layer_norm,
    modulate,
    partitioned,
    shard_rows,
    timestep_embedding,
)

# Fields of diffusers' config.json for SD3Transformer2DModel.
_DIFFUSERS_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("xla", "cudnn")
_EPS = 1e-6  # every SD3 LayerNorm / RMSNorm


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Architecture (diffusers names and defaults) plus how we run it (dtypes, scan, remat)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    # Execution knobs (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False  # nnx.scan over runs of identical blocks: fast compiles for deep models
    remat_policy: str = "none"  # one of REMAT_POLICIES
    attention_impl: str = "xla"  # "cudnn" selects cuDNN flash attention on NVIDIA GPUs

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        problems = []
        if self.caption_projection_dim != self.inner_dim:
            problems.append(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads * "
                f"attention_head_dim ({self.inner_dim}): joint attention concatenates both streams"
            )
        if self.qk_norm not in (None, "rms_norm"):
            problems.append(f"qk_norm={self.qk_norm!r} is not supported (use None or 'rms_norm')")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            problems.append(f"dual_attention_layers {bad} outside 0..{self.num_layers - 1}")
        if self.num_layers - 1 in self.dual_attention_layers:
            problems.append("the last (context_pre_only) layer cannot use dual attention")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        if problems:
            raise ValueError("Invalid MMDiT config: " + "; ".join(problems) + ".")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def layer_kind(self, i: int) -> tuple[bool, bool]:
        """(use_dual_attention, context_pre_only) of layer i: blocks of one kind share a structure."""
        return (i in self.dual_attention_layers, i == self.num_layers - 1)

    def layer_groups(self) -> list[tuple[int, int]]:
        """Runs [start, stop) of consecutive layers with identical structure (the scan units)."""
        groups, start = [], 0
        for i in range(1, self.num_layers + 1):
            if i == self.num_layers or self.layer_kind(i) != self.layer_kind(start):
                groups.append((start, i))
                start = i
        return groups

    @classmethod
    def from_diffusers(cls, config: dict[str, Any] | str | os.PathLike, **overrides: Any) -> "MMDiTConfig":
        """Builds the config from a diffusers `config.json` (dict, file, or transformer folder)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        kwargs = {k: config[k] for k in _DIFFUSERS_FIELDS if k in config}
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = config.get("in_channels", cls.in_channels)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config.json fields for this architecture."""
        d = {k: getattr(self, k) for k in _DIFFUSERS_FIELDS}
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": "SD3Transformer2DModel", **d}


# Full-size presets (diffusers config.json of the released checkpoints).
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
)
SD35_MEDIUM = dict(SD3_MEDIUM, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(
    SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"
)
PRESETS = {"sd3-medium": SD3_MEDIUM, "sd3.5-medium": SD35_MEDIUM, "sd3.5-large": SD35_LARGE}


class Buffer(nnx.Variable):
    """A stored, non-trainable array (diffusers' persistent buffer, e.g. the position table)."""


def sincos_pos_embed(embed_dim: int, grid_size: int, base_size: int) -> jax.Array:
    """diffusers `get_2d_sincos_pos_embed` (the table SD3 checkpoints store), [grid^2, D] float32.

    Computed in float64 and rounded once (diffusers now computes in fp32: equal within rounding).
    The float64 work is done on the [grid, D/2] 1-D embedding only and the [grid^2, D] table is
    assembled with jnp broadcasts, bitwise the same as the full float64 grid: under `nnx.eval_shape` (the loader's
    abstract model) that is traced, not computed; a full float64 numpy table would be built on the host
    only to be overwritten (its cost: docs/benchmarks/load-full-size.md).
    """
    coords = np.arange(grid_size, dtype=np.float64) / (grid_size / base_size)
    dim = embed_dim // 2
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(coords, omega)
    emb = jnp.asarray(np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32))  # [grid, D/2]
    # Rows run over (h, w). diffusers names the first half "h" but feeds it the w coordinates; we keep its order.
    w_half = jnp.broadcast_to(emb[None, :, :], (grid_size, grid_size, dim))
    h_half = jnp.broadcast_to(emb[:, None, :], (grid_size, grid_size, dim))
    return jnp.concatenate([w_half, h_half], axis=-1).reshape(grid_size * grid_size, embed_dim)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> tokens, plus the centre-cropped stored position table."""

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.inner_dim
        self.patch_size = p
        self.max_size = cfg.pos_embed_max_size
        self.dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        # Conv kernel in (kh, kw, in, out) layout; applied as a matmul over flattened patches.
        init = partitioned(default_kernel_init, (None, None, None, "embed"))
        self.proj_kernel = nnx.Param(init(rngs.params(), (p, p, c, d), param_dtype))
        self.proj_bias = nnx.Param(jnp.zeros((d,), param_dtype), out_sharding=("embed",), eager_sharding=False)
        table = sincos_pos_embed(d, self.max_size, cfg.sample_size // p)
        self.pos_embed = Buffer(
            jnp.asarray(table, param_dtype)[None], out_sharding=(None, None, "embed"), eager_sharding=False
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"latent grid {h}x{w} patches exceeds pos_embed_max_size={self.max_size}"
            )
        patches = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)
        kernel = self.proj_kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        tokens = patches.astype(self.dtype) @ kernel + self.proj_bias[...].astype(self.dtype)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed[...].reshape(self.max_size, self.max_size, -1)
        pos = table[top : top + h, left : left + w].reshape(1, h * w, -1)
        return (tokens + pos.astype(self.dtype)).astype(self.dtype)


class AdaLNModulation(nnx.Module):
    """`linear(silu(temb))` split into `n` [B, D] chunks (the adaLN shift/scale/gate vectors)."""

    def __init__(self, dim: int, n: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.n = n
        # Output axis not tensor-sharded: slicing chunks out of a "tensor"-split vector was
        # mis-partitioned by XLA (jax 0.10.2, CPU, data x fsdp x tensor mesh: wrong numbers in
        # tests/test_sharding.py). The weight is still split over "fsdp" on its input axis.
        self.linear = dense(dim, n * dim, ("embed", None), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        return jnp.split(self.linear(jax.nn.silu(temb)), self.n, axis=-1)


class FeedForward(nnx.Module):
    """Linear(D, 4D) -> tanh-GELU -> Linear(4D, D) (diffusers `FeedForward`, gelu-approximate)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj_in = dense(dim, 4 * dim, ("embed", "mlp"), **kw)
        self.proj_out = dense(4 * dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(gelu_tanh(self.proj_in(x)))


class Attention(nnx.Module):
    """Self-attention, or SD3 joint attention over [image tokens, context tokens] when `joint`."""

    def __init__(self, cfg: MMDiTConfig, *, joint: bool, context_pre_only: bool, rngs: nnx.Rngs):
        d, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.heads, self.head_dim, self.impl = heads, hd, cfg.attention_impl
        self.joint, self.context_pre_only = joint, context_pre_only
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.to_q, self.to_k, self.to_v = (dense(d, d, ("embed", "heads"), **kw) for _ in range(3))
        self.to_out = dense(d, d, ("heads", "embed"), **kw)
        qk = cfg.qk_norm is not None
        norm_kw = dict(eps=_EPS, param_dtype=kw["param_dtype"])
        self.norm_q = RMSNorm(hd, **norm_kw) if qk else None
        self.norm_k = RMSNorm(hd, **norm_kw) if qk else None
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                dense(d, d, ("embed", "heads"), **kw) for _ in range(3)
            )
            self.norm_added_q = RMSNorm(hd, **norm_kw) if qk else None
            self.norm_added_k = RMSNorm(hd, **norm_kw) if qk else None
            self.to_add_out = None if context_pre_only else dense(d, d, ("heads", "embed"), **kw)

    def _heads(self, x: jax.Array, proj: nnx.Linear, norm: RMSNorm | None) -> jax.Array:
        y = proj(x).reshape(x.shape[0], x.shape[1], self.heads, self.head_dim)
        return norm(y) if norm is not None else y

    def __call__(self, x: jax.Array, c: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        q = self._heads(x, self.to_q, self.norm_q)
        k = self._heads(x, self.to_k, self.norm_k)
        v = self._heads(x, self.to_v, None)
        n_img = x.shape[1]
        if self.joint:
            ck = self._heads(c, self.add_k_proj, self.norm_added_k)
            cv = self._heads(c, self.add_v_proj, None)
            k, v = jnp.concatenate([k, ck], axis=1), jnp.concatenate([v, cv], axis=1)
            # The last block's context output is discarded, so its context queries are skipped
            # (the outputs of the image tokens do not depend on them).
            if not self.context_pre_only:
                q = jnp.concatenate([q, self._heads(c, self.add_q_proj, self.norm_added_q)], axis=1)
        out = attention(q, k, v, implementation=self.impl)
        out = out.reshape(out.shape[0], out.shape[1], -1)
        x_out = self.to_out(out[:, :n_img])
        c_out = self.to_add_out(out[:, n_img:]) if self.joint and not self.context_pre_only else None
        return x_out, c_out


class JointTransformerBlock(nnx.Module):
    """diffusers `JointTransformerBlock` (MMDiT, and MMDiT-X when `use_dual_attention`)."""

    def __init__(self, cfg: MMDiTConfig, *, use_dual_attention: bool, context_pre_only: bool, rngs: nnx.Rngs):
        d = cfg.inner_dim
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.use_dual_attention, self.context_pre_only = use_dual_attention, context_pre_only
        # AdaLayerNormZero chunks: (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp)
        # [+ (shift2, scale2, gate2) for MMDiT-X]; AdaLayerNormContinuous: (scale, shift).
        self.norm1 = AdaLNModulation(d, 9 if use_dual_attention else 6, **kw)
        self.norm1_context = AdaLNModulation(d, 2 if context_pre_only else 6, **kw)
        self.attn = Attention(cfg, joint=True, context_pre_only=context_pre_only, rngs=rngs)
        self.attn2 = Attention(cfg, joint=False, context_pre_only=False, rngs=rngs) if use_dual_attention else None
        self.ff = FeedForward(d, **kw)
        self.ff_context = None if context_pre_only else FeedForward(d, **kw)

    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, c = shard_rows(x), shard_rows(c)
        mod = self.norm1(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x_norm = layer_norm(x, _EPS)
        c_mod = self.norm1_context(temb)
        if self.context_pre_only:
            c_scale, c_shift = c_mod
            c_in = modulate(layer_norm(c, _EPS), c_shift, c_scale)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
            c_in = modulate(layer_norm(c, _EPS), c_shift, c_scale)

        attn_x, attn_c = self.attn(modulate(x_norm, shift, scale), c_in)
        x = x + gate[:, None] * attn_x
        if self.use_dual_attention:
            shift2, scale2, gate2 = mod[6:]
            attn2_x, _ = self.attn2(modulate(x_norm, shift2, scale2))
            x = x + gate2[:, None] * attn2_x
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x, _EPS), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return shard_rows(x), c  # the context stream ends here; `c` passes through unused
        c = c + c_gate[:, None] * attn_c
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(c, _EPS), c_shift_mlp, c_scale_mlp))
        return shard_rows(x), shard_rows(c)


def _maybe_remat(fn, policy_name: str):
    if policy_name == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=False)


class BlockStack(nnx.Module):
    """`n` identical blocks with parameters stacked on a leading "layers" axis, run by nnx.scan.

    One traced block instead of n keeps compile time flat in depth.
    """

    def __init__(
        self, cfg: MMDiTConfig, n: int, *, use_dual_attention: bool, context_pre_only: bool, rngs: nnx.Rngs
    ):
        self.remat_policy = cfg.remat_policy

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs: nnx.Rngs) -> JointTransformerBlock:
            return JointTransformerBlock(
                cfg, use_dual_attention=use_dual_attention, context_pre_only=context_pre_only, rngs=rngs
            )

        self.layers = create(rngs)

    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array,
                 n: int | None = None) -> tuple[jax.Array, jax.Array]:
        """The blocks in order; `n` runs only the first n of them (the GAN's features stop inside a stack)."""
        def body(block: JointTransformerBlock, carry, temb):
            return block(carry[0], carry[1], temb)

        body = _maybe_remat(body, self.remat_policy)

        @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, carry, temb):
            return body(block, carry, temb)

        layers = self.layers
        if n is not None and n < self.depth():
            graphdef, state = nnx.split(layers)  # the first n slices of every stacked parameter, as a stack
            layers = nnx.merge(graphdef, jax.tree.map(lambda v: v[:n], state))
        return run(layers, (x, c), temb)

    def depth(self) -> int:
        """How many blocks the stack holds (its parameters' leading "layers" axis)."""
        return jax.tree.leaves(nnx.state(self.layers))[0].shape[0]


class MMDiT(nnx.Module):
    """SD3/SD3.5 transformer: `(latents NHWC, 1000*sigma, context, pooled) -> velocity NHWC`."""

    def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.inner_dim
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.pos_embed = PatchEmbed(cfg, rngs=rngs)
        self.timestep_embedder = MLPEmbedder(256, d, **kw)
        self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, d, **kw)
        self.context_embedder = dense(cfg.joint_attention_dim, cfg.caption_projection_dim, (None, "embed"), **kw)
        if cfg.scan_layers:
            self.transformer_blocks = None
            self.block_stacks = nnx.List(
                BlockStack(cfg, stop - start, **self._kind(start), rngs=rngs) for start, stop in cfg.layer_groups()
            )
        else:
            self.block_stacks = None
            self.transformer_blocks = nnx.List(
                JointTransformerBlock(cfg, **self._kind(i), rngs=rngs) for i in range(cfg.num_layers)
            )
        self.norm_out = AdaLNModulation(d, 2, **kw)
        self.proj_out = dense(d, cfg.patch_size**2 * cfg.out_channels, ("embed", None), **kw)

    def _kind(self, i: int) -> dict[str, bool]:
        dual, pre_only = self.cfg.layer_kind(i)
        return dict(use_dual_attention=dual, context_pre_only=pre_only)

    def _embed(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array,
               pooled: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(image tokens, context tokens, temb): the inputs of the first joint block."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, hh, ww, _ = latents.shape
        if hh % cfg.patch_size or ww % cfg.patch_size:
            raise ValueError(f"latent size {hh}x{ww} is not divisible by patch_size={cfg.patch_size}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        x = shard_rows(self.pos_embed(shard_rows(latents)))
        t_freq = timestep_embedding(timesteps, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.timestep_embedder(t_freq.astype(dtype)) + self.text_embedder(pooled.astype(dtype))
        c = self.context_embedder(context.astype(dtype))
        return x, c, temb

    def _blocks(self, x: jax.Array, c: jax.Array, temb: jax.Array, stop: int) -> tuple[jax.Array, jax.Array]:
        """Joint blocks 0..stop-1 (scanned in their stacks, or one by one), rematerialised per the config."""
        cfg = self.cfg
        if cfg.scan_layers:
            for (start, end), stack in zip(cfg.layer_groups(), self.block_stacks):
                if start >= stop:
                    break
                x, c = stack(x, c, temb, n=None if end <= stop else stop - start)
        else:
            block_fn = _maybe_remat(lambda blk, x, c, t: blk(x, c, t), cfg.remat_policy)
            for block in self.transformer_blocks[:stop]:
                x, c = block_fn(block, x, c, temb)
        return x, c

    def features(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array, pooled: jax.Array,
                 block: int = -1) -> jax.Array:
        """The image tokens after joint block `block` (negative: from the last) on the patch grid,
        [B, H / p, W / p, inner_dim], in the compute dtype; the forward stops there (the GAN's
        classifier head reads them: `models.gan_head`)."""
        n = self.cfg.num_layers
        if not -n <= block < n:
            raise ValueError(f"block={block} is not a joint block of this {n}-layer MMDiT (use -{n}..{n - 1})")
        x, c, temb = self._embed(latents, timesteps, context, pooled)
        x, _ = self._blocks(x, c, temb, stop=block % n + 1)
        b, hh, ww, _ = latents.shape
        p = self.cfg.patch_size
        return shard_rows(x.reshape(b, hh // p, ww // p, x.shape[-1]))

    def __call__(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array, pooled: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, hh, ww, _ = latents.shape
        x, c, temb = self._embed(latents, timesteps, context, pooled)
        x, c = self._blocks(x, c, temb, stop=cfg.num_layers)

        scale, shift = self.norm_out(temb)
        x = self.proj_out(modulate(layer_norm(x, _EPS), shift, scale))
        p, co = cfg.patch_size, cfg.out_channels
        h, w = hh // p, ww // p
        return shard_rows(x.reshape(b, h, w, p, p, co).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, co))
