"""MMDiT on an 8-device CPU mesh: parameters really sharded, sharded forward == single device. The
checkpoint is a random MMDiT written by our exporter (tests.helpers.save_random_mmdit): loading
diffusers' own checkpoints is tests/parity/test_mmdit.py's."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from dpdmd_jax.parallel.mesh import batch_sharding, make_mesh, sharding_report
from dpdmd_jax.weights.sd3 import load_mmdit
from tests.helpers import save_random_mmdit

ARCH = dict(sample_size=8, patch_size=2, in_channels=8, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=16, out_channels=8,
            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shard")
    save_random_mmdit(folder, **ARCH)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 8, 8, 8), np.float32), np.linspace(1, 999, 8).astype(np.float32),
         rng.standard_normal((8, 6, 16), np.float32), rng.standard_normal((8, 16), np.float32))
    single = load_mmdit(folder, progress=False)
    return folder, x, np.asarray(jax.jit(lambda m, *a: m(*a))(single, *x))


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=4, tensor=1),
                                        dict(data=2, fsdp=2, tensor=2)])
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_sharded_forward_equals_single_device(ckpt, mesh_shape, scan):
    folder, x, expected = ckpt
    assert jax.device_count() == 8
    mesh = make_mesh(**mesh_shape)
    model = load_mmdit(folder, mesh=mesh, scan_layers=scan, progress=False)
    report = sharding_report(nnx.state(model))
    print(f"{mesh_shape} scan={scan}: {report}")
    # Every matrix is split; only vectors (biases on heads/mlp when tensor=1, RMSNorm scales) may
    # stay replicated: a few % of this tiny model, < 0.1% at full size (test below).
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        matrix_ndim = value.ndim - (path[0] == "block_stacks")  # scanned leaves have a layers axis
        if matrix_ndim >= 2 and max(value.shape) >= 8:
            assert not value.sharding.is_fully_replicated, path
    assert report["replicated_bytes"] < 0.05 * report["total_bytes"]
    min_split = min(n for n in (mesh.shape["fsdp"], mesh.shape["tensor"]) if n > 1)
    sharded = report["total_bytes"] - report["replicated_bytes"]
    assert report["per_device_bytes"] <= report["replicated_bytes"] + sharded / min_split
    kernel = model.context_embedder.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    inputs = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in x]
    out = jax.jit(lambda m, *a: m(*a))(model, *inputs)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=4, tensor=1)])
def test_full_size_sd35_medium_sharding_plan(mesh_shape):
    """Planned placement of the real SD3.5-Medium (shapes only): bytes per device and replicated."""
    from dpdmd_jax.models.mmdit import PRESETS, MMDiTConfig
    from dpdmd_jax.parallel.mesh import spec_for
    from dpdmd_jax.weights.sd3 import abstract_mmdit

    mesh = make_mesh(**mesh_shape)
    _, abstract = abstract_mmdit(MMDiTConfig(**PRESETS["sd3.5-medium"], param_dtype="bfloat16", scan_layers=True))
    total = replicated = per_device = 0
    for _, var in nnx.to_flat_state(abstract):
        value = var.get_value()
        spec = spec_for(value.shape, var.get_metadata().get("out_sharding"), mesh)
        nbytes = int(np.prod(value.shape)) * 2
        shards = int(np.prod([mesh.shape[a] for a in spec if a is not None]))
        total += nbytes
        per_device += nbytes // shards
        replicated += nbytes if shards == 1 else 0
    print(f"SD3.5-M bf16 on {mesh_shape}: total {total / 2**30:.2f} GiB, per device {per_device / 2**30:.3f} GiB, "
          f"replicated {replicated / 2**20:.2f} MiB ({100 * replicated / total:.3f}%)")
    shards = mesh.shape["fsdp"]
    assert per_device < 1.01 * total / shards
    assert replicated < 1e-3 * total


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_per_head_attention_equals_single_device(ckpt, mesh_shape, monkeypatch):
    """The CPU per-head attention path (lax.map over batch x heads, custom VJP), which big CPU runs
    take, gives the single-device XLA result under sharding, forward and input gradient."""
    from dpdmd_jax.models import layers

    folder, x, expected = ckpt
    single = load_mmdit(folder, progress=False)

    def loss(m, z, *rest):
        return (m(z, *rest) ** 2).mean()

    grad_fn = jax.jit(jax.grad(loss, argnums=1))
    expected_grad = np.asarray(grad_fn(single, *x))
    monkeypatch.setattr(layers, "CPU_PER_HEAD_MIN_LOGITS_BYTES", 0)  # every attention call goes per head
    mesh = make_mesh(**mesh_shape)
    model = load_mmdit(folder, mesh=mesh, progress=False)
    inputs = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in x]
    forward = jax.jit(lambda m, *a: m(*a))
    assert "stablehlo.while" in forward.lower(model, *inputs).as_text()  # the lax.map loop: really per head
    out = forward(model, *inputs)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_fn(model, *inputs)), expected_grad, rtol=1e-4, atol=1e-7)
