"""SDXL UNet port: parity with diffusers UNet2DConditionModel (fp32, bf16, scanned), export round
trip, sharded load, full-size parameter count and sharding plan, config handling, bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dpdmd_jax.models.unet import PRESETS, UNet2DConditionModel, UNetConfig, upsample_nearest
from dpdmd_jax.parallel.mesh import batch_sharding, make_mesh, sharding_plan, sharding_report
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.unet import abstract_unet, load_unet, save_unet
from tests.torch_helpers import copy_checkpoint, nchw, nhwc, rel_err, save_random_unet, unet_torch_forward

_CA_DOWN, _CA_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"

# Small configs that together cover every branch: text_time add-embedding or none, linear or
# 1x1-conv projections, transformer depth 1-3 per block (and the mid block's own depth), 1-4
# heads, per-block and uniform layers_per_block, a time_embedding_dim override, both sinusoid
# layouts, conv shortcuts, square and non-square latents, latent sides that are not multiples of
# the downsampling factor (the up blocks' interpolate path), int and float timesteps that differ
# across the batch.
CONFIGS = {
    # SDXL's layout (plain first block, cross-attention below, deeper transformers lower down),
    # 12x10 latents with two downsamplings: 10 -> 5 -> 3 upsamples 3 -> 5 by interpolation.
    # Batch 8 so the mesh test can split it over fsdp=8.
    "sdxl_like": dict(
        arch=dict(block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=4,
                  down_block_types=("DownBlock2D", _CA_DOWN, _CA_DOWN), up_block_types=(_CA_UP, _CA_UP, "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4), cross_attention_dim=24,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=12 + 6 * 8),
        latent=(12, 10), batch=8, context_len=7, text_embeds=12,
    ),
    # SD 1.x layout: 1x1-conv projections, no added embedding, int timesteps, sin-first sinusoid
    # with freq_shift 1, two resnets per block, square latents; saved as a sharded checkpoint.
    "sd15_like": dict(
        arch=dict(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
                  down_block_types=(_CA_DOWN, "DownBlock2D"), up_block_types=("UpBlock2D", _CA_UP),
                  attention_head_dim=2, cross_attention_dim=16, flip_sin_to_cos=False, freq_shift=1),
        latent=(8, 8), batch=2, context_len=5, int_timesteps=True, max_shard_size="40KB",
    ),
    # Every block cross-attends, per-block layers (1, 2), depth 2 everywhere, time_embedding_dim
    # override, both latent sides odd: 7 -> 4 -> 7 and 9 -> 5 -> 9.
    "odd_latent": dict(
        arch=dict(block_out_channels=(8, 16), layers_per_block=(1, 2), norm_num_groups=2,
                  down_block_types=(_CA_DOWN, _CA_DOWN), up_block_types=(_CA_UP, _CA_UP),
                  transformer_layers_per_block=2, attention_head_dim=(2, 4), cross_attention_dim=12,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=6,
                  projection_class_embeddings_input_dim=10 + 6 * 6, time_embedding_dim=40),
        latent=(7, 9), batch=3, context_len=4, text_embeds=10,
    ),
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _inputs(case, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arch, b = case["arch"], case["batch"]
    if case.get("int_timesteps"):
        t = rng.integers(0, 1000, b).astype(np.int32)
    else:
        t = np.linspace(999.0, 3.25, b).astype(np.float32)
    x = dict(sample=rng.standard_normal((b, *case["latent"], 4), np.float32), timesteps=t,
             context=rng.standard_normal((b, case["context_len"], arch["cross_attention_dim"]), np.float32))
    if arch.get("addition_embed_type") == "text_time":
        x["text_embeds"] = rng.standard_normal((b, case["text_embeds"]), np.float32)
        # Micro-conditioning ids as SDXL uses them (original size, crop top-left, target size).
        x["time_ids"] = np.stack([rng.choice([512.0, 768.0, 1024.0], 6) * [1, 1, 0.05, 0.05, 1, 1]
                                  for _ in range(b)]).astype(np.float32)
    return x


# One traced function for every model: jit caches on the model's graph, shapes and shardings.
_forward = jax.jit(lambda m, x: m(x["sample"], x["timesteps"], x["context"], x.get("text_embeds"), x.get("time_ids")))


def _ours(model, x) -> np.ndarray:
    return np.asarray(_forward(model, x), np.float32)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> the saved reference, its inputs and outputs, and our loaded fp32 model with its
    outputs; each built on first use, once per module (tests take subsets of CONFIGS)."""
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            case = CONFIGS[name]
            folder = tmp_path_factory.mktemp(name)
            ref = save_random_unet(folder, case["arch"], max_shard_size=case.get("max_shard_size"))
            x = _inputs(case)
            model = load_unet(folder, progress=False)
            cache[name] = dict(name=name, case=case, folder=folder, x=x, expected=unet_torch_forward(ref, x),
                               model=model, ours=_ours(model, x))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_parity(references, name):
    r = references(name)
    ours, expected = r["ours"], r["expected"]
    err, max_abs = rel_err(ours, expected), float(np.abs(ours - expected).max())
    print(f"{name} {expected.shape}: rel err {err:.2e}, max abs {max_abs:.2e}")
    assert ours.shape == expected.shape
    assert err <= 1e-5
    if name == "sd15_like":  # the checkpoint really is an indexed set of shards
        assert os.path.exists(os.path.join(r["folder"], WEIGHTS + ".index.json"))


