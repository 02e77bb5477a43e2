"""CLIP text encoder port: numerical parity with transformers CLIPTextModel(WithProjection) for every
output the SD pipelines read, both EOS pooling rules, sharded loading, export round trip,
full-size parameter counts, and clear errors on bad checkpoints."""

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

from dpdmd_jax.models.clip import PRESETS, CLIPTextConfig, CLIPTextModel
from dpdmd_jax.parallel.mesh import make_mesh, sharding_report, state_shardings
from dpdmd_jax.weights.clip import load_clip_text, save_clip_text
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.loader import abstract_model
from tests.torch_helpers import copy_checkpoint, rel_err

WITH_PROJECTION, NO_PROJECTION = "CLIPTextModelWithProjection", "CLIPTextModel"
LENGTH = 12  # prompt length (< max_position_embeddings: the position table is sliced)

# Three small configs that together cover every branch: both activations, both pooling rules,
# with and without the projection head, and both key layouts (text_model.-prefixed or not).
CONFIGS = {
    # CLIP-L-like: quick_gelu, the legacy eos_token_id 2 (pool at argmax(input_ids)), prompts padded
    # with the real EOS id (98, the largest id). Token 2 also occurs before the EOS, so pooling at
    # the first eos_token_id would pick another position.
    "l_like": dict(
        cls=WITH_PROJECTION, eos=98, pad=98, tokens=(3, 97), plant_token=2,
        arch=dict(vocab_size=99, hidden_size=32, intermediate_size=48, projection_dim=24, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  bos_token_id=97, eos_token_id=2, pad_token_id=1),
    ),
    # bigG-like: exact gelu, eos_token_id 40 (pool at its first occurrence) which is NOT the largest id
    # (the BOS 97 is), prompts padded with 0; a layer_norm_eps large enough to matter.
    "g_like": dict(
        cls=WITH_PROJECTION, eos=40, pad=0, tokens=(41, 97), plant_token=None,
        arch=dict(vocab_size=99, hidden_size=40, intermediate_size=64, projection_dim=16, num_hidden_layers=4,
                  num_attention_heads=5, max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-3,
                  bos_token_id=97, eos_token_id=40, pad_token_id=0),
    ),
    # SDXL text_encoder-like: no projection (pooler_output), one layer (penultimate = the embeddings),
    # saved by transformers 5 without the text_model. prefix.
    "noproj": dict(
        cls=NO_PROJECTION, eos=63, pad=63, tokens=(1, 62), plant_token=None,
        arch=dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                  max_position_embeddings=12, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=62,
                  eos_token_id=63, pad_token_id=0),
    ),
}


