"""MMDiT port: numerical parity with diffusers SD3Transformer2DModel, export round trip,
full-size parameter counts, and clear errors on bad checkpoints."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dpdmd_jax.models.mmdit import PRESETS, MMDiT, MMDiTConfig
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.loader import abstract_model
from dpdmd_jax.weights.sd3 import load_mmdit, save_mmdit
from tests.torch_helpers import copy_checkpoint, nhwc, rel_err, save_random_sd3, sd3_torch_kwargs

# Three small configs that together cover every branch the acceptance list names.
CONFIGS = {
    # MMDiT-X: dual attention on some (not all) layers, qk RMSNorm, non-square latent,
    # grid (4x6 patches) smaller than pos_embed_max_size (centre crop), context length 7.
    "sd35m_like": dict(
        arch=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                  num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
                  pooled_projection_dim=12, out_channels=4, pos_embed_max_size=12,
                  dual_attention_layers=(0, 1), qk_norm="rms_norm"),
        latent=(8, 12), context_len=7,
    ),
    # SD3-Medium-like: no qk-norm, no dual attention, square grid equal to the table (no crop),
    # the production context length 333.
    "sd3m_like": dict(
        arch=dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8),
        latent=(16, 16), context_len=333,
    ),
    # SD3.5-Large-like: qk-norm without dual attention, odd crop offsets, 16 latent channels.
    "sd35l_like": dict(
        arch=dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
                  pooled_projection_dim=8, out_channels=16, pos_embed_max_size=9, qk_norm="rms_norm"),
        latent=(10, 6), context_len=5,
    ),
}


def _inputs(case, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    arch = case["arch"]
    h, w = case["latent"]
    return dict(
        latents=rng.standard_normal((batch, h, w, arch["in_channels"]), np.float32),
        timesteps=np.array([999.0, 500.5, 3.25][:batch], np.float32),  # different per sample
        context=rng.standard_normal((batch, case["context_len"], arch["joint_attention_dim"]), np.float32),
        pooled=rng.standard_normal((batch, arch["pooled_projection_dim"]), np.float32),
    )


def _torch_forward(ref, x):
    with torch.no_grad():
        return nhwc(ref(**sd3_torch_kwargs(x))[0])


def _ours(model, x):
    return np.asarray(jax.jit(lambda m, a, b, c, d: m(a, b, c, d))(
        model, x["latents"], x["timesteps"], x["context"], x["pooled"]
    ))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    case = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = save_random_sd3(folder, **case["arch"])
    x = _inputs(case)
    return request.param, case, folder, x, _torch_forward(ref, x)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_fp32_parity(reference, scan):
    name, case, folder, x, expected = reference
    model = load_mmdit(folder, scan_layers=scan, progress=False)
    ours = _ours(model, x)
    err = rel_err(ours, expected)
    print(f"{name} scan={scan}: rel err {err:.2e}, max abs {np.abs(ours - expected).max():.2e}")
    assert ours.shape == expected.shape
    assert err <= 1e-5


def test_bf16_close_and_finite(reference):
    name, case, folder, x, expected = reference
    model = load_mmdit(folder, dtype="bfloat16", progress=False)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    ours = _ours(model, x).astype(np.float32)
    assert np.isfinite(ours).all()
    assert rel_err(ours, expected) <= 3e-2


def test_export_roundtrip_loads_in_diffusers(reference, tmp_path):
    from diffusers import SD3Transformer2DModel

    name, case, folder, x, expected = reference
    model = load_mmdit(folder, scan_layers=True, progress=False)  # stacked layers unstack on export
    out = save_mmdit(model, tmp_path / "export")
    reloaded = SD3Transformer2DModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(_torch_forward(reloaded, x), expected)
    with pytest.raises(FileExistsError):
        save_mmdit(model, out)


def test_random_init_matches_diffusers_position_table():
    """Our own init builds the same sin-cos table diffusers stores, so a freshly initialised toy
    teacher is a faithful SD3 instance too."""
    from diffusers import SD3Transformer2DModel

    arch = CONFIGS["sd35m_like"]["arch"]
    ref = SD3Transformer2DModel(**arch)
    ours = MMDiT(MMDiTConfig(**arch), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours.pos_embed.pos_embed[...], ref.pos_embed.pos_embed.numpy(), atol=1e-6)


def _full_grid_table(dim: int, grid: int, base: int) -> np.ndarray:
    """The table computed the direct way: float64 sin/cos over every (h, w) position."""
    coords = np.arange(grid, dtype=np.float64) / (grid / base)
    w, h = np.meshgrid(coords, coords, indexing="xy")

    def one_d(pos, d):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(w, dim // 2), one_d(h, dim // 2)], axis=1).astype(np.float32)


@pytest.mark.parametrize("dim,grid,base", [(24, 7, 3), (64, 12, 12), (256, 40, 16)])
def test_position_table_from_1d_embedding(dim, grid, base):
    """Assembling the table from the 1-D embedding (traceable, free under eval_shape) is bitwise the
    direct float64 computation, and within fp32 rounding of diffusers' (fp32 torch) table."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from dpdmd_jax.models.mmdit import sincos_pos_embed

    ours = np.asarray(sincos_pos_embed(dim, grid, base))
    np.testing.assert_array_equal(ours, _full_grid_table(dim, grid, base))
    ref = get_2d_sincos_pos_embed(dim, grid, base_size=base, output_type="np")
    np.testing.assert_allclose(ours, np.asarray(ref, np.float32), atol=2e-6)


