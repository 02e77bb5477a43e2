"""T5 v1.1 encoder port: numerical parity with transformers T5EncoderModel, sharded checkpoints, the
tied embedding's key variants, mesh placement, export round trip, full-size parameter count, and clear
errors on bad checkpoints."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dpdmd_jax.models.t5 import PRESETS, T5Config, T5Encoder, relative_position_bucket
from dpdmd_jax.parallel.mesh import make_mesh, sharding_report, state_shardings
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.t5 import load_t5_encoder, read_config, save_t5_encoder
from tests.torch_helpers import copy_checkpoint, rel_err

# Two small configs that together cover every branch.
CONFIGS = {
    # T5 v1.1 (gated tanh-GELU). 32 buckets -> 16 per direction, exact for offsets < 8, log-spaced up to
    # max_distance 20; L=40 reaches offsets of +-39, past both the exact range and max_distance.
    "v1_1_long": dict(
        arch=dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                  relative_attention_num_buckets=32, relative_attention_max_distance=20,
                  feed_forward_proj="gated-gelu"),
        length=40,
    ),
    # Original T5 (non-gated ReLU FF), heads * d_kv (48) != d_model (40), an odd bucket count (10 -> 5
    # per direction, exact for offsets < 2), eps 1e-5, L=13 (past max_distance 9).
    "relu_odd": dict(
        arch=dict(vocab_size=64, d_model=40, d_kv=16, d_ff=56, num_layers=2, num_heads=3,
                  relative_attention_num_buckets=10, relative_attention_max_distance=9,
                  layer_norm_epsilon=1e-5, feed_forward_proj="relu"),
        length=13,
    ),
}
BATCH = 2

_forward = jax.jit(lambda model, ids: model(ids))


def _save_random_t5(folder, seed: int = 0, **arch) -> torch.nn.Module:
    """A small random T5EncoderModel with every parameter perturbed (norm weights away from 1),
    saved with save_pretrained; returns it (eval)."""
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(HFConfig(**arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _torch_forward(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).last_hidden_state.float().numpy()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (single-file folder, two-shard folder, input ids, transformers output, torch model)."""
    out = {}
    for name, case in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        ref = _save_random_t5(folder, **case["arch"])
        sharded = tmp_path_factory.mktemp(name + "_sharded")
        total = sum(p.numel() * p.element_size() for p in ref.parameters())
        ref.save_pretrained(sharded, max_shard_size=int(0.6 * total))
        ids = np.random.default_rng(0).integers(0, case["arch"]["vocab_size"], (BATCH, case["length"]))
        out[name] = (str(folder), str(sharded), ids, _torch_forward(ref, ids), ref)
    return out


@pytest.fixture(scope="module")
def ours_fp32(references):
    """name -> our fp32 output (single device), computed once."""
    return {
        name: np.asarray(_forward(load_t5_encoder(folder, progress=False), ids))
        for name, (folder, _, ids, _, _) in references.items()
    }


def test_relative_position_buckets_match_transformers():
    """Every offset up to +-600 (and the exact-power boundaries where float32 rounding decides the
    bucket) lands in transformers' bucket, for the XXL setting and odd ones."""
    from transformers.models.t5.modeling_t5 import T5Attention

    rp = np.arange(-600, 601)
    for buckets, distance in [(32, 128), (32, 20), (10, 9), (16, 64), (33, 50), (4, 7), (64, 1000)]:
        ref = T5Attention._relative_position_bucket(torch.from_numpy(rp), True, buckets, distance).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rp, buckets, distance), ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_parity(references, ours_fp32, name):
    _, _, ids, expected, _ = references[name]
    ours = ours_fp32[name]
    err = rel_err(ours, expected)
    print(f"{name}: rel err {err:.2e}, max abs {np.abs(ours - expected).max():.2e}")
    assert ours.shape == expected.shape == (*ids.shape, CONFIGS[name]["arch"]["d_model"])
    assert err <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_close_and_finite(references, name):
    folder, _, ids, expected, _ = references[name]
    model = load_t5_encoder(folder, dtype="bfloat16", progress=False)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(model)))
    ours = np.asarray(_forward(model, ids))
    assert ours.dtype == jnp.bfloat16
    ours = ours.astype(np.float32)
    err = rel_err(ours, expected)
    print(f"{name} bf16: rel err {err:.2e}")
    assert np.isfinite(ours).all()
    assert err <= 3e-2