def _prompts(case, seed=0) -> np.ndarray:
    """[BOS, words..., EOS, pad...] rows of different lengths (the last one unpadded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n_words in (2, 5, 8, LENGTH - 2):
        words = rng.integers(*case["tokens"], size=n_words)
        if case["plant_token"] is not None:
            words[rng.integers(n_words)] = case["plant_token"]
        row = [case["arch"]["bos_token_id"], *words, case["eos"]]
        rows.append(row + [case["pad"]] * (LENGTH - len(row)))
    return np.asarray(rows, np.int64)


def _save_random_clip(folder, case, seed=0, **save_kwargs) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, case["cls"])(transformers.CLIPTextConfig(**case["arch"])).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm and zero-initialised biases get exercised too
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return model


def _torch_outputs(ref, ids) -> dict[str, np.ndarray]:
    with torch.no_grad():
        t = torch.from_numpy(ids)
        out = ref(t, output_hidden_states=True)
        got = dict(last_hidden_state=out.last_hidden_state, penultimate=out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            got["text_embeds"] = out.text_embeds
            got["pooled"] = ref.text_model(t).pooler_output
        else:
            got["pooled"] = out.pooler_output
    return {k: v.float().numpy() for k, v in got.items()}


_forward = jax.jit(lambda model, ids: model(ids))


def _ours(model, ids) -> dict[str, np.ndarray]:
    out = _forward(model, jnp.asarray(ids, jnp.int32))._asdict()
    return {k: np.asarray(v, np.float32) for k, v in out.items() if v is not None}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    case = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = _save_random_clip(folder, case)
    ids = _prompts(case)
    model = load_clip_text(folder, progress=False)
    return dict(name=request.param, case=case, folder=folder, ids=ids, expected=_torch_outputs(ref, ids),
                model=model, ours=_ours(model, ids))


def test_inputs_tell_the_pooling_rules_apart():
    """In the two projection configs the legacy rule (argmax of ids) and the first-EOS rule pick
    different positions in every row, so pooling by the wrong rule fails the parity tests."""
    for name in ("l_like", "g_like"):
        case = CONFIGS[name]
        ids = _prompts(case)
        first_eos = np.argmax(ids == case["arch"]["eos_token_id"], axis=-1)
        assert (np.argmax(ids, axis=-1) != first_eos).all(), name
        real_eos = np.argmax(ids == case["eos"], axis=-1)
        rule = np.argmax(ids, axis=-1) if case["arch"]["eos_token_id"] == 2 else first_eos
        np.testing.assert_array_equal(rule, real_eos)  # the reference's rule finds the real EOS


def test_fp32_parity(reference):
    expected, ours = reference["expected"], reference["ours"]
    want = {"last_hidden_state", "penultimate", "pooled"} | (
        {"text_embeds"} if reference["case"]["cls"] == WITH_PROJECTION else set()
    )
    assert set(ours) == set(expected) == want
    for key in sorted(want):
        err = rel_err(ours[key], expected[key])
        print(f"{reference['name']} {key}: rel err {err:.2e}, max abs {np.abs(ours[key] - expected[key]).max():.2e}")
        assert ours[key].shape == expected[key].shape
        assert err <= 1e-5, key


def test_bf16_close_and_finite(reference):
    model = load_clip_text(reference["folder"], dtype="bfloat16", progress=False)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    ours = _ours(model, reference["ids"])
    for key, want in reference["expected"].items():
        assert np.isfinite(ours[key]).all(), key
        err = rel_err(ours[key], want)
        print(f"{reference['name']} bf16 {key}: rel err {err:.2e}")
        assert err <= 3e-2, key


def test_export_roundtrip_loads_in_transformers(reference, tmp_path):
    import transformers

    out = save_clip_text(reference["model"], tmp_path / "export")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == [reference["case"]["cls"]]
    reloaded = getattr(transformers, reference["case"]["cls"]).from_pretrained(out).eval()
    got = _torch_outputs(reloaded, reference["ids"])
    for key, want in reference["expected"].items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    # The export uses the published text_model.-prefixed layout; it loads back into ours unchanged.
    again = load_clip_text(out, progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(reference["model"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        save_clip_text(reference["model"], out)


def test_legacy_position_ids_buffer_is_accepted(reference, tmp_path):
    """Checkpoints saved before transformers 4.31 also store embeddings.position_ids (a buffer)."""
    name = reference["name"]
    prefix = "" if name == "noproj" else "text_model."
    n = reference["case"]["arch"]["max_position_embeddings"]
    bad = _copy_with(reference["folder"], tmp_path / "legacy",
                     edit_tensors=lambda t: t.update({f"{prefix}embeddings.position_ids": torch.arange(n)[None]}))
    model = load_clip_text(bad, progress=False)
    for key, want in _ours(model, reference["ids"]).items():
        np.testing.assert_array_equal(want, reference["ours"][key])


def test_sequence_longer_than_the_position_table_is_refused(reference):
    n = reference["case"]["arch"]["max_position_embeddings"]
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        reference["model"](jnp.zeros((1, n + 1), jnp.int32))


# ---------------------------------------------------------------- sharding


@functools.cache
def _abstract(preset: str) -> CLIPTextModel:
    """A full-size model with shape-only parameters (nothing allocated); built once per preset."""
    return abstract_model(lambda rngs: CLIPTextModel(CLIPTextConfig(**PRESETS[preset]), rngs=rngs))


def test_sharded_load_matches_single_device(tmp_path):
    """A checkpoint split over several files (model.safetensors.index.json) loads onto an 8-way
    fsdp mesh, and the jitted sharded forward equals the single-device one."""
    case = CONFIGS["g_like"]
    _save_random_clip(tmp_path, case, seed=1, max_shard_size="64KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ids = _prompts(case, seed=1)
    single = _ours(load_clip_text(tmp_path, progress=False), ids)
    mesh = make_mesh(fsdp=8)
    model = load_clip_text(tmp_path, mesh=mesh, progress=False)
    fc1 = model.encoder.layers[0].mlp.fc1.kernel[...]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert model.embeddings.token_embedding.embedding[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    report = sharding_report(nnx.state(model))
    print(f"g_like on fsdp=8: {report}")
    assert report["replicated_bytes"] < 0.05 * report["total_bytes"]
    sharded = _ours(model, ids)
    for key, want in single.items():  # equal up to the order of the sharded reductions
        err, max_abs = rel_err(sharded[key], want), np.abs(sharded[key] - want).max()
        print(f"g_like sharded vs single-device {key}: rel err {err:.1e}, max abs {max_abs:.1e}")
        assert err <= 1e-6 and max_abs <= 5e-6, key


def test_full_size_bigg_is_mostly_sharded():
    """Full-size OpenCLIP-bigG on an 8-way fsdp mesh: only norms and the biases of tensor-axis
    outputs stay replicated (abstract state + shardings: nothing is allocated)."""
    state = nnx.state(_abstract("clip-bigg"))
    shardings = state_shardings(state, make_mesh(fsdp=8))
    total = replicated = 0
    for var, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        nbytes = int(np.prod(var.shape)) * var.dtype.itemsize
        total += nbytes
        if all(axis is None for axis in sh.spec):
            replicated += nbytes
    print(f"clip-bigg fp32 on fsdp=8: {replicated:,} of {total:,} bytes replicated ({replicated / total:.3%})")
    assert replicated == 4 * (32 * (4 * 1280 + 3 * 1280 + 5120) + 2 * 1280)  # LNs, q/k/v and fc1 biases
    assert replicated < 1e-3 * total


# ---------------------------------------------------------------- configs and sizes


@pytest.mark.parametrize("preset,count", [("clip-l", 123_650_304), ("clip-bigg", 694_659_840)])
def test_full_size_param_counts(preset, count):
    abstract = _abstract(preset)
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in params)
    assert len(params) == len(jax.tree.leaves(nnx.state(abstract)))  # no buffers (position_ids is an arange)
    assert sum(int(np.prod(v.shape)) for v in params) == count


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_roundtrips_through_transformers(preset):
    import transformers

    ours = CLIPTextConfig(**PRESETS[preset])
    exported = ours.to_transformers()
    theirs = transformers.CLIPTextConfig(**{k: v for k, v in exported.items() if k != "architectures"})
    theirs.architectures = exported["architectures"]
    assert CLIPTextConfig.from_transformers(theirs.to_dict()) == ours
    assert CLIPTextConfig.from_transformers(exported, with_projection=False).with_projection is False


# ---------------------------------------------------------------- bad checkpoints


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
    return copy_checkpoint(src, dst, "model.safetensors", edit_tensors, edit_config)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    _save_random_clip(folder, CONFIGS["l_like"])
    return folder


def test_wrong_class_is_named(small_ckpt, tmp_path):
    bad = _copy_with(small_ckpt, tmp_path / "v", edit_config=lambda c: c.update(architectures=["CLIPVisionModel"]))
    with pytest.raises(CheckpointError, match="describes a CLIPVisionModel, not a transformers CLIP text encoder"):
        load_clip_text(bad, progress=False)

    def unnamed_t5(c):
        c.pop("architectures")
        c["model_type"] = "t5"

    bad = _copy_with(small_ckpt, tmp_path / "t", edit_config=unnamed_t5)
    with pytest.raises(CheckpointError, match="model_type 't5', not a CLIP text encoder"):
        load_clip_text(bad, progress=False)


def test_missing_unexpected_and_misshaped_keys_are_named(small_ckpt, tmp_path):
    def edit(t):
        t.pop("text_model.encoder.layers.1.mlp.fc2.bias")
        t["text_projection.weight"] = torch.zeros(5, 32)
        t["text_model.embeddings.position_idz"] = torch.arange(16)[None]  # not the ignored buffer

    bad = _copy_with(small_ckpt, tmp_path / "k", edit_tensors=edit)
    with pytest.raises(CheckpointError) as info:
        load_clip_text(bad, progress=False)
    msg = str(info.value)
    assert "missing keys: text_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "unexpected keys: text_model.embeddings.position_idz" in msg
    assert "shape mismatches: text_projection.weight (checkpoint [5, 32], model expects [24, 32])" in msg


def test_projection_head_inferred_without_architectures(small_ckpt, tmp_path):
    ok = _copy_with(small_ckpt, tmp_path / "a", edit_config=lambda c: c.pop("architectures"))
    assert load_clip_text(ok, progress=False).cfg.with_projection
    bad = _copy_with(small_ckpt, tmp_path / "b", edit_config=lambda c: c.update(architectures=[NO_PROJECTION]))
    with pytest.raises(CheckpointError, match=r"unexpected keys: text_projection\.weight"):
        load_clip_text(bad, progress=False)
