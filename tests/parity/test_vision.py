"""Evaluation vision towers: CLIP ViT (CLIPVisionModel / WithProjection / a full CLIPModel's towers),
DINOv2 and DINOv3 ViT. Numerical parity with transformers on the features the evaluator reads,
DINOv2's position-table interpolation at non-square grids, sharded loading, export round trips,
full-size parameter counts, clear errors on bad checkpoints, and the image preprocessing against
the transformers image processors."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dpdmd_jax.eval import preprocess as pp
from dpdmd_jax.models.clip import VISION_PRESETS, CLIPVisionConfig, CLIPVisionModel
from dpdmd_jax.models.dino import (
    DINOV2_PRESETS,
    DINOV3_PRESETS,
    Dinov2Config,
    Dinov2Model,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    torch_bicubic_matrix,
)
from dpdmd_jax.parallel.mesh import make_mesh, sharding_plan
from dpdmd_jax.weights.clip import load_clip_text, load_clip_vision, read_vision_config, save_clip_vision
from dpdmd_jax.weights.dino import load_dino, load_dinov2, load_dinov3, save_dino
from dpdmd_jax.weights.loader import abstract_model
from dpdmd_jax.weights.safetensors_io import CheckpointError
from tests.torch_helpers import copy_checkpoint, nchw, rel_err

# ---------------------------------------------------------------- reference models

# CLIP vision: with / without projection, both activations, both key layouts (CLIPVisionModel
# saved by transformers 5 has no vision_model. prefix), and a full CLIPModel folder that also
# holds the legacy position_ids buffers of the published openai/clip-vit-large-patch14 file.
CLIP_CASES = {
    "clip_proj": dict(cls="CLIPVisionModelWithProjection", size=(28, 28), arch=dict(
        hidden_size=32, intermediate_size=48, projection_dim=24, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)),
    "clip_noproj": dict(cls="CLIPVisionModel", size=(30, 30), arch=dict(
        hidden_size=40, intermediate_size=64, num_hidden_layers=3, num_attention_heads=5, image_size=30,
        patch_size=6, hidden_act="gelu", layer_norm_eps=1e-3)),
    "clip_full": dict(cls="CLIPModel", size=(32, 32), arch=dict(
        hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=32,
        patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)),
}
FULL_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
FULL_PROJECTION = 16

# DINO: every input is off the stored grid (DINOv2 interpolates; DINOv3's RoPE follows the grid),
# non-square, upsampled on both axes / one axis kept and one downsampled. DINOv2 is also run on
# its stored grid (no interpolation). DINOv3: registers or none, plain or gated MLP, every bias knob.
DINO_CASES = {
    "v2_mlp": dict(cls="Dinov2Model", sizes=((35, 49), (28, 28)), arch=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)),
    "v2_swiglu": dict(cls="Dinov2Model", sizes=((42, 28), (42, 42)), arch=dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=5, mlp_ratio=3, image_size=42, patch_size=7,
        use_swiglu_ffn=True, qkv_bias=False, use_mask_token=False, layer_norm_eps=1e-5, layerscale_value=0.5)),
    "v3_mlp": dict(cls="DINOv3ViTModel", sizes=((24, 40),), arch=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_register_tokens=2,
        patch_size=8)),
    "v3_gated": dict(cls="DINOv3ViTModel", sizes=((32, 16),), arch=dict(
        hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=0,
        patch_size=8, use_gated_mlp=True, hidden_act="silu", query_bias=False, key_bias=True, proj_bias=False,
        mlp_bias=False, rope_theta=50.0, layer_norm_eps=1e-4)),
}
CONFIG_CLASSES = {"Dinov2Model": "Dinov2Config", "DINOv3ViTModel": "DINOv3ViTConfig"}


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # LayerNorms, LayerScale and zero-initialised tokens / biases get exercised too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _save_clip(folder, case, seed=0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(**case["arch"])
    if case["cls"] == "CLIPModel":
        config = transformers.CLIPConfig(text_config=FULL_TEXT, vision_config=vision.to_dict(),
                                         projection_dim=FULL_PROJECTION)
        model = _perturb(transformers.CLIPModel(config))
    else:
        model = _perturb(getattr(transformers, case["cls"])(vision))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _save_dino(folder, case, seed=0, **save_kwargs) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, CONFIG_CLASSES[case["cls"]])(**case["arch"])
    model = _perturb(getattr(transformers, case["cls"])(config))
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return model


def _images(size, seed=0, batch=2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *size, 3)).astype(np.float32)


def _clip_torch(ref, x) -> dict[str, np.ndarray]:
    with torch.no_grad():
        px = nchw(x)
        tower = ref if ref.__class__.__name__ == "CLIPVisionModel" else ref.vision_model
        out = tower(px)
        got = dict(cls=out.last_hidden_state[:, 0], last_hidden_state=out.last_hidden_state,
                   pooler_output=out.pooler_output)
        if hasattr(ref, "visual_projection"):
            got["image_embeds"] = ref.visual_projection(out.pooler_output)
    return {k: v.float().numpy() for k, v in got.items()}


def _dino_torch(ref, x) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = ref(nchw(x))
    return dict(last_hidden_state=out.last_hidden_state.numpy(), pooler_output=out.pooler_output.numpy())


_forward = jax.jit(lambda model, x: model(x))


def _ours(model, x) -> dict[str, np.ndarray]:
    out = _forward(model, jnp.asarray(x))._asdict()
    if "image_embeds" in out:  # CLIP: the evaluator's CLIP feature is the CLS token before post_layernorm
        out["cls"] = out["last_hidden_state"][:, 0]
    return {k: np.asarray(v, np.float32) for k, v in out.items() if v is not None}


def _check(name, ours, expected, tol=1e-5, label="fp32"):
    assert set(ours) == set(expected), (set(ours), set(expected))
    for key in sorted(expected):
        assert ours[key].shape == expected[key].shape, key
        assert np.isfinite(ours[key]).all(), key
        err, max_abs = rel_err(ours[key], expected[key]), np.abs(ours[key] - expected[key]).max()
        print(f"{name} {label} {key}: rel err {err:.2e}, max abs {max_abs:.2e}")
        assert err <= tol, key


_BUILT: dict[str, dict] = {}  # reference + our model per case, built once per module run


def _clip_case(name, tmp_path_factory) -> dict:
    if name not in _BUILT:
        _BUILT[name] = _build_clip(name, tmp_path_factory)
    return _BUILT[name]


def _dino_case(name, tmp_path_factory) -> dict:
    if name not in _BUILT:
        _BUILT[name] = _build_dino(name, tmp_path_factory)
    return _BUILT[name]


@pytest.fixture(scope="module", autouse=True)
def _forget_built():
    yield
    _BUILT.clear()


@pytest.fixture(scope="module", params=sorted(CLIP_CASES))
def clip_ref(request, tmp_path_factory):
    return _clip_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=sorted(DINO_CASES))
def dino_ref(request, tmp_path_factory):
    return _dino_case(request.param, tmp_path_factory)


def _build_clip(name, tmp_path_factory) -> dict:
    case = CLIP_CASES[name]
    folder = tmp_path_factory.mktemp(name)
    ref = _save_clip(folder, case)
    if case["cls"] == "CLIPModel":  # the published file also stores both towers' position_ids buffers
        n_img = (case["arch"]["image_size"] // case["arch"]["patch_size"]) ** 2 + 1
        n_txt = FULL_TEXT["max_position_embeddings"]
        copy_checkpoint(folder, folder, "model.safetensors", edit_tensors=lambda t: t.update({
            "vision_model.embeddings.position_ids": torch.arange(n_img)[None],
            "text_model.embeddings.position_ids": torch.arange(n_txt)[None]}))
    x = _images(case["size"])
    model = load_clip_vision(folder, progress=False)
    return dict(name=name, case=case, folder=folder, ref=ref, x=x, model=model,
                expected=_clip_torch(ref, x), ours=_ours(model, x))


def _build_dino(name, tmp_path_factory) -> dict:
    case = DINO_CASES[name]
    folder = tmp_path_factory.mktemp(name)
    ref = _save_dino(folder, case)
    model = load_dino(folder, progress=False)
    xs = [_images(size, seed=i) for i, size in enumerate(case["sizes"])]
    return dict(name=name, case=case, folder=folder, ref=ref, xs=xs, model=model,
                expected=[_dino_torch(ref, x) for x in xs], ours=[_ours(model, x) for x in xs])


# ---------------------------------------------------------------- parity


def test_clip_fp32_parity(clip_ref):
    want = {"cls", "last_hidden_state", "pooler_output"} | (
        set() if clip_ref["case"]["cls"] == "CLIPVisionModel" else {"image_embeds"})
    assert set(clip_ref["expected"]) == want
    assert clip_ref["model"].cfg.with_projection == ("image_embeds" in want)
    _check(clip_ref["name"], clip_ref["ours"], clip_ref["expected"])


def test_dino_fp32_parity(dino_ref):
    for x, ours, expected in zip(dino_ref["xs"], dino_ref["ours"], dino_ref["expected"]):
        _check(f"{dino_ref['name']} {x.shape[1]}x{x.shape[2]}", ours, expected)


def test_dino_inputs_exercise_interpolation(dino_ref):
    """The first input's patch grid differs from the stored one (non-square), so DINOv2 resamples
    its position table there; with a table that is not resampled the outputs would differ."""
    cfg = dino_ref["model"].cfg
    h, w = (s // cfg.patch_size for s in dino_ref["xs"][0].shape[1:3])
    assert h != w
    if isinstance(cfg, Dinov2Config):
        assert (h, w) != (cfg.grid_size, cfg.grid_size)
        table = dino_ref["model"].embeddings.position_table((h, w))
        assert table.shape == (1, 1 + h * w, cfg.hidden_size)


def _check_bf16(ref, loader_fn, x, expected):
    model = loader_fn(ref["folder"], dtype="bfloat16", progress=False)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    _check(ref["name"], _ours(model, x), expected, tol=3e-2, label="bf16")


def test_clip_bf16_close_and_finite(clip_ref):
    _check_bf16(clip_ref, load_clip_vision, clip_ref["x"], clip_ref["expected"])


def test_dino_bf16_close_and_finite(dino_ref):
    _check_bf16(dino_ref, load_dino, dino_ref["xs"][0], dino_ref["expected"][0])


def test_torch_bicubic_matrix_matches_interpolate():
    """Our [out, in] bicubic weights equal torch interpolate(bicubic, align_corners=False, size=):
    up, down, identity and the 37 -> 16 of DINOv2 ViT-L/14 at 224 px."""
    rng = np.random.default_rng(0)
    for (gh, gw), (h, w) in [((4, 4), (5, 7)), ((6, 6), (6, 4)), ((37, 37), (16, 16)), ((5, 5), (2, 9))]:
        grid = rng.standard_normal((gh, gw, 3)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(h, w),
                                               mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        got = np.einsum("oh,hwd,pw->opd", torch_bicubic_matrix(gh, h), grid, torch_bicubic_matrix(gw, w))
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"{(gh, gw)} -> {(h, w)}")


# ---------------------------------------------------------------- a full CLIPModel folder


def test_full_clip_text_tower_and_projection(tmp_path_factory):
    """The CLIP score's text side comes out of the same CLIPModel folder: load_clip_text reads
    text_model. + text_projection (sized by CLIPModel's top-level projection_dim) and skips the
    vision half, logit_scale and the position_ids buffers."""
    clip_ref = _clip_case("clip_full", tmp_path_factory)
    ref = clip_ref["ref"]
    text = load_clip_text(clip_ref["folder"], progress=False)
    assert text.cfg.with_projection and text.cfg.projection_dim == FULL_PROJECTION
    assert clip_ref["model"].cfg.projection_dim == FULL_PROJECTION
    ids = np.asarray([[0, 5, 9, 98, 1, 1], [0, 7, 3, 11, 4, 98]], np.int64)  # EOS 98 is the largest id
    with torch.no_grad():
        out = ref.text_model(torch.from_numpy(ids))
        want = dict(last_hidden_state=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy(),
                    text_embeds=ref.text_projection(out.pooler_output).numpy())
    got = jax.jit(lambda m, t: m(t))(text, jnp.asarray(ids, jnp.int32))._asdict()
    _check("clip_full text", {k: np.asarray(got[k]) for k in want}, want)


# ---------------------------------------------------------------- export


def test_clip_export_roundtrip(clip_ref, tmp_path):
    import transformers

    out = save_clip_vision(clip_ref["model"], tmp_path / "export")
    config = json.load(open(os.path.join(out, "config.json")))
    cls = "CLIPVisionModel" if clip_ref["case"]["cls"] == "CLIPVisionModel" else "CLIPVisionModelWithProjection"
    assert config["architectures"] == [cls]
    reloaded = getattr(transformers, cls).from_pretrained(out).eval()
    got = _clip_torch(reloaded, clip_ref["x"])
    for key, want in clip_ref["expected"].items():
        np.testing.assert_allclose(got[key], want, rtol=0, atol=1e-6, err_msg=key)
    again = load_clip_vision(out, progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(clip_ref["model"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        save_clip_vision(clip_ref["model"], out)


def test_dino_export_roundtrip(dino_ref, tmp_path):
    import transformers

    out = save_dino(dino_ref["model"], tmp_path / "export")
    reloaded = getattr(transformers, dino_ref["case"]["cls"]).from_pretrained(out).eval()
    got = _dino_torch(reloaded, dino_ref["xs"][0])
    for key, want in dino_ref["expected"][0].items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    again = load_dino(out, progress=False)
    assert again.cfg == dino_ref["model"].cfg
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(dino_ref["model"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- sharding


def test_sharded_load_matches_single_device(tmp_path):
    """A CLIP tower and a DINOv2 checkpoint (split over several files) load onto an 8-way fsdp
    mesh; the jitted sharded forwards equal the single-device ones."""
    mesh = make_mesh(fsdp=8)
    _save_clip(tmp_path / "clip", CLIP_CASES["clip_noproj"], seed=1)
    _save_dino(tmp_path / "dino", DINO_CASES["v2_swiglu"], seed=1, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "dino" / "model.safetensors.index.json")
    for folder, load, x in ((tmp_path / "clip", load_clip_vision, _images((30, 30), 1)),
                            (tmp_path / "dino", load_dino, _images((42, 28), 1))):
        single = _ours(load(folder, progress=False), x)
        model = load(folder, mesh=mesh, progress=False)
        kernel = (model.encoder.layers[0].mlp.fc1 if isinstance(model, CLIPVisionModel)
                  else model.encoder.layer[0].mlp.weights_in).kernel[...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
        sharded = _ours(model, x)
        for key, want in single.items():
            err, max_abs = rel_err(sharded[key], want), np.abs(sharded[key] - want).max()
            print(f"{folder.name} sharded vs single-device {key}: rel err {err:.1e}, max abs {max_abs:.1e}")
            assert err <= 1e-6 and max_abs <= 5e-6, key


# ---------------------------------------------------------------- full-size shapes


@functools.cache
def _abstract(name: str):
    if name in VISION_PRESETS:
        return abstract_model(lambda rngs: CLIPVisionModel(CLIPVisionConfig(**VISION_PRESETS[name]), rngs=rngs))
    if name in DINOV2_PRESETS:
        return abstract_model(lambda rngs: Dinov2Model(Dinov2Config(**DINOV2_PRESETS[name]), rngs=rngs))
    return abstract_model(lambda rngs: DINOv3ViTModel(DINOv3ViTConfig(**DINOV3_PRESETS[name]), rngs=rngs))


def _count(abstract) -> int:
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in params)
    assert len(params) == len(jax.tree.leaves(nnx.state(abstract)))  # no buffers
    return sum(int(np.prod(v.shape)) for v in params)


# transformers' own counts: CLIPVisionModel(ViT-L/14) 303,179,776; Dinov2Model of facebook/dinov2-large
# (image_size 518: a 37 x 37 + 1 position table, mask token included) 304,368,640;
# DINOv3ViTModel of facebook/dinov3-vitl16-pretrain-lvd1689m (4 registers, mask token) 303,129,600.
@pytest.mark.parametrize("name,count", [("clip-vit-l-14", 303_179_776 + 1024 * 768),
                                        ("dinov2-vit-l-14", 304_368_640), ("dinov3-vit-l-16", 303_129_600)])
def test_full_size_param_counts(name, count):
    assert _count(_abstract(name)) == count


def test_full_size_clip_without_projection_count():
    cfg = CLIPVisionConfig(**{**VISION_PRESETS["clip-vit-l-14"], "with_projection": False})
    assert _count(abstract_model(lambda rngs: CLIPVisionModel(cfg, rngs=rngs))) == 303_179_776


# Replicated fp32 values of the ViT-L towers on an fsdp mesh, per layer + outside the layers:
# LayerNorm weights and biases, LayerScales, and the biases of outputs on the "tensor" axis (q / k / v,
# fc1 / up_proj; DINOv3 has no key bias).
D, F = 1024, 4096
REPLICATED_VALUES = {
    "clip-vit-l-14": 24 * (4 * D + 3 * D + F) + 4 * D,  # + pre_layrnorm, post_layernorm
    "dinov2-vit-l-14": 24 * (4 * D + 2 * D + 3 * D + F) + 2 * D,  # + layernorm
    "dinov3-vit-l-16": 24 * (4 * D + 2 * D + 2 * D + F) + 2 * D,  # + norm
}


@pytest.mark.parametrize("name", sorted(REPLICATED_VALUES))
def test_full_size_is_mostly_sharded(name):
    """On an 8-way fsdp mesh only norms, LayerScales and the biases of tensor-axis outputs stay
    replicated (shape-only plan: nothing is allocated)."""
    plan = sharding_plan(nnx.state(_abstract(name)), make_mesh(fsdp=8))
    print(f"{name} fp32 on fsdp=8: {plan['replicated_bytes']:,} of {plan['total_bytes']:,} bytes replicated "
          f"({plan['replicated_bytes'] / plan['total_bytes']:.3%}), {plan['per_device_bytes']:,} per device")
    assert plan["replicated_bytes"] == 4 * REPLICATED_VALUES[name]
    assert plan["replicated_bytes"] < 2e-3 * plan["total_bytes"]


def test_configs_roundtrip_through_transformers():
    import transformers

    for ours, theirs_cls in ((CLIPVisionConfig(**VISION_PRESETS["clip-vit-l-14"]), transformers.CLIPVisionConfig),
                             (Dinov2Config(**DINOV2_PRESETS["dinov2-vit-l-14"]), transformers.Dinov2Config),
                             (DINOv3ViTConfig(**DINOV3_PRESETS["dinov3-vit-l-16"]), transformers.DINOv3ViTConfig)):
        exported = ours.to_transformers()
        theirs = theirs_cls(**{k: v for k, v in exported.items() if k not in ("architectures", "model_type")})
        theirs.architectures = exported["architectures"]
        assert type(ours).from_transformers(theirs.to_dict()) == ours


# ---------------------------------------------------------------- bad checkpoints and inputs


def test_clip_missing_and_misshaped_keys_are_named(tmp_path_factory, tmp_path):
    clip_ref = _clip_case("clip_proj", tmp_path_factory)

    def edit(t):
        t.pop("vision_model.encoder.layers.1.mlp.fc2.bias")
        t["visual_projection.weight"] = torch.zeros(5, 32)
        t["vision_model.embeddings.position_idz"] = torch.arange(17)[None]

    bad = copy_checkpoint(clip_ref["folder"], tmp_path / "k", "model.safetensors", edit_tensors=edit)
    with pytest.raises(CheckpointError) as info:
        load_clip_vision(bad, progress=False)
    msg = str(info.value)
    assert "missing keys: vision_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "unexpected keys: vision_model.embeddings.position_idz" in msg
    assert "shape mismatches: visual_projection.weight (checkpoint [5, 32], model expects [24, 32])" in msg

    text = copy_checkpoint(clip_ref["folder"], tmp_path / "t", "model.safetensors",
                           edit_config=lambda c: c.update(architectures=["CLIPTextModel"]))
    with pytest.raises(CheckpointError, match="describes a CLIPTextModel, not a transformers CLIP vision tower"):
        load_clip_vision(text, progress=False)
    vision = copy_checkpoint(clip_ref["folder"], tmp_path / "v", "model.safetensors")
    with pytest.raises(CheckpointError, match="describes a CLIPVisionModelWithProjection, not a transformers CLIP"):
        load_clip_text(vision, progress=False)
    assert read_vision_config(vision).with_projection


def test_dino_missing_and_misshaped_keys_are_named(tmp_path_factory, tmp_path):
    dino_ref = _dino_case("v2_mlp", tmp_path_factory)

    def edit(t):
        t.pop("encoder.layer.0.layer_scale1.lambda1")
        t["embeddings.position_embeddings"] = torch.zeros(1, 10, 32)

    bad = copy_checkpoint(dino_ref["folder"], tmp_path / "k", "model.safetensors", edit_tensors=edit)
    with pytest.raises(CheckpointError) as info:
        load_dino(bad, progress=False)
    msg = str(info.value)
    assert "missing keys: encoder.layer.0.layer_scale1.lambda1" in msg
    assert "shape mismatches: embeddings.position_embeddings (checkpoint [1, 10, 32], model expects [1, 17, 32])" in msg
    with pytest.raises(CheckpointError, match="describes a Dinov2Model, not a transformers DINOv3 ViT model"):
        load_dinov3(dino_ref["folder"], progress=False)
    assert isinstance(load_dinov2(dino_ref["folder"], progress=False), Dinov2Model)


def test_clip_refuses_other_image_sizes(tmp_path_factory):
    clip_ref = _clip_case("clip_proj", tmp_path_factory)
    with pytest.raises(ValueError, match="position table is 4x4"):
        clip_ref["model"](jnp.zeros((1, 35, 28, 3)))


# ---------------------------------------------------------------- preprocessing

PREPROCESS_SHAPES = ((300, 257), (180, 400))  # portrait and landscape, both resampled on both axes


def _random_uint8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def test_clip_and_dinov2_preprocessing_match_the_pil_processors():
    """Bit-exact 8-bit resampling: equal to CLIPImageProcessorPil (CLIP ViT-L/14's defaults) and to
    BitImageProcessorPil with facebook/dinov2-*'s preprocessor_config, up to float32 rounding; a
    float image in [0, 1] gives the same as its uint8 levels."""
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    processors = {
        "clip": (CLIPImageProcessorPil(), pp.clip_preprocess),
        "dinov2": (BitImageProcessorPil(size={"shortest_edge": 256}, image_mean=IMAGENET_DEFAULT_MEAN,
                                        image_std=IMAGENET_DEFAULT_STD), pp.dinov2_preprocess),
    }
    for i, shape in enumerate(PREPROCESS_SHAPES):
        img = _random_uint8(shape, i)
        for name, (processor, ours_fn) in processors.items():
            want = processor(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            got = np.asarray(ours_fn(jnp.asarray(img[None])))[0]
            from_float = np.asarray(ours_fn(jnp.asarray(img[None] / 255.0, jnp.float32)))[0]
            print(f"{name} {shape} vs PIL processor: max abs {np.abs(got - want).max():.1e}")
            assert got.shape == want.shape == (224, 224, 3)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(from_float, got)


@pytest.mark.parametrize("filter", ["bicubic", "bilinear"])
def test_8bit_resampling_is_pillows(filter):
    """The 8-bit levels equal PIL.Image.resize exactly, SD's 1024 px outputs (a 4.6x downscale:
    ~20 taps per output) and an upscale included."""
    from PIL import Image

    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[filter]
    for i, (shape, size) in enumerate([((1024, 768), (298, 224)), ((100, 150), (224, 336))]):
        img = _random_uint8(shape, i)
        want = np.asarray(Image.fromarray(img).resize(size[::-1], resample=resample))
        got = np.asarray(pp.resize_crop(jnp.asarray(img[None]), size, filter=filter))[0]
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"{shape} -> {size}")


def test_float_resampling_matches_torch_antialias():
    """exact_uint8=False (CLIP) and DINOv3's float pipeline equal torch interpolate(antialias=True)
    on floats, which the torchvision backend calls (DINOv3ViTImageProcessor: rescale, bilinear
    antialiased resize to 224 x 224, ImageNet statistics). torchvision is not installed here, so
    the DINOv3 processor is reproduced step by step unless it is."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean, std = np.array(IMAGENET_DEFAULT_MEAN, np.float32), np.array(IMAGENET_DEFAULT_STD, np.float32)
    for i, shape in enumerate(PREPROCESS_SHAPES):
        img = _random_uint8(shape, i)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        size = pp.output_size_shortest_edge(*shape, 224)
        top, left = pp.center_crop_box(*size, (224, 224))
        want = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        want = want[0, :, top : top + 224, left : left + 224].permute(1, 2, 0).numpy()
        got = np.asarray(pp.resize_crop(jnp.asarray(x.permute(0, 2, 3, 1).numpy()), size, (224, 224),
                                        exact_uint8=False))[0]
        print(f"bicubic float {shape} vs torch antialias: max abs {np.abs(got - want).max():.1e}")
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)

        try:
            from transformers import DINOv3ViTImageProcessor

            want3 = DINOv3ViTImageProcessor()(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        except ImportError:
            resized = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True,
                                                      align_corners=False)
            want3 = (resized[0].permute(1, 2, 0).numpy() - mean) / std
        got3 = np.asarray(pp.dinov3_preprocess(jnp.asarray(img[None])))[0]
        print(f"dinov3 {shape} vs processor: max abs {np.abs(got3 - want3).max():.1e}")
        np.testing.assert_allclose(got3, want3, rtol=0, atol=1e-5)