def test_scan_equals_loop_and_exports_to_diffusers(references, tmp_path):
    """Scanned stacks (depths 1, 2, 3 and the mid block's 3) give the unscanned outputs; exported
    (unstacked) they reload in diffusers with outputs identical to the original reference."""
    from diffusers import UNet2DConditionModel as Reference

    r = references("sdxl_like")
    model = load_unet(r["folder"], scan_layers=True, progress=False)
    assert any("block_stack" in path for path, _ in nnx.to_flat_state(nnx.state(model)))
    ours = _ours(model, r["x"])
    np.testing.assert_allclose(ours, r["ours"], rtol=1e-6, atol=1e-6 * np.abs(ours).max())
    out = save_unet(model, tmp_path / "export")
    reloaded = Reference.from_pretrained(out).eval()
    np.testing.assert_array_equal(unet_torch_forward(reloaded, r["x"]), r["expected"])
    with open(os.path.join(out, "config.json")) as f:
        assert UNetConfig.from_diffusers(json.load(f)) == dataclasses.replace(model.cfg, scan_layers=False)
    with pytest.raises(FileExistsError):
        save_unet(model, out)


def test_bf16_finite_and_close(references):
    """bf16 compute and storage at one config (a bf16 compile costs twice an fp32 one on CPU): the
    text_time embedding, linear projections, both resampling paths and cross-attention everywhere."""
    name = "odd_latent"
    r = references(name)
    model = load_unet(r["folder"], dtype="bfloat16", progress=False)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    ours, expected = _ours(model, r["x"]), r["expected"]
    err = rel_err(ours, expected)
    print(f"{name} bf16: rel err {err:.2e}")
    assert np.isfinite(ours).all()
    assert err <= 3e-2


def test_sharded_load_equals_single_device(references):
    """8-way fsdp on the batch-8 config, scanned as training runs it: every conv / linear kernel is
    split, and jitted sharded outputs equal the single-device (unscanned) ones."""
    assert jax.device_count() == 8
    r = references("sdxl_like")
    mesh = make_mesh(fsdp=8)
    model = load_unet(r["folder"], mesh=mesh, scan_layers=True, progress=False)
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if path[-1] == "kernel":  # every (in, out) side here is a multiple of 8 but conv_out's 4 outputs
            assert not value.sharding.is_fully_replicated, path
    report = sharding_report(state)
    print(f"tiny sdxl_like on fsdp=8: {report}")
    x = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in r["x"].items()}
    ours, single = _ours(model, x), r["ours"]
    print(f"sharded vs single: max abs diff {np.abs(ours - single).max():.2e} (max |v| {np.abs(single).max():.2f})")
    np.testing.assert_allclose(ours, single, rtol=1e-6, atol=1e-6 * np.abs(single).max())


# ---------------------------------------------------------------- full size, config, resampling


def test_full_size_param_count_and_sharding_plan():
    cfg = UNetConfig(**PRESETS["sdxl-base"], scan_layers=True)
    abstract = abstract_unet(cfg)  # shapes only, nothing allocated
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    assert sum(int(np.prod(v.shape)) for v in leaves) == 2_567_463_684
    mesh = make_mesh(fsdp=8)
    plan = sharding_plan(nnx.state(abstract), mesh)
    total, per_device, replicated = plan["total_bytes"], plan["per_device_bytes"], plan["replicated_bytes"]
    print(f"SDXL UNet fp32 on fsdp=8: total {total / 2**30:.2f} GiB, per device {per_device / 2**30:.3f} GiB, "
          f"replicated {replicated / 2**20:.2f} MiB ({100 * replicated / total:.3f}%)")
    assert replicated < 1e-3 * total


