"""LoRA students and fake scores over one shared frozen base (`distill.adapters`, `models.lora`):
exact at step 0, only adapters train, one copy of the base in the state, the toy's grid samples
base + adapters, and bad targets named before any weight is read (sharded == single device:
tests/integration/test_sharded_rounds.py; exact resume: tests/integration/test_resume_exact.py). The
smoke config's random MMDiT is scanned and rematerialised, as the shipped configs run it."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpdmd_jax.backbones.sd3 import SD3Backbone
from dpdmd_jax.config import ConfigError
from dpdmd_jax.core import Adapted
from dpdmd_jax.distill import adapters
from dpdmd_jax.eval.grid import image_grid
from dpdmd_jax.eval.toy import ToyGrid
from dpdmd_jax.run import train as run_train
from tests.helpers import train_rounds
from tests.unit.test_trainer import smoke

ROUNDS = 2


def lora_smoke(**overrides):
    return smoke(**{"student.lora.rank": 4, "fake.lora.rank": 2, "fake.lora.alpha": 4.0, "mesh.fsdp": 1,
                    "model.scan_layers": True, "model.remat_policy": "full", "evals": {}, **overrides})


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def rounds(c, devices, n=ROUNDS):
    run, (start, _), state, history, _ = train_rounds(c, devices, n)
    return run, start, state, history


@pytest.fixture(scope="module")
def single():
    c = lora_smoke(**{"model.teacher_dtype": "bfloat16"})  # the :lora variant's bf16 base (fp32 compute here)
    run, (start, frozen), state, history, _ = train_rounds(c, jax.devices()[:1], ROUNDS)
    return run, frozen.teacher, start, state, history


def _flat(state) -> dict[tuple, jax.Array]:
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def test_adapters_sit_on_the_default_targets_of_every_scanned_block(single):
    run, *_ = single
    names = adapters.module_names(run.backbone, run.teacher_model)
    chosen, problems = adapters.select(names, SD3Backbone.lora_targets, "t")
    kinds = {n.split(".", 2)[-1] for p in chosen for n in names[p]}
    assert not problems and {"attn.to_q", "attn.add_k_proj", "ff.net.0.proj", "ff_context.net.2"} <= kinds
    assert not kinds & {"proj_out", "context_embedder", "norm1.linear"}
    kernels = _flat(run.frozen.teacher)
    for role, rank in (("student", 4), ("fake", 2)):
        flat = _flat(run.distiller.adapters[role][1])
        assert set(flat) == {(*p, "lora", w) for p in chosen for w in "ab"}
        for p in chosen:  # A (..., in, r), B (..., r, out), stacked like the scanned kernel
            *lead, n_in, n_out = kernels[(*p, "kernel")].shape
            assert flat[(*p, "lora", "a")].shape == (*lead, n_in, rank)
            assert flat[(*p, "lora", "b")].shape == (*lead, rank, n_out)
        assert any(len(kernels[(*p, "kernel")].shape) == 3 for p in chosen)  # scanned blocks adapted


def test_lora_student_and_fake_equal_the_teacher_at_step_0(single):
    """B = 0: the adapted networks compute the teacher's prediction (the branch adds 0.0). Two
    programs, so to float rounding: XLA may fuse the base matmul with the branch's add and emit it
    differently (bit for bit under XLA:CPU's fusion emitters, a few ulps under the tests' LLVM
    emitters); a branch that were not zero would move the output by orders of magnitude more."""
    run, _, start, _, _ = single
    d, frozen = run.distiller, run.frozen
    rng = np.random.default_rng(0)
    cond = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), run.backbone.cond_spec(2))
    z = jnp.asarray(rng.standard_normal((2, *d.latent_shape)), jnp.float32)
    level = jnp.asarray([0.9, 0.3])
    predict = jax.jit(d.predict)
    ref = np.asarray(predict(frozen.teacher, frozen.buffers, z, level, cond))
    for role in adapters.ROLES:
        weights = d.weights(role, getattr(start, role), frozen)
        assert isinstance(weights, Adapted)
        assert any(np.any(x != 0) for x in jax.tree.leaves(getattr(start, role)))  # A is drawn...
        b = [x for p, x in _flat(getattr(start, role)).items() if p[-1] == "b"]
        assert b and all(not np.any(x) for x in b)  # ... B is zero
        ours = np.asarray(predict(weights, frozen.buffers, z, level, cond))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
        # The same comparison sees a branch that adds anything: B = 1e-3 moves the output visibly.
        nudged = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 1e-3 if any(getattr(k, "key", None) == "b" for k in p) else x, getattr(start, role))
        moved = np.asarray(predict(d.weights(role, nudged, frozen), frozen.buffers, z, level, cond))
        assert np.abs(moved - ref).max() > 100 * 1e-6 * np.abs(ref).max()


def test_rounds_train_only_the_adapters_and_the_state_holds_no_copy_of_the_base(single):
    run, base, start, state, history = single
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(run.frozen.teacher), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base, bit for bit
    for role in adapters.ROLES:
        before, after = _flat(getattr(start, role)), _flat(getattr(state, role))
        still = {p[:-2] for p in before if np.array_equal(before[p], np.asarray(after[p]))}
        # Every adapter was updated but the last block's context queries': that block's context output
        # is discarded, so its add_q_proj is never computed (models.mmdit) and gets no gradient.
        assert still == {("block_stacks", 1, "layers", "attn", "add_q_proj")}, (role, still)
    assert all(np.isfinite(v) for h in history for v in h.values())
    # Trained state = adapters + Adam's two moments of each; the base lives once, in `frozen`.
    lora_bytes = nbytes(state.student) + nbytes(state.fake)
    params_in_state = nbytes((state.student, state.fake, state.opt_student, state.opt_fake))
    assert lora_bytes * 3 <= params_in_state <= lora_bytes * 3 + 1024  # + counters
    assert {x.dtype for x in jax.tree.leaves(run.frozen.teacher)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves((state.student, state.fake))} == {jnp.dtype(jnp.float32)}
    assert lora_bytes < nbytes(run.frozen.teacher)
    assert not any(x.shape == y.shape and x.ndim >= 2 for x in jax.tree.leaves(state.student)
                   for y in jax.tree.leaves(run.frozen.teacher))


def test_the_toy_grid_samples_base_plus_adapters(single):
    """The toy's TensorBoard grid (`eval.toy.ToyGrid`, every `log_every` rounds of a toy run) samples the
    student as the base plus its adapters: at step 0 the teacher's images, after training others."""
    run, _, start, state, _ = single
    toy_grid = ToyGrid(run, "unused", seeds=2)
    teacher = np.asarray(toy_grid._sample(run.frozen.teacher, run.frozen.buffers).addressable_data(0))
    at_start = toy_grid.grid(start)
    np.testing.assert_allclose(at_start, image_grid(teacher, cols=2), rtol=0, atol=1e-5)
    assert np.abs(toy_grid.grid(state) - at_start).max() > 1e-3