@pytest.mark.parametrize(
    "preset,count",
    [("sd3-medium", 2_028_328_000), ("sd3.5-medium", 2_243_171_520), ("sd3.5-large", 8_056_627_520)],
)
def test_full_size_param_counts(preset, count):
    cfg = MMDiTConfig(**PRESETS[preset])
    abstract = abstract_model(lambda rngs: MMDiT(cfg, rngs=rngs))  # shapes only, nothing allocated
    params = nnx.state(abstract, nnx.Param)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    assert sum(int(np.prod(v.shape)) for v in leaves) == count
    buffer = nnx.state(abstract).pos_embed.pos_embed.get_value()
    assert int(np.prod(buffer.shape)) == cfg.pos_embed_max_size**2 * cfg.inner_dim


# ---------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    save_random_sd3(folder, **CONFIGS["sd3m_like"]["arch"])
    return folder


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
    return copy_checkpoint(src, dst, "diffusion_pytorch_model.safetensors", edit_tensors, edit_config)


def test_missing_key_is_named(small_ckpt, tmp_path):
    bad = _copy_with(small_ckpt, tmp_path / "m", edit_tensors=lambda t: t.pop("transformer_blocks.1.attn.to_k.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: transformer_blocks\.1\.attn\.to_k\.weight"):
        load_mmdit(bad, progress=False)


def test_wrong_shape_is_named(small_ckpt, tmp_path):
    def edit(t):
        t["proj_out.weight"] = torch.zeros(5, 16)

    bad = _copy_with(small_ckpt, tmp_path / "s", edit_tensors=edit)
    with pytest.raises(CheckpointError, match=r"shape mismatches: proj_out\.weight \(checkpoint \[5, 16\]"):
        load_mmdit(bad, progress=False)


def test_wrong_config_is_named(small_ckpt, tmp_path):
    bad = _copy_with(small_ckpt, tmp_path / "c", edit_config=lambda c: c.update(num_layers=2))
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*transformer_blocks\.2\.attn"):
        load_mmdit(bad, progress=False)
    with pytest.raises(CheckpointError, match="num_layers: expected 3, checkpoint has 2"):
        load_mmdit(bad, expected=MMDiTConfig(**CONFIGS["sd3m_like"]["arch"]), progress=False)


def test_truncated_and_missing_files(small_ckpt, tmp_path):
    bad = _copy_with(small_ckpt, tmp_path / "t")
    weights = os.path.join(bad, "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_mmdit(bad, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_mmdit(tmp_path / "nowhere", progress=False)