def test_config_roundtrip_and_defaults():
    from diffusers import UNet2DConditionModel as Reference

    # A config.json without optional fields means diffusers' defaults.
    assert UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel"}) == UNetConfig()
    with torch.device("meta"):
        assert UNetConfig.from_diffusers(dict(Reference().config)) == UNetConfig()
    cfg = UNetConfig(**PRESETS["sdxl-base"])
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    with torch.device("meta"):
        ref = Reference(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    assert UNetConfig.from_diffusers(dict(ref.config)) == cfg
    assert sum(p.numel() for p in ref.parameters()) == 2_567_463_684
    # The released SDXL config.json stores upcast_attention as null.
    assert UNetConfig.from_diffusers({**cfg.to_diffusers(), "upcast_attention": None}) == cfg
    assert UNetConfig.from_diffusers({"upcast_attention": True}).to_diffusers()["upcast_attention"] is True  # SD 2.x
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNetConfig.from_diffusers({"class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="center_input_sample=1"):
        UNetConfig.from_diffusers({"center_input_sample": 1})
    with pytest.raises(ValueError, match="block types"):
        UNetConfig(down_block_types=("AttnDownBlock2D",) * 4)
    with pytest.raises(ValueError, match="do not split into 3 attention heads"):
        UNetConfig(**{**PRESETS["sdxl-base"], "attention_head_dim": (5, 3, 20)})
    with pytest.raises(ValueError, match="needs addition_time_embed_dim"):
        UNetConfig(addition_embed_type="text_time")


def test_upsample_nearest_matches_torch_interpolate():
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 2), np.float32)
    for size in [(6, 10), (5, 9), (7, 11), (4, 5)]:
        ref = nhwc(torch.nn.functional.interpolate(nchw(x), size=size, mode="nearest"))
        np.testing.assert_array_equal(np.asarray(upsample_nearest(jnp.asarray(x), size)), ref)


def test_abstract_model_has_the_random_init_structure():
    """The loader's abstract model (host-counted Rngs) has the structure, shapes and logical axes
    of our own init with plain nnx.Rngs, so a freshly initialised UNet saves and loads like a checkpoint."""
    cfg = UNetConfig(**CONFIGS["sd15_like"]["arch"], scan_layers=True)  # vmapped stacks split the Rngs too
    plain, abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))), abstract_unet(cfg)
    assert nnx.graphdef(plain) == nnx.graphdef(abstract)

    def layout(model):
        return [(p, v.get_value().shape, v.get_value().dtype, v.get_metadata().get("out_sharding"))
                for p, v in nnx.to_flat_state(nnx.state(model))]

    assert layout(plain) == layout(abstract)


# ---------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    save_random_unet(folder, CONFIGS["sdxl_like"]["arch"])
    return folder


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
    return copy_checkpoint(src, dst, WEIGHTS, edit_tensors, edit_config)


def test_missing_key_is_named(small_ckpt, tmp_path):
    key = "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k.weight"
    bad = _copy_with(small_ckpt, tmp_path / "m", edit_tensors=lambda t: t.pop(key))
    for scan in (False, True):  # the scanned stack names the missing layer too
        with pytest.raises(CheckpointError, match=f"missing keys: {re.escape(key)}"):
            load_unet(bad, scan_layers=scan, progress=False)


def test_wrong_shape_is_named(small_ckpt, tmp_path):
    def edit(t):
        t["conv_in.weight"] = torch.zeros(8, 3, 3, 3)

    bad = _copy_with(small_ckpt, tmp_path / "s", edit_tensors=edit)
    expected = r"shape mismatches: conv_in\.weight \(checkpoint \[8, 3, 3, 3\], model expects \[8, 4, 3, 3\]"
    with pytest.raises(CheckpointError, match=expected):
        load_unet(bad, progress=False)


def test_wrong_config_is_named(small_ckpt, tmp_path):
    bad = _copy_with(small_ckpt, tmp_path / "c", edit_config=lambda c: c.update(_class_name="AutoencoderKL"))
    with pytest.raises(CheckpointError, match="describes a AutoencoderKL, not a diffusers UNet2DConditionModel"):
        load_unet(bad, progress=False)
    bad = _copy_with(small_ckpt, tmp_path / "v", edit_config=lambda c: c.update(resnet_time_scale_shift="scale_shift"))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported UNet2DConditionModel config: "
                                              r"resnet_time_scale_shift='scale_shift'"):
        load_unet(bad, progress=False)
    bad = _copy_with(small_ckpt, tmp_path / "d", edit_config=lambda c: c.update(transformer_layers_per_block=[1, 2, 2]))
    with pytest.raises(CheckpointError, match=r"unexpected keys: down_blocks\.2\.attentions\.0\.transformer_blocks\.2"):
        load_unet(bad, progress=False)


def test_pipeline_root_resolves_to_unet(small_ckpt, tmp_path):
    _copy_with(small_ckpt, tmp_path / "pipe" / "unet")
    assert isinstance(load_unet(tmp_path / "pipe", progress=False), UNet2DConditionModel)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_unet(tmp_path / "nowhere", progress=False)