def test_bf16_residual_stream(tmp_path):
    """A deep encoder whose residual stream carries a large channel (T5 v1.1 grows such outlier
    features): with the residual stream in float32 (our default) the bf16 error on the other channels
    is well below transformers-style bf16 adds (residual_dtype="compute")."""
    arch = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=12, num_heads=4, feed_forward_proj="gated-gelu")
    ref = _save_random_t5(tmp_path, **arch)
    with torch.no_grad():
        ref.shared.weight[:, 7] += 300.0
    ref.save_pretrained(tmp_path)
    ids = np.random.default_rng(1).integers(0, 50, (2, 48))
    others = lambda y: np.delete(np.asarray(y, np.float32), 7, axis=-1)  # noqa: E731
    expected = others(_torch_forward(ref, ids))
    errs = {}
    for residual in ("float32", "compute"):
        model = load_t5_encoder(tmp_path, dtype="bfloat16", residual_dtype=residual, progress=False)
        errs[residual] = rel_err(others(_forward(model, ids)), expected)
    print(f"bf16 rel err off the outlier channel: {errs}")
    assert errs["float32"] < 0.75 * errs["compute"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_checkpoint_loads(references, ours_fp32, name):
    _, sharded, ids, _, _ = references[name]
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) == 2 and os.path.exists(os.path.join(sharded, "model.safetensors.index.json")), files
    ours = np.asarray(_forward(load_t5_encoder(sharded, progress=False), ids))
    np.testing.assert_array_equal(ours, ours_fp32[name])


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
    return copy_checkpoint(src, dst, "model.safetensors", edit_tensors, edit_config)


def test_embedding_key_variants(references, ours_fp32, tmp_path):
    """save_pretrained writes only `shared.weight`; a checkpoint with only `encoder.embed_tokens.weight`
    loads the same; with both (and different values) we use `encoder.embed_tokens`, as transformers does."""
    from safetensors.torch import load_file
    from transformers import T5EncoderModel

    folder, _, ids, expected, _ = references["relu_odd"]
    assert {"shared.weight", "encoder.embed_tokens.weight"} & set(load_file(f"{folder}/model.safetensors")) == {
        "shared.weight"
    }

    def rename(t):
        t["encoder.embed_tokens.weight"] = t.pop("shared.weight")

    only_embed = _copy_with(folder, tmp_path / "embed_only", edit_tensors=rename)
    np.testing.assert_array_equal(np.asarray(_forward(load_t5_encoder(only_embed, progress=False), ids)),
                                  ours_fp32["relu_odd"])

    def both(t):
        t["encoder.embed_tokens.weight"] = t["shared.weight"].flip(0).contiguous()  # same shape, other rows

    both_keys = _copy_with(folder, tmp_path / "both", edit_tensors=both)
    ref_both = _torch_forward(T5EncoderModel.from_pretrained(both_keys).eval(), ids)
    ours_both = np.asarray(_forward(load_t5_encoder(both_keys, progress=False), ids))
    assert rel_err(ref_both, expected) > 0.1  # the two tables really differ
    assert rel_err(ours_both, ref_both) <= 1e-5

    def both_misshaped(t):
        t["encoder.embed_tokens.weight"] = torch.zeros(3, 40)

    bad = _copy_with(folder, tmp_path / "both_bad", edit_tensors=both_misshaped)
    with pytest.raises(CheckpointError, match=r"shape mismatches: encoder\.embed_tokens\.weight \(checkpoint \[3, 4"):
        load_t5_encoder(bad, progress=False)
    neither = _copy_with(folder, tmp_path / "neither", edit_tensors=lambda t: t.pop("shared.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: shared\.weight"):
        load_t5_encoder(neither, progress=False)


def test_mesh_sharded_load_matches_single_device(references, ours_fp32):
    folder, sharded, ids, _, _ = references["v1_1_long"]
    mesh = make_mesh(fsdp=8)
    model = load_t5_encoder(sharded, mesh=mesh, progress=False)
    spec = model.blocks[0].ff.wo.kernel[...].sharding.spec
    assert tuple(spec) == (None, "fsdp"), spec
    assert tuple(model.embed_tokens.embedding[...].sharding.spec) == (None, "fsdp")
    report = sharding_report(nnx.state(model))
    cfg = model.cfg
    # Replicated: the RMS-norm weights and the [buckets, heads] bias table, nothing else.
    norms = (2 * cfg.num_layers + 1) * cfg.d_model + cfg.relative_attention_num_buckets * cfg.num_heads
    assert report["replicated_bytes"] == 4 * norms
    ours = np.asarray(_forward(model, ids))  # batch 2 < 8 devices: ids replicated, parameters sharded
    single = ours_fp32["v1_1_long"]
    err, max_abs = rel_err(ours, single), np.abs(ours - single).max()
    print(f"fsdp=8 vs single device: rel err {err:.2e}, max abs {max_abs:.2e}; {report}")
    # Only the summation order differs (contractions over d_model are split across 8 devices).
    assert err <= 1e-6 and max_abs <= 5e-6


def test_full_size_param_count_and_replicated_bytes():
    cfg = T5Config(**PRESETS["t5-v1_1-xxl"])
    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))  # shapes only, nothing allocated
    state = nnx.state(abstract, nnx.Param)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    assert sum(math.prod(v.shape) for v in leaves) == 4_762_310_656
    assert len(leaves) == len(jax.tree.leaves(nnx.state(abstract)))  # every leaf is a parameter

    shardings = jax.tree.leaves(state_shardings(state, make_mesh(fsdp=8)))
    replicated = per_device = 0
    for v, s in zip(leaves, shardings, strict=True):
        shard = math.prod(s.shard_shape(v.shape)) * v.dtype.itemsize
        per_device += shard
        replicated += shard if s.is_fully_replicated else 0
    print(f"t5-v1_1-xxl fp32 on fsdp=8: {replicated} replicated bytes, {per_device / 2**30:.2f} GiB per device")
    assert replicated == 4 * ((2 * 24 + 1) * 4096 + 32 * 64)  # 811,008: norms and the bias table only


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_roundtrip_loads_in_transformers(references, ours_fp32, tmp_path, name):
    from transformers import T5EncoderModel

    folder, _, ids, expected, _ = references[name]
    model = load_t5_encoder(folder, progress=False)
    out = save_t5_encoder(model, tmp_path / "export")
    reloaded = T5EncoderModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(_torch_forward(reloaded, ids), expected)
    assert read_config(out) == model.cfg
    with pytest.raises(FileExistsError):
        save_t5_encoder(model, out)


