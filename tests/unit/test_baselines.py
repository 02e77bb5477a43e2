"""The paper's baselines in the engine (issue 22): DMD v1's regression to the teacher's sample and
DMD2's GAN (a classifier head on the fake score's features). The losses' gradients and signs by
hand; each GAN term reaches only the parameters it should; weight 0 is the plain round, program
and numbers; the features stop inside scanned, rematerialised stacks as the shipped configs run
them; bad settings are named before anything loads. All on the tiny backbones, 1-2 rounds. (Sharded
GAN rounds equal one device's: tests/integration/test_sharded_rounds.py; an interrupted GAN run
resumes exactly: tests/integration/test_resume_exact.py.)"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import sdxl as sdxl_config
from configs import toy as toy_config
from dpdmd_jax import backbones
from dpdmd_jax.config import override
from dpdmd_jax.core import Frozen
from dpdmd_jax.distill import losses
from dpdmd_jax.distill.step import Distiller
from dpdmd_jax.models import gan_head
from dpdmd_jax.models.layers import layer_norm, modulate
from dpdmd_jax.models.unet import UNet2DConditionModel
from dpdmd_jax.parallel.mesh import make_mesh
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run.preflight import config_problems, run_problems, validate
from dpdmd_jax.toy.teacher import toy_unet_config
from dpdmd_jax.weights.sd3 import load_mmdit
from tests.helpers import save_random_mmdit, train_rounds

KEY = jax.random.key(5)
B = 4


def gan_config(**overrides):
    """DP-DMD + GAN (+ regression) on the tiny flow backbone with the toy's real images as the real side.

    The head is 64 wide: 32 GroupNorm groups of 2 channels, as SDXL's (1280 / 32 = 40 a group). At the
    features' own width (16 here) every group is one channel, each norm subtracts its channel's own
    mean, and the convolutions' biases before them get a gradient that is zero but for rounding. Adam
    turns that rounding into steps of about the learning rate whose signs follow the order of the
    reductions, so those biases differ between a sharded and a one-device run (seen on an AMD EPYC:
    2.9e-6 where the values are ~1e-6), while every parameter that learns agrees to 5e-7."""
    c = override(toy_config.get_config("smoke"), {
        "backbone": "tiny_flow", "model.source": "random", "data.kind": "toy", "data.latent_size": (16, 16),
        "mesh.fsdp": 1, "evals": {}, "gan.weight": 0.5, "regression.weight": 0.25, "gan.head_width": 64,
        **overrides})
    validate(c)
    return c


# ---------------------------------------------------------------------------- the losses


def test_regression_gradient_is_the_analytic_l2_one():
    """d/dx mean((x - t)^2) = 2 (x - t) / N, by hand on a 2 x 3 case; the target gets none."""
    x = jnp.asarray([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    t = jnp.asarray([[0.0, 0.0, 1.5], [2.0, 1.0, -1.0]])
    loss, (gx, gt) = jax.value_and_grad(losses.regression_loss, argnums=(0, 1))(x, t)
    assert float(loss) == pytest.approx((1 + 4 + 1 + 4 + 4 + 0) / 6)
    np.testing.assert_allclose(np.asarray(gx), [[1 / 3, -2 / 3, -1 / 3], [-2 / 3, 2 / 3, 0.0]], rtol=1e-6)
    assert np.all(np.asarray(gt) == 0.0)


def test_gan_losses_have_the_right_signs():
    up, down = jnp.full((3,), 4.0), jnp.full((3,), -4.0)
    cls = losses.gan_classifier_loss
    # A classifier that calls reals real and fakes fake has the low loss; at logits 0 it is 2 log 2.
    assert float(cls(up, down)) < 0.04 < float(cls(down, up))
    assert float(cls(jnp.zeros(3), jnp.zeros(3))) == pytest.approx(2 * np.log(2))
    g_real, g_fake = jax.grad(cls, argnums=(0, 1))(jnp.zeros(3), jnp.zeros(3))
    assert np.all(np.asarray(g_real) < 0) and np.all(np.asarray(g_fake) > 0)  # descent: reals up, fakes down
    gen = losses.gan_generator_loss
    assert float(gen(up)) < float(gen(down))  # the student wants its samples called real
    g = np.asarray(jax.grad(gen)(jnp.full((2,), -10.0)))
    np.testing.assert_allclose(g, -0.5, rtol=1e-4)  # non-saturating: full slope while called fake


def test_head_strides_keep_every_groupnorm_over_several_positions():
    """DMD2 halves its grid to 1x1; a GroupNorm of one channel per group on a 1x1 grid outputs 0 for any
    input, so the head strides only while both sides stay >= 2 and tells inputs apart on small grids."""
    assert [gan_head.strides(g) for g in ((16, 16), (8, 8), (4, 4), (2, 2), (4, 8))] == [
        (2, 2), (2, 2), (2, 1), (1, 1), (2, 1)]
    head = gan_head.GanHead((4, 4), 16, 16, rngs=nnx.Rngs(0))
    logits = np.asarray(head(jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 4, 16)), jnp.float32)))
    assert logits.shape == (3,) and np.all(np.abs(logits) > 1e-3) and len(set(logits.round(6))) == 3


# ---------------------------------------------------------------------------- where the GAN terms reach


@pytest.fixture(scope="module")
def parts():
    """A Distiller with the GAN on the tiny flow backbone, a student and a fake score that differ from
    the teacher, a fresh head, and a batch with real toy images."""
    c = gan_config()
    bb = backbones.get(c)
    graphdef, params, buffers = nnx.split(bb.load(make_mesh(devices=jax.devices()[:1])), nnx.Param, ...)
    d = Distiller(c, bb, graphdef, anchor_k=2)
    rng = np.random.default_rng(0)
    shift = lambda seed: jax.tree.map(
        lambda p: p + 0.05 * jnp.asarray(np.random.default_rng(seed).standard_normal(p.shape), p.dtype), params)
    cond = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), bb.cond_spec(B))
    eps = jnp.asarray(rng.standard_normal((B, *d.latent_shape)), jnp.float32)
    real = jnp.asarray(np.clip(rng.standard_normal((B, *d.latent_shape)), -1, 1), jnp.float32)
    disc = d.init_head(params, buffers, jax.random.key(1))
    return d, shift(1), shift(2), disc, Frozen(params, buffers), eps, cond, backbones.uncond_zeros(bb, B), real


def _largest(tree) -> float:
    return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))


def test_generator_gan_term_moves_only_the_student(parts):
    d, student, fake, disc, frozen, eps, cond, uncond, _ = parts

    def gan_term(s, f, h):
        return d.generator_loss(s, f, frozen, eps, cond, uncond, KEY, h)[1]["loss_gan_gen"]

    g_student, g_fake, g_disc = jax.jit(jax.grad(gan_term, argnums=(0, 1, 2)))(student, fake, disc)
    assert _largest(g_student) > 0
    assert _largest(g_fake) == 0.0 and _largest(g_disc) == 0.0


def test_generator_loss_adds_the_weighted_regression_to_the_teachers_sample(parts):
    """loss_reg = mean |x - teacher's T-step sample from the same eps|^2, x the sample the DMD loss acts on;
    the generator's loss is the weighted sum of its parts."""
    d, student, fake, disc, frozen, eps, cond, uncond, _ = parts

    def parts_and_x(s):
        loss, aux = d.generator_loss(s, fake, frozen, eps, cond, uncond, KEY, disc)
        k_sim, _ = jax.random.split(KEY)
        _, z1 = d.first_step(s, frozen.buffers, eps, cond, k_sim)
        return loss, aux, d.remaining_steps(s, frozen.buffers, eps, z1, cond, k_sim)

    loss, aux, x = jax.jit(parts_and_x)(student)
    target = np.asarray(d.teacher_sample(frozen.teacher, frozen.buffers, eps, cond, uncond), np.float64)
    np.testing.assert_allclose(float(aux["loss_reg"]), np.mean((np.asarray(x, np.float64) - target) ** 2), rtol=1e-5)
    c = d.c
    total = (aux["loss_dmd"] + c.distill.lambda_div * aux["loss_div"] + c.regression.weight * aux["loss_reg"]
             + c.gan.weight * aux["loss_gan_gen"])
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-6)


