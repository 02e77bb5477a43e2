"""DMD v1's LPIPS regression (regression.distance="lpips") on the tiny SD3 pipeline: the distance the
round takes is the `lpips` package's LPIPS between the two latents decoded by diffusers' VAE of the
same pipeline and resized as `torch.nn.functional.interpolate` does (random VGG16 trunk, lpips'
shipped v0.1 heads: tests/parity/test_lpips.py); its gradient reaches the student's sample only;
and a round of configs/sd35.py:tiny (scan, full remat) with the term trains, the term in its loss."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import jax
import jax.numpy as jnp
import lpips
import numpy as np
import pytest
import torch

from configs import sd35 as sd35_config
from dpdmd_jax.config import override
from dpdmd_jax.eval import samples as eval_samples
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.weights.lpips import convert_pth
from tests.helpers import train_rounds
from tests.parity.test_lpips import LIN_PTH, _vgg16_features
from tests.torch_helpers import nchw, rel_err

# The tiny VAE decodes 8 x 8 latents to 16 x 16 images; LPIPS sees them upsampled to 40 x 40.
IMAGE_SIZE = 40


@pytest.fixture(scope="module")
def case(tiny_sd3_pipeline, tmp_path_factory):
    root, pipe = tiny_sd3_pipeline
    folder = tmp_path_factory.mktemp("lpips_regression")
    features = _vgg16_features(seed=1)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, folder / "vgg16.pth")
    c = override(sd35_config.get_config("tiny"), {
        "model.source": root, "data.kind": "random", "evals": {}, "num_rounds": 1,
        "regression.weight": 0.25, "regression.distance": "lpips", "regression.image_size": IMAGE_SIZE,
        "regression.vgg": convert_pth(folder / "vgg16.pth", folder / "vgg16.safetensors"),
        "regression.lpips_heads": convert_pth(LIN_PTH, folder / "lin.safetensors")})
    with mock.patch.object(lpips.pretrained_networks.tv, "vgg16", lambda **_: SimpleNamespace(features=features)):
        ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    return SimpleNamespace(config=c, pipe=pipe, ref=ref)


def _torch_distance(case, x, y) -> float:
    vae = case.pipe.vae

    def image(z):
        z = nchw(z) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z).sample
        return torch.nn.functional.interpolate(img, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                               align_corners=False)

    with torch.no_grad():
        return float(case.ref(image(x), image(y)).mean())


def test_the_distance_is_lpips_between_the_vaes_decoded_samples(case):
    run = setup_lib.build(case.config, devices=jax.devices()[:1])
    d, frozen = run.distiller, run.frozen
    assert frozen.perceptual is not None
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.standard_normal((2, *d.latent_shape)), jnp.float32) for _ in range(2))
    value, (gx, gy) = jax.jit(jax.value_and_grad(d.regression_distance, argnums=(1, 2)))(frozen, x, y)
    assert rel_err(value, _torch_distance(case, np.asarray(x), np.asarray(y))) <= 1e-5
    # The student's side is differentiated, the teacher's sample is a target.
    assert np.abs(np.asarray(gx)).max() > 0 and not np.any(np.asarray(gy))
    assert float(jax.jit(d.regression_distance)(frozen, x, x)) == 0.0
    # A sample grid of such a run decodes with this VAE (float32) instead of loading a second copy.
    assert eval_samples._vae(run, "float32")[1] is frozen.perceptual.vae


def test_a_round_with_the_lpips_regression_trains(case):
    _, _, _, history, _ = train_rounds(case.config, jax.devices()[:1], rounds=1)
    (m,) = history
    c = case.config
    assert np.isfinite(m["loss_reg"]) and m["loss_reg"] > 0
    np.testing.assert_allclose(m["loss"], m["loss_dmd"] + c.distill.lambda_div * m["loss_div"]
                               + c.regression.weight * m["loss_reg"], rtol=1e-5)
