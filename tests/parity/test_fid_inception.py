"""FID: our NNX FID Inception against pytorch-fid's `fid_inception_v3` (random weights and BatchNorm
statistics, saved as the published state dict, converted, loaded), clean-fid's resize, pytorch-fid's
Frechet distance, the statistics files those tools write, and the errors on bad weights and folders.

One program is compiled for the whole file: `InceptionFeatures` at 299 x 299 (batch 2), which is the
parity check itself (uint8 images of several sizes -> clean-fid resize -> (x - 128) / 128 -> pool3),
so the network is compared at the size FID uses, with Mixed_7c's pool on an 8 x 8 map (at 75 x 75,
the smallest input, that map is 1 x 1 and FIDInceptionE_2's max pool equals an average)."""

from __future__ import annotations

import shutil
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from cleanfid.resize import make_resizer
from PIL import Image
from pytorch_fid import inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path
from safetensors.torch import load_file
from scipy import linalg

from dpdmd_jax.eval import fid
from dpdmd_jax.models.inception import InceptionV3
from dpdmd_jax.weights.inception import PTH_NAME, convert_pth, load_inception, save_inception
from dpdmd_jax.weights.safetensors_io import CheckpointError
from tests.torch_helpers import rel_err

# uint8 images of different sizes and aspect ratios, upsampled (non-uniformly) and downsampled to
# 299 x 299: one batch of `InceptionFeatures(batch_size=2)`.
IMAGE_SIZES = ((37, 91), (320, 300))