def test_classifier_term_trains_fake_and_head_but_not_the_student(parts):
    d, student, fake, disc, frozen, eps, cond, uncond, real = parts

    def cls_term(fake_and_head, s):
        return d.critic_gan_loss(fake_and_head, s, frozen, eps, cond, uncond, real, KEY)[1]["loss_gan_cls"]

    (g_fake, g_disc), g_student = jax.jit(jax.grad(cls_term, argnums=(0, 1)))((fake, disc), student)
    assert _largest(g_fake) > 0 and _largest(g_disc) > 0
    assert _largest(g_student) == 0.0


# ---------------------------------------------------------------------------- rounds


def test_weight_zero_is_the_plain_round_program_and_numbers():
    """gan.weight = regression.weight = 0 with every other GAN / regression knob moved: the same
    initial state and the same round program as the default config (so the same numbers bit for bit:
    one program on the same inputs), no head in the state."""
    plain = override(toy_config.get_config("smoke"), {"backbone": "tiny_flow", "model.source": "random",
                                                      "data.kind": "random", "mesh.fsdp": 1, "evals": {}})
    off = override(plain.copy_and_resolve_references(), {
        "gan.weight": 0.0, "regression.weight": 0.0, "gan.cls_weight": 0.5, "gan.real": "teacher",
        "gan.block": 0, "gan.head_width": 8})
    texts, states = [], []
    for c in (plain, off):
        run = setup_lib.build(c, devices=jax.devices()[:1])
        state, shardings = setup_lib.init_train_state(run)
        fn = setup_lib.compile_round(run, shardings)
        texts.append(fn.lower(state, run.frozen, setup_lib.round_batch(run, 0)).as_text())  # traced, not compiled
        states.append(state)
    assert texts[0] == texts[1]
    a, b = states
    assert a.disc is None and a.opt_disc is None and b.disc is None
    # No node for the absent head: the tree (and so a checkpoint's layout) of a state from before the GAN.
    top = {jax.tree_util.keystr(path[:1]) for path, _ in jax.tree_util.tree_flatten_with_path(a)[0]}
    assert top == {".step", ".rng", ".student", ".fake", ".opt_student", ".opt_fake"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def single():
    # One round (M = 2 critic updates train the head): at the suite's -O0 codegen the head's strided-conv
    # gradients run ~20x slower than optimised code, 4.4 s a round (2.1 s to compile it).
    return train_rounds(gan_config(), jax.devices()[:1], rounds=1)


def test_gan_rounds_train_the_head_on_real_toy_images(single):
    run, (start, _), state, history, _ = single
    batch = setup_lib.round_batch(run, 0)
    assert batch.real.shape == (3, 8, 16, 16, 3)  # [M + 1, B, H, W, C], aligned with the conditionings
    assert float(batch.real.min()) == -1.0 and float(batch.real.max()) == 1.0  # the toy's [-1, 1] images
    np.testing.assert_array_equal(np.asarray(run.data.round(0, slice(2, 5)).real), np.asarray(batch.real)[:, 2:5])
    assert {"loss_gan_gen", "loss_gan_cls", "loss_reg", "grad_norm_disc"} <= set(history[0])
    assert all(np.isfinite(v) for h in history for v in h.values())
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(start.disc), jax.tree.leaves(state.disc), strict=True)]
    assert all(moved) and int(state.opt_disc.total_notfinite) == 0