def test_unknown_target_is_named_before_any_weight_is_read(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(SD3Backbone, "load", refuse)
    c = lora_smoke(**{"student.lora.targets": ("to_q", "attn.to_qq")})
    with pytest.raises(ConfigError) as e:
        run_train.train(c, str(tmp_path / "w"))
    message = str(e.value)
    assert "student.lora.targets: 'attn.to_qq' names no linear layer" in message
    assert "transformer_blocks.N.attn.to_q" in message and "'to_q'" not in message
    assert not (tmp_path / "w").exists()


def test_a_target_that_splits_a_scanned_stack_is_refused():
    names = {("stack", "to_q"): ("blocks.0.to_q", "blocks.1.to_q"), ("proj",): ("proj",)}
    assert adapters.select(names, ("to_q",), "f") == ([("stack", "to_q")], [])
    chosen, problems = adapters.select(names, ("blocks.1.to_q",), "f")
    assert chosen == [] and "selects some layers of the scanned stack" in problems[0]


def test_bf16_teacher_under_fp32_full_fine_tuning():
    """model.teacher_dtype=bfloat16: the frozen teacher is stored in bf16; student and fake start as
    its fp32 upcast and train in fp32."""
    c = smoke(**{"model.teacher_dtype": "bfloat16", "mesh.fsdp": 1, "evals": {}, "backbone": "tiny_flow",
                 "data.kind": "random"})
    run, start, state, history = rounds(c, jax.devices()[:1], n=1)
    assert {x.dtype for x in jax.tree.leaves(run.frozen.teacher)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.student)} == {jnp.dtype(jnp.float32)}
    for s, t in zip(jax.tree.leaves(start.student), jax.tree.leaves(run.frozen.teacher), strict=True):
        np.testing.assert_array_equal(np.asarray(s), np.asarray(t).astype(np.float32))
    assert all(np.isfinite(v) for v in history[0].values())