def _random_fid_inception(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(pytorch-fid's `InceptionV3([3])`, the `fid_inception_v3()` module it was built from, whose
    state dict has the published weights file's keys), built without the download, with random
    weights and BatchNorm statistics: running mean / var from one train-mode pass over random
    images (so activations stay O(1) through the 94 conv layers), BatchNorm scale and shift
    perturbed. The wrapper shares the modules: its pools and block order are pytorch-fid's own."""
    torch.manual_seed(seed)
    built, build = [], pfi.fid_inception_v3

    def keep_built() -> torch.nn.Module:  # the wrapper keeps only its blocks; we want the module too
        built.append(build())
        return built[0]

    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(torchvision.models.inception.Inception3, "load_state_dict"), \
            mock.patch.object(pfi, "fid_inception_v3", keep_built):
        wrapper = pfi.InceptionV3([3], resize_input=False, normalize_input=False)
    net = built[0]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # running statistics = this pass's batch statistics
        bn.reset_running_stats()
    with torch.no_grad():
        net.train()(torch.rand(3, 3, 75, 75) * 2 - 1)
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
    return wrapper.eval(), net.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pytorch-fid's InceptionV3([3]) on random weights, its fid_inception_v3 module, its .pth,
    the .pth converted)."""
    wrapper, net = _random_fid_inception()
    folder = tmp_path_factory.mktemp("fid_inception")
    pth = str(folder / PTH_NAME)
    torch.save(net.state_dict(), pth)
    return wrapper, net, pth, convert_pth(pth, str(folder / "inception.safetensors"))


@pytest.fixture(scope="module")
def model(reference) -> InceptionV3:
    return load_inception(reference[3], progress=False)


@pytest.fixture(scope="module")
def features(model) -> fid.InceptionFeatures:
    return fid.InceptionFeatures(model, batch_size=2, progress=False)


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]


def _clean_fid_features(reference, images) -> np.ndarray:
    """clean-fid's "clean" pipeline with pytorch-fid's network in place of its torchscript copy:
    its resizer, ToTensor (no rescale of float32), (x - 128) / 128 (InceptionV3W.forward)."""
    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    x = torch.stack([torchvision.transforms.ToTensor()(resize(im)) for im in images])
    with torch.no_grad():
        return reference((x - 128) / 128)[0].squeeze(-1).squeeze(-1).numpy()


@pytest.fixture(scope="module")
def ours(features) -> np.ndarray:
    """Our features of `_images()`."""
    return features(_images())


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> str:
    """`model` written back by `save_inception`."""
    return save_inception(model, tmp_path_factory.mktemp("fid_export") / "export.safetensors")


def test_features_match_pytorch_fid(ours, reference, model):
    wrapper, _, pth, _ = reference
    ref = _clean_fid_features(wrapper, _images())
    assert ours.shape == (2, 2048)
    err = rel_err(ours, ref)
    print(f"pool3 rel err (uint8 images -> clean resize -> 299 x 299): {err:.2e}")
    assert err <= 1e-5, err
    # The classifier head (kept for the one-to-one key map) too.
    state = torch.load(pth, weights_only=True)
    with torch.no_grad():
        ref_logits = torch.nn.functional.linear(torch.from_numpy(ref), state["fc.weight"], state["fc.bias"]).numpy()
    err = rel_err(np.asarray(model.logits(ours)), ref_logits)
    print(f"logits rel err: {err:.2e}")
    assert err <= 1e-5, err


def test_export_loads_strictly_into_pytorch_fid(exported, reference):
    """The key map is complete both ways: our export is the state dict pytorch-fid's module takes
    with strict=True, tensor for tensor equal to the file we read."""
    _, net, pth, _ = reference
    exported = load_file(exported)
    original = {k: v for k, v in torch.load(pth, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    net.load_state_dict(exported, strict=True)  # the same values: the module is unchanged


def test_clean_resize_equals_clean_fid():
    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    for im in _images(1):
        ours, ref = fid.clean_resize(im), resize(im)
        assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape == (299, 299, 3)
        assert np.array_equal(ours, ref), np.abs(ours - ref).max()


def test_frechet_distance_equals_pytorch_fid():
    rng = np.random.default_rng(0)
    for n, d in ((50, 8), (6, 10)):  # full-rank covariances; rank-deficient ones (n < d)
        a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
        b = rng.standard_normal((n, d)) + 0.5
        (m1, s1), (m2, s2) = fid.stats(a), fid.stats(b)
        ours, ref = fid.frechet_distance(m1, s1, m2, s2), calculate_frechet_distance(m1, s1, m2, s2)
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert fid.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_singular_and_complex_cases():
    """The eps offset when the first square root is not finite (forced: scipy's sqrtm returns NaNs
    once per call of either implementation), and the imaginary-part check (a non-PSD "covariance")."""
    rng = np.random.default_rng(1)
    (m1, s1), (m2, s2) = fid.stats(rng.standard_normal((30, 6))), fid.stats(rng.standard_normal((30, 6)) * 2)
    real_sqrtm = linalg.sqrtm

    def failing_once():
        calls = []

        def sqrtm(a, *args, **kwargs):
            calls.append(a)
            if len(calls) == 1:
                return (np.full_like(a, np.nan), 0.0) if kwargs.get("disp") is False else np.full_like(a, np.nan)
            return real_sqrtm(a, *args, **kwargs)
        return calls, sqrtm

    results = []
    for distance in (fid.frechet_distance, calculate_frechet_distance):
        calls, sqrtm = failing_once()
        with mock.patch.object(linalg, "sqrtm", sqrtm), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(distance(m1, s1, m2, s2))
        offset = np.eye(6) * 1e-6
        assert len(calls) == 2 and np.array_equal(calls[1], (s1 + offset).dot(s2 + offset))
    assert results[0] == pytest.approx(results[1], rel=1e-12)
    not_psd = np.diag([1.0, -1.0])
    with pytest.raises(ValueError, match="Imaginary component"):
        calculate_frechet_distance(np.zeros(2), not_psd, np.zeros(2), np.eye(2))
    with pytest.raises(fid.FIDError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), not_psd, np.zeros(2), np.eye(2))


def test_stats_files_round_trip(tmp_path):
    """Files written the way clean-fid (`make_custom_stats`) and pytorch-fid (`save_fid_stats`)
    write them load; ours load in their reader (pytorch-fid's `compute_statistics_of_path`)."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((20, 5)).astype(np.float32)
    mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)  # clean-fid's own stats (mu float32)
    np.savez_compressed(tmp_path / "clean.npz", mu=mu, sigma=sigma)
    got_mu, got_sigma = fid.load_stats(tmp_path / "clean.npz")
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    assert fid.stats_of(tmp_path / "clean.npz", None)[0].dtype == np.float32
    fid.save_stats(tmp_path / "ours.npz", *fid.stats(feats))
    m, s = compute_statistics_of_path(str(tmp_path / "ours.npz"), None, 1, 5, "cpu")
    assert np.allclose(m, mu, rtol=1e-6) and np.array_equal(s, sigma)


def test_stats_of_folder(ours, features, tmp_path):
    """A folder of PNG / JPEG files (and a sample folder's images/), read as clean-fid reads them;
    three images with batch_size 2 also run a padded last batch."""
    images = _images()
    for name, i in (("a.png", 0), ("b.png", 1), ("c.png", 0)):
        Image.fromarray(images[i]).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    mu, sigma = fid.stats_of_folder(tmp_path, features)
    ref_mu, ref_sigma = fid.stats(ours[[0, 1, 0]])
    assert rel_err(mu, ref_mu) <= 1e-6 and rel_err(sigma, ref_sigma) <= 1e-6
    # A sample folder (dpdmd_jax.sample): its images/, not its grids/.
    for sub in ("images", "grids"):
        (tmp_path / "samples" / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(images[i]).save(tmp_path / "samples" / sub / f"{i}.jpg")
    assert fid.image_files(tmp_path / "samples") == [str(tmp_path / "samples" / "images" / f"{i}.jpg")
                                                     for i in range(2)]
    # Grey (and any other mode) is converted to RGB, as clean-fid's `Image.open(path).convert("RGB")`.
    Image.fromarray(images[0][..., 0]).save(tmp_path / "gray.png")
    assert np.array_equal(fid.read_image(str(tmp_path / "gray.png")), np.repeat(images[0][..., :1], 3, axis=-1))


def test_bad_inputs(reference, model, features, tmp_path):
    _, _, pth, safetensors = reference
    with pytest.raises(CheckpointError, match="convert_pth"):
        load_inception(pth)
    shutil.copyfile(pth, tmp_path / "renamed.weights")  # a torch file under another name
    with pytest.raises(CheckpointError, match=r"renamed\.weights is a torch file.*convert_pth"):
        load_inception(tmp_path / "renamed.weights")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_inception(tmp_path / "missing.safetensors")
    # A state dict of another network: one error naming the file and the keys.
    other = str(tmp_path / "other.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5), "extra.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match=r"other\.pth is not pytorch-fid's FID Inception.*missing keys.*"
                       r"unexpected keys: extra\.weight.*Conv2d_1a_3x3\.conv\.weight \[32, 3, 5, 5\]"):
        convert_pth(other, str(tmp_path / "other.safetensors"))
    assert not (tmp_path / "other.safetensors").exists()
    with pytest.raises(CheckpointError, match="exists"):
        convert_pth(pth, safetensors)
    with pytest.raises(fid.FIDError, match=r"uint8 RGB images \[H, W, 3\], got float32 \[8, 8, 3\]"):
        features(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"H, W >= 75"):
        model(np.zeros((1, 74, 80, 3), np.float32))

    with pytest.raises(fid.FIDError, match="no such folder"):
        fid.stats_of_folder(tmp_path / "nope", features)
    (tmp_path / "empty").mkdir()
    with pytest.raises(fid.FIDError, match="holds no png/jpg/jpeg images"):
        fid.stats_of_folder(tmp_path / "empty", features)
    (tmp_path / "one").mkdir()
    Image.fromarray(_images()[0]).save(tmp_path / "one" / "a.png")
    with pytest.raises(fid.FIDError, match="holds 1 image"):
        fid.stats_of_folder(tmp_path / "one", features)
    (tmp_path / "one" / "b.png").write_bytes(b"not a png")
    with pytest.raises(fid.FIDError, match=r"b\.png is not a readable image"):
        fid.stats_of_folder(tmp_path / "one", features)

    with pytest.raises(fid.FIDError, match="no such statistics file"):
        fid.load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "nomu.npz", mean=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(fid.FIDError, match=r"has no mu \(keys: \['mean', 'sigma'\]\)"):
        fid.load_stats(tmp_path / "nomu.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(fid.FIDError, match="not a readable .npz"):
        fid.load_stats(tmp_path / "junk.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(fid.FIDError, match=r"mu must be \[D\] and sigma \[D, D\]"):
        fid.load_stats(tmp_path / "bad.npz")
    with pytest.raises(fid.FIDError, match="different feature sizes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(fid.FIDError, match="at least 2 images"):
        fid.stats(np.zeros((1, 2048)))