# ---------------------------------------------------------------------------- features of the shipped settings


def test_mmdit_features_stop_inside_a_scanned_rematerialised_stack(tmp_path):
    """Blocks (0 | 1 2 | 3): block 1 ends inside the scanned stack of 1..2. The scanned, remat'd
    features (and their gradient) equal a hand loop over the unscanned blocks; block -1 through the
    output layers is the model's own output; stopping early costs fewer FLOPs."""
    arch = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, num_attention_heads=2,
                attention_head_dim=8, caption_projection_dim=16, joint_attention_dim=8, pooled_projection_dim=8,
                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
    save_random_mmdit(tmp_path, **arch)
    scanned = load_mmdit(tmp_path, scan_layers=True, remat_policy="full", progress=False)
    plain = load_mmdit(tmp_path, progress=False)
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = (normal(2, 8, 8, 4), jnp.asarray([900.0, 200.0]), normal(2, 3, 8), normal(2, 8))

    def ours(m, z, *rest):
        # Merged afresh inside each transformation, as the round does (Distiller.predict): nnx.scan / remat
        # take only Variables of their own trace level.
        graphdef, state = nnx.split(m)
        f = lambda z, block: nnx.merge(graphdef, state, copy=True).features(z, *rest, block=block)
        return f(z, 1), f(z, -1), jax.grad(lambda z: jnp.sum(f(z, 1) ** 2))(z)

    def hand(m, z, *rest):
        def f(z, stop):
            h, c, temb = m._embed(z, *rest)
            for blk in m.transformer_blocks[:stop]:
                h, c = blk(h, c, temb)
            return h.reshape(2, 4, 4, -1)

        last = f(z, 4)
        scale, shift = m.norm_out(m._embed(z, *rest)[2])  # the output layers, as MMDiT.__call__ applies them
        out = m.proj_out(modulate(layer_norm(last.reshape(2, 16, -1), 1e-6), shift, scale))
        return f(z, 2), last, jax.grad(lambda z: jnp.sum(f(z, 2) ** 2))(z), out, m(z, *rest)

    f1, f_last, grad = jax.jit(ours)(scanned, *x)
    h1, h_last, h_grad, out, ref_out = jax.jit(hand)(plain, *x)
    assert f1.shape == (2, 4, 4, 16) and f_last.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(np.asarray(f1), np.asarray(h1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(f_last), np.asarray(h_last), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(h_grad), rtol=1e-4, atol=1e-5)
    unpatch = np.asarray(out).reshape(2, 4, 4, 2, 2, 4).transpose(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, 4)
    np.testing.assert_allclose(unpatch, np.asarray(ref_out), rtol=1e-5, atol=1e-6)
    flops = lambda f: jax.jit(f).lower(scanned, *x).cost_analysis()["flops"]
    assert flops(lambda m, *a: m.features(*a, block=1)) < flops(lambda m, *a: m(*a))


def test_unet_features_are_the_mid_block_output_under_scan_and_remat():
    cfg = toy_unet_config(scan_layers=True, remat_policy="full")
    model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = (normal(2, 16, 16, 3), jnp.asarray([900, 100]), normal(2, 4, 32), normal(2, pooled),
         jnp.asarray(np.tile([16.0, 16.0, 0.0, 0.0, 16.0, 16.0], (2, 1)), jnp.float32))

    def hand(m, z, t, ctx, text, ids):
        temb = m.time_embed(t, text, ids)
        h = m.conv_in(z)
        for blk in m.down_blocks:
            h, _ = blk(h, temb, ctx)
        return m.mid_block(h, temb, ctx)

    def ours(m, z, *rest):
        graphdef, state = nnx.split(m)
        f = lambda z: nnx.merge(graphdef, state, copy=True).features(z, *rest)
        return f(z), jax.grad(lambda z: jnp.sum(f(z) ** 2))(z)

    feats, grad = jax.jit(ours)(model, *x)
    assert feats.shape == (2, 8, 8, 32)
    np.testing.assert_allclose(np.asarray(feats), np.asarray(jax.jit(hand)(model, *x)), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
    flops = lambda f: jax.jit(f).lower(model, *x).cost_analysis()["flops"]
    assert flops(lambda m, *a: m.features(*a)) < flops(lambda m, *a: m(*a))


# ---------------------------------------------------------------------------- validation


def test_bad_baseline_settings_are_named_before_anything_loads():
    dmd2 = sdxl_config.get_config("dmd2")
    assert (dmd2.distill.lambda_div, dmd2.gan.weight, dmd2.gan.cls_weight, dmd2.dmd.simulation,
            dmd2.dmd.real_cfg_scale, dmd2.distill.fake_updates_per_student) == (0.0, 5e-3, 1e-2, "backward", 8.0, 5)
    [problem] = [p for p in config_problems(dmd2) if p.startswith("gan.")]
    assert "embedding_cache --images=FOLDER" in problem and "--config.gan.real=teacher" in problem
    assert not [p for p in config_problems(override(dmd2, {"gan.real": "teacher"})) if p.startswith("gan.")]
    # LPIPS compares VAE-decoded images: the toy has no VAE, and the two weight files are named.
    lpips = override(toy_config.get_config("regression"), {"regression.distance": "lpips",
                                                            "regression.lpips_heads": "/nowhere/vgg_v01.safetensors"})
    assert config_problems(lpips) == []
    assert [p for p in run_problems(lpips, check_mesh=False) if "regression" in p] == [
        "the samples of regression.distance='lpips' decode with a pipeline's VAE, and model.source='toy' has "
        "none: set --config.text.source to a pipeline folder, or use regression.distance='l2' (on the toy the "
        "latents are the images).",
        "regression.distance='lpips' needs --config.regression.vgg: torchvision's VGG16 state dict as "
        ".safetensors (python -m dpdmd_jax.weights.lpips IN.pth OUT.safetensors).",
        "regression.lpips_heads='/nowhere/vgg_v01.safetensors' does not exist (the lpips package's "
        "weights/v0.1/vgg.pth as .safetensors)."]
    negative = override(lpips, {"regression.image_size": -1})
    assert "regression.image_size=-1 must be" in " ".join(config_problems(negative))
    assert "data.latent_size=(16, 16)" in " ".join(config_problems(toy_config.get_config("smoke,gan")))
    # The MMDiT's depth is read from its config only (here the smoke config's 2-layer random MMDiT).
    deep = override(toy_config.get_config("smoke,gan"), {"gan.real": "teacher", "gan.block": 2})
    assert any(p.startswith("gan.block=2 is not a joint block of this 2-layer MMDiT")
               for p in run_problems(deep, check_mesh=False))
    for arg, lam in (("gan", 0.05), ("dmd,gan", 0.0)):  # DP-DMD + GAN and DMD + GAN
        c = toy_config.get_config(arg)
        validate(c)
        assert (c.gan.weight, c.gan.real, c.distill.lambda_div) == (5e-3, "data", lam)
