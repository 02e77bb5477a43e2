"""AutoencoderKL port: parity with diffusers (encode moments, decode), bf16, sharded load,
export round trip, full-size parameter counts, latent scale/shift, and bad checkpoints."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dpdmd_jax.models.vae import PRESETS, AutoencoderKL, VAEConfig, from_model_latent, sample_latent, to_model_latent
from dpdmd_jax.parallel.mesh import batch_sharding, make_mesh, sharding_plan, sharding_report
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.vae import abstract_vae, load_vae, save_vae
from tests.torch_helpers import copy_checkpoint, nchw, nhwc, rel_err

_DOWN, _UP = "DownEncoderBlock2D", "UpDecoderBlock2D"

# Small configs that together cover every branch: quant convs on / off / mixed, mid-block
# attention on / off, 4 and 16 latent channels, conv_shortcut in both directions (widening in
# the encoder, narrowing in the decoder), 0-2 down/up samplers, non-square images.
CONFIGS = {
    # SDXL-like: quant + post-quant convs, 3 blocks (two downsamplers: 24x40 -> 6x10 latents),
    # batch 8 so the mesh test can split it over fsdp=8. Two logvar channels are shifted onto
    # the [-30, 20] clamp bounds so the clamp is exercised.
    "sdxl_like": dict(
        arch=dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  scaling_factor=0.13025),
        image=(24, 40), batch=8, boost_logvar=True,
    ),
    # SD3-like: 16 latent channels, no quant convs, shift factor, 2 resnets per encoder block.
    "sd3_like": dict(
        arch=dict(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=2, latent_channels=16,
                  scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        image=(24, 40), batch=2,
    ),
    # No mid-block attention, quant_conv without post_quant_conv, one block (no resampling),
    # non-RGB channel counts.
    "no_attention": dict(
        arch=dict(in_channels=4, out_channels=2, block_out_channels=(16,), layers_per_block=1, norm_num_groups=8,
                  latent_channels=4, use_post_quant_conv=False, mid_block_add_attention=False),
        image=(12, 20), batch=2,
    ),
}


def _diffusers_kwargs(arch: dict) -> dict:
    n = len(arch["block_out_channels"])
    return dict(arch, down_block_types=(_DOWN,) * n, up_block_types=(_UP,) * n)


def _save_random_vae(folder, arch: dict, seed: int = 0, boost_logvar: bool = False):
    """A small random diffusers AutoencoderKL with every parameter perturbed (so zero / one
    initialisations are exercised), saved with save_pretrained; returned in eval mode."""
    from diffusers import AutoencoderKL as Reference

    torch.manual_seed(seed)
    ref = Reference(**_diffusers_kwargs(arch)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if boost_logvar:  # centre two logvar channels on the clamp bounds: about half clipped
            ref.quant_conv.bias[arch["latent_channels"]] += 20.0
            ref.quant_conv.bias[arch["latent_channels"] + 1] -= 30.0
    ref.save_pretrained(folder, safe_serialization=True)
    return ref


def _torch_outputs(ref, x: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        return dict(mean=nhwc(dist.mean), logvar=nhwc(dist.logvar), decoded=nhwc(ref.decode(nchw(z)).sample))


# One traced function per (config, dtype, sharding): jit caches on the model's graph and shapes.
_encode = jax.jit(lambda m, x: m.encode(x))
_decode = jax.jit(lambda m, z: m.decode(z))


def _ours(model, x, z) -> dict[str, np.ndarray]:
    mean, logvar = _encode(model, x)
    decoded = _decode(model, z)
    return {k: np.asarray(v, np.float32) for k, v in dict(mean=mean, logvar=logvar, decoded=decoded).items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    case = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = _save_random_vae(folder, case["arch"], boost_logvar=case.get("boost_logvar", False))
    rng = np.random.default_rng(0)
    (h, w), b, arch = case["image"], case["batch"], case["arch"]
    factor = 2 ** (len(arch["block_out_channels"]) - 1)
    x = rng.uniform(-1, 1, (b, h, w, arch.get("in_channels", 3))).astype(np.float32)
    z = rng.standard_normal((b, h // factor, w // factor, arch["latent_channels"])).astype(np.float32)
    model = load_vae(folder, progress=False)
    return dict(name=request.param, case=case, folder=folder, ref=ref, x=x, z=z,
                expected=_torch_outputs(ref, x, z), model=model, ours=_ours(model, x, z))


def test_fp32_parity(reference):
    expected, ours = reference["expected"], reference["ours"]
    for k in ("mean", "logvar", "decoded"):
        err, max_abs = rel_err(ours[k], expected[k]), float(np.abs(ours[k] - expected[k]).max())
        print(f"{reference['name']} {k} {expected[k].shape}: rel err {err:.2e}, max abs {max_abs:.2e}")
        assert ours[k].shape == expected[k].shape
        assert err <= 1e-5, k
    if reference["case"].get("boost_logvar"):  # the clamp really acted, at both ends
        assert expected["logvar"].max() == 20.0 and expected["logvar"].min() == -30.0


def test_bf16_finite_and_close(reference):
    model = load_vae(reference["folder"], dtype="bfloat16", progress=False)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    ours, expected = _ours(model, reference["x"], reference["z"]), reference["expected"]
    for k in ("mean", "logvar", "decoded"):
        assert np.isfinite(ours[k]).all(), k
        err = rel_err(ours[k], expected[k])
        print(f"{reference['name']} bf16 {k}: rel err {err:.2e}")
        assert err <= 3e-2, k


def test_export_roundtrip_loads_in_diffusers(reference, tmp_path):
    from diffusers import AutoencoderKL as Reference

    model = reference["model"]
    out = save_vae(model, tmp_path / "export")
    reloaded = Reference.from_pretrained(out).eval()
    got = _torch_outputs(reloaded, reference["x"], reference["z"])
    for k, v in reference["expected"].items():
        np.testing.assert_array_equal(got[k], v)
    assert VAEConfig.from_diffusers(json.load(open(os.path.join(out, "config.json")))) == model.cfg
    with pytest.raises(FileExistsError):
        save_vae(model, out)


@pytest.mark.parametrize("reference", [n for n in sorted(CONFIGS) if CONFIGS[n]["arch"].get("mid_block_add_attention",
                                                                                          True)], indirect=True)
def test_legacy_attention_names_load_like_diffusers(reference, tmp_path):
    """Pre-rename folders (mid-block query/key/value/proj_attn) load to the same model as the
    current names, and diffusers reads them the same way."""
    from diffusers import AutoencoderKL as Reference

    names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def legacy(tensors):
        for k in [k for k in tensors if ".attentions.0." in k]:
            new = k
            for a, b in names.items():
                new = new.replace(a, b)
            tensors[new] = tensors.pop(k)
        assert "decoder.mid_block.attentions.0.proj_attn.weight" in tensors

    folder = _copy_with(reference["folder"], tmp_path / "legacy", edit_tensors=legacy)
    ours = _ours(load_vae(folder, progress=False), reference["x"], reference["z"])
    theirs = _torch_outputs(Reference.from_pretrained(folder).eval(), reference["x"], reference["z"])
    for k, v in reference["ours"].items():
        np.testing.assert_array_equal(ours[k], v)
        np.testing.assert_array_equal(theirs[k], reference["expected"][k])


@pytest.mark.parametrize("reference", ["sdxl_like"], indirect=True)  # one mesh check: the batch-8 config
def test_sharded_load_equals_single_device(reference):
    """8-way fsdp: every conv / linear kernel is split, and jitted sharded outputs equal the
    single-device ones."""
    assert jax.device_count() == 8
    mesh = make_mesh(fsdp=8)
    model = load_vae(reference["folder"], mesh=mesh, progress=False)
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if path[-1] == "kernel" and max(value.shape[-2:]) >= 8:  # the post_quant 4x4 1x1 conv stays whole
            assert not value.sharding.is_fully_replicated, path
    report = sharding_report(state)
    print(f"tiny sdxl_like on fsdp=8: {report}")
    x = jax.device_put(reference["x"], batch_sharding(mesh, 4))
    z = jax.device_put(reference["z"], batch_sharding(mesh, 4))
    ours = _ours(model, x, z)
    for k, v in reference["ours"].items():
        print(f"sharded vs single {k}: max abs diff {np.abs(ours[k] - v).max():.2e} (max |v| {np.abs(v).max():.2f})")
        # fp32 rounding of two programs (the split kernels' partial sums add up in another order):
        # decoded, max |v| 2.45: max abs diff 2.74e-6 under XLA:CPU's fusion emitters (inside the
        # old 1e-6 x max |v| + 1e-6 |x| only through its rtol term), 2.86e-6 under the LLVM emitters
        # the tests compile with (tests/conftest.py).
        np.testing.assert_allclose(ours[k], v, rtol=1e-6, atol=2e-6 * np.abs(v).max(), err_msg=k)


# ---------------------------------------------------------------- full size, config, latents


@pytest.mark.parametrize("preset,count", [("sd3", 83_819_683), ("sdxl", 83_653_863)])
def test_full_size_param_counts_and_sharding_plan(preset, count):
    abstract = abstract_vae(VAEConfig(**PRESETS[preset]))  # shapes only, nothing allocated
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    assert sum(int(np.prod(v.shape)) for v in leaves) == count
    mesh = make_mesh(fsdp=8)
    plan = sharding_plan(nnx.state(abstract), mesh)
    total, per_device, replicated = plan["total_bytes"], plan["per_device_bytes"], plan["replicated_bytes"]
    print(f"{preset} VAE fp32 on fsdp=8: total {total / 2**20:.1f} MiB, per device {per_device / 2**20:.2f} MiB, "
          f"replicated {replicated / 2**10:.1f} KiB ({100 * replicated / total:.3f}%)")
    assert replicated < 1e-3 * total


def test_config_roundtrip_and_defaults():
    from diffusers import AutoencoderKL as Reference

    # A config.json without optional fields means diffusers' defaults.
    with torch.device("meta"):
        default_ref = Reference()
    assert VAEConfig.from_diffusers({"_class_name": "AutoencoderKL"}) == VAEConfig()
    assert VAEConfig.from_diffusers(dict(default_ref.config)) == VAEConfig()
    for preset in PRESETS.values():
        cfg = VAEConfig(**preset)
        assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
        with torch.device("meta"):
            ref = Reference(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
        assert VAEConfig.from_diffusers(dict(ref.config)) == cfg
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        VAEConfig.from_diffusers({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="norm_num_groups=32 does not divide"):
        VAEConfig(block_out_channels=(48,))


def test_latent_scale_shift_and_sampling():
    z = jnp.linspace(-3.0, 3.0, 7)
    sd3, sdxl = VAEConfig(**PRESETS["sd3"]), VAEConfig(**PRESETS["sdxl"])
    np.testing.assert_allclose(to_model_latent(sd3, z), (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(to_model_latent(sdxl, z), z * 0.13025, rtol=1e-6)
    for cfg in (sd3, sdxl):
        np.testing.assert_allclose(from_model_latent(cfg, to_model_latent(cfg, z)), z, rtol=1e-6, atol=1e-6)
    mean, logvar = jnp.full((4000,), 1.5), jnp.full((4000,), np.log(4.0))
    s = np.asarray(sample_latent(mean, logvar, jax.random.key(0)))
    assert abs(s.mean() - 1.5) < 0.1 and abs(s.std() - 2.0) < 0.1


# ---------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    _save_random_vae(folder, CONFIGS["no_attention"]["arch"])
    return folder


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
    return copy_checkpoint(src, dst, "diffusion_pytorch_model.safetensors", edit_tensors, edit_config)


def test_missing_key_is_named(small_ckpt, tmp_path):
    key = "decoder.up_blocks.0.resnets.1.conv2.weight"
    bad = _copy_with(small_ckpt, tmp_path / "m", edit_tensors=lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.up_blocks\.0\.resnets\.1\.conv2\.weight"):
        load_vae(bad, progress=False)


def test_wrong_shape_is_named(small_ckpt, tmp_path):
    def edit(t):
        t["encoder.conv_in.weight"] = torch.zeros(16, 3, 3, 3)

    bad = _copy_with(small_ckpt, tmp_path / "s", edit_tensors=edit)
    expected = r"shape mismatches: encoder\.conv_in\.weight \(checkpoint \[16, 3, 3, 3\], model expects \[16, 4, 3, 3\]"
    with pytest.raises(CheckpointError, match=expected):
        load_vae(bad, progress=False)


def test_wrong_config_is_named(small_ckpt, tmp_path):
    bad = _copy_with(small_ckpt, tmp_path / "c", edit_config=lambda c: c.update(_class_name="UNet2DConditionModel"))
    with pytest.raises(CheckpointError, match="describes a UNet2DConditionModel, not a diffusers AutoencoderKL"):
        load_vae(bad, progress=False)
    bad = _copy_with(small_ckpt, tmp_path / "b",
                     edit_config=lambda c: c.update(down_block_types=["AttnDownEncoderBlock2D"]))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported AutoencoderKL config: down_block_types"):
        load_vae(bad, progress=False)
    bad = _copy_with(small_ckpt, tmp_path / "q", edit_config=lambda c: c.update(use_post_quant_conv=True))
    with pytest.raises(CheckpointError, match=r"missing keys: post_quant_conv\.bias, post_quant_conv\.weight"):
        load_vae(bad, progress=False)


def test_pipeline_root_resolves_to_vae(small_ckpt, tmp_path):
    _copy_with(small_ckpt, tmp_path / "pipe" / "vae")
    assert isinstance(load_vae(tmp_path / "pipe", progress=False), AutoencoderKL)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vae(tmp_path / "nowhere", progress=False)