# ---------------------------------------------------------------- bad checkpoints and configs


def test_missing_key_is_named(references, tmp_path):
    folder = references["v1_1_long"][0]
    bad = _copy_with(folder, tmp_path / "m",
                     edit_tensors=lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wi_1.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1"):
        load_t5_encoder(bad, progress=False)


def test_wrong_shape_is_named(references, tmp_path):
    folder = references["v1_1_long"][0]

    def edit(t):
        t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(16, 4)

    bad = _copy_with(folder, tmp_path / "s", edit_tensors=edit)
    with pytest.raises(CheckpointError, match=r"shape mismatches: encoder\.block\.0\.layer\.0\.SelfAttention\."
                                              r"relative_attention_bias\.weight \(checkpoint \[16, 4\]"):
        load_t5_encoder(bad, progress=False)


def test_wrong_config_is_named(references, tmp_path):
    folder = references["v1_1_long"][0]
    wrong_class = _copy_with(folder, tmp_path / "c", edit_config=lambda c: c.update(architectures=["BertModel"]))
    with pytest.raises(CheckpointError, match="describes a BertModel, not a transformers T5EncoderModel"):
        load_t5_encoder(wrong_class, progress=False)
    fewer_layers = _copy_with(folder, tmp_path / "l", edit_config=lambda c: c.update(num_layers=2))
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.block\.2\."):
        load_t5_encoder(fewer_layers, progress=False)
    silu = _copy_with(folder, tmp_path / "f", edit_config=lambda c: c.update(feed_forward_proj="gated-silu"))
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-silu' is not supported"):
        load_t5_encoder(silu, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_t5_encoder(tmp_path / "nowhere", progress=False)


def test_pipeline_root_resolves_text_encoder_3(references, tmp_path):
    import shutil

    folder = references["relu_odd"][0]
    shutil.copytree(folder, tmp_path / "pipeline" / "text_encoder_3")
    assert load_t5_encoder(tmp_path / "pipeline", progress=False).cfg == load_t5_encoder(folder, progress=False).cfg


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="overflow float16"):
        T5Config(dtype="float16")
    with pytest.raises(ValueError, match="max_distance=8 must exceed"):
        T5Config(relative_attention_num_buckets=32, relative_attention_max_distance=8)