def test_pil_levels_vs_torch_uint8_kernel():
    """transformers' torchvision backend resizes uint8 tensors with torch's own fixed-point kernel;
    it differs from Pillow's (which we match) by a level or two on under 2% of the pixels."""
    img = _random_uint8(PREPROCESS_SHAPES[0], 0)
    size = pp.output_size_shortest_edge(*img.shape[:2], 224)
    top, left = pp.center_crop_box(*size, (224, 224))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].contiguous(), size=size,
                                             mode="bicubic", antialias=True, align_corners=False)
    theirs = theirs[0, :, top : top + 224, left : left + 224].permute(1, 2, 0).numpy().astype(np.float32)
    ours = np.asarray(pp.resize_crop(jnp.asarray(img[None]), size, (224, 224)))[0]
    diff = np.abs(theirs - ours)
    print(f"Pillow-exact vs torch uint8 kernel: max {diff.max():.0f} levels, {np.mean(diff > 0):.2%} of values differ")
    assert diff.max() <= 3 and np.mean(diff > 0) < 0.02


@pytest.mark.parametrize("legacy_dicts", [False, True])
def test_full_clip_configs_read_as_transformers_does(tmp_path, legacy_dicts):
    """A CLIPModel config.json gives both towers' configs as transformers' CLIPConfig parses them,
    including openai/clip-vit-large-patch14's old text_config_dict / vision_config_dict, which
    override the nested configs (and with them the legacy EOS id, hence the pooling rule)."""
    import transformers

    from dpdmd_jax.models.clip import CLIPTextConfig
    from dpdmd_jax.weights.clip import read_raw_text_config

    raw = dict(architectures=["CLIPModel"], model_type="clip", projection_dim=768,
               text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768),
               vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                  num_hidden_layers=24, patch_size=14, projection_dim=768))
    if legacy_dicts:
        raw["text_config_dict"] = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                       num_hidden_layers=12, projection_dim=768)
        raw["vision_config_dict"] = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                         num_hidden_layers=24, patch_size=14, projection_dim=768)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(raw, f)
    theirs = transformers.CLIPConfig.from_dict(json.loads(json.dumps(raw)))
    text = CLIPTextConfig.from_transformers(read_raw_text_config(str(tmp_path))[0])
    assert text == CLIPTextConfig.from_transformers(theirs.text_config.to_dict(), with_projection=True)
    assert text.legacy_pooling is not legacy_dicts
    vision = read_vision_config(tmp_path)
    assert vision == CLIPVisionConfig(**VISION_PRESETS["clip-vit-l-14"])
    assert vision == CLIPVisionConfig.from_transformers(theirs.vision_config.to_dict(), with_projection=True)


def test_dinov3_module_path_layout_is_read(tmp_path_factory, tmp_path):
    """A DINOv3 file keyed by transformers' module path (`model.layer.N`, not the published
    `layer.N`) loads to the same parameters."""
    dino_ref = _dino_case("v3_mlp", tmp_path_factory)

    def rename(t):
        for key in [k for k in t if k.startswith("layer.")]:
            t["model." + key] = t.pop(key)

    moved = copy_checkpoint(dino_ref["folder"], tmp_path / "m", "model.safetensors", edit_tensors=rename)
    again = load_dinov3(moved, progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(dino_ref["model"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
