"""FID (Heusel et al. 2017) with clean-fid's conventions (Parmar et al. 2022, `mode="clean"`), on our
NNX FID Inception (`dpdmd_jax.models.inception`).

  1. Each uint8 RGB image is resized on the host exactly as clean-fid's `make_resizer("PIL", False,
     "bicubic", (299, 299))`: every channel as a float32 PIL image (mode "F") resized with
     Image.BICUBIC, clipped to [0, 255], kept in float32 (no quantisation after the resize).
  2. The network sees `(x - 128) / 128`, the normalisation of clean-fid's torchscript Inception
     (`InceptionV3W.forward`); its 2048-d pool3 features are the FID features.
  3. `stats`: the mean and `np.cov(rowvar=False)` of the features, in float64.
  4. `frechet_distance`: pytorch-fid / clean-fid's `||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))`
     with scipy's `sqrtm`, the eps offset on the diagonals when the product's square root is not
     finite, and the same imaginary-part check.

Statistics files are the `.npz` those tools write (`np.savez_compressed(path, mu=..., sigma=...)`),
so published reference statistics (clean-fid's `*_clean_*.npz`, e.g. COCO) and pytorch-fid's
`--save-stats` files load as they are. FID of a student against a folder of teacher samples (FID-T)
is `frechet_distance(*stats_of_folder(student), *stats_of_folder(teacher))`.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image, UnidentifiedImageError
from scipy import linalg
from tqdm import tqdm

from dpdmd_jax.models.inception import FEATURE_DIM, InceptionV3

INCEPTION_SIZE = (299, 299)  # (width, height), as PIL's resize takes it
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLE_IMAGES = "images"  # a sample folder's images (dpdmd_jax.sampling.folder); its grids/ are not samples


class FIDError(ValueError):
    """Bad FID input; the message says what to fix."""


# ---------------------------------------------------------------------------- images -> features


def clean_resize(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [299, 299, 3] in [0, 255], clean-fid's "clean" resize (PIL bicubic
    of each channel as a float32 image, clipped, not quantised)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise FIDError(f"FID takes uint8 RGB images [H, W, 3], got {image.dtype} {list(image.shape)}")
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize(INCEPTION_SIZE, resample=Image.BICUBIC)).clip(0, 255) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.float32)


def normalize(x: jax.Array) -> jax.Array:
    """[0, 255] -> the network's input range, as clean-fid's InceptionV3W does it."""
    return (x - 128) / 128


class InceptionFeatures:
    """pool3 features of uint8 images, clean-fid's way: `features(images)` -> float32 [N, 2048].

    Images (any sizes) are resized on the host, then run in batches of `batch_size` by one jitted
    program (the last batch is padded, so it compiles once)."""

    def __init__(self, model: InceptionV3, batch_size: int = 50, progress: bool = True):
        if batch_size < 1:
            raise FIDError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.progress = batch_size, progress
        graph, self._state = nnx.split(model)
        self._run = jax.jit(lambda state, x: nnx.merge(graph, state)(normalize(x)))

    def _batch(self, resized: list[np.ndarray]) -> np.ndarray:
        n = len(resized)
        x = np.zeros((self.batch_size, *INCEPTION_SIZE[::-1], 3), np.float32)
        x[:n] = np.stack(resized)
        return np.asarray(self._run(self._state, jnp.asarray(x)))[:n]

    def __call__(self, images: Iterable[np.ndarray], total: int | None = None,
                 desc: str = "FID features") -> np.ndarray:
        """images: uint8 [N, H, W, 3], or an iterable of uint8 [H, W, 3] (read lazily; `total`
        sizes the progress bar)."""
        if total is None and hasattr(images, "__len__"):
            total = len(images)
        out, pending = [], []
        for image in tqdm(images, total=total, desc=desc, disable=not self.progress, leave=False):
            pending.append(clean_resize(np.asarray(image)))
            if len(pending) == self.batch_size:
                out.append(self._batch(pending))
                pending = []
        if pending:
            out.append(self._batch(pending))
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


# ---------------------------------------------------------------------------- statistics


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of features [N, D], float64; N >= 2 (a covariance needs two)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise FIDError(f"FID statistics need features [N, D] of at least 2 images, got shape {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{where}: mu must be [D] and sigma [D, D], got mu {list(mu.shape)}, sigma {list(sigma.shape)}")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """The Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid's
    `calculate_frechet_distance` and clean-fid's `frechet_distance` (Dougal Sutherland's stable
    version)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    _check_stats(mu1, sigma1, "the first statistics")
    _check_stats(mu2, sigma2, "the second statistics")
    if mu1.shape != mu2.shape:
        raise FIDError(f"the two statistics have different feature sizes ({mu1.shape[0]} and {mu2.shape[0]}): "
                       "were they computed with the same network and layer?")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # the product may be (nearly) singular
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error may leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"the square root of sigma1 sigma2 has an imaginary component "
                           f"{np.max(np.abs(covmean.imag)):.3g}: are both covariances valid (symmetric PSD)?")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes `mu`, `sigma` as clean-fid / pytorch-fid do (`np.savez_compressed(path, mu=, sigma=)`)."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    _check_stats(mu, sigma, os.fspath(path))
    with epath.Path(path).open("wb") as f:
        np.savez_compressed(f, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a clean-fid / pytorch-fid statistics `.npz` (keys `mu` and `sigma`)."""
    p = epath.Path(path)
    if not p.is_file():
        raise FIDError(f"{path}: no such statistics file (a .npz of mu and sigma, as clean-fid and pytorch-fid write)")
    try:
        with p.open("rb") as f:
            npz = np.load(f)  # no pickles: allow_pickle stays False
            keys = list(npz.files) if isinstance(npz, np.lib.npyio.NpzFile) else None
            arrays = {k: npz[k] for k in ("mu", "sigma") if k in (keys or ())}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FIDError(f"{path} is not a readable .npz of FID statistics ({e})") from e
    if keys is None:
        raise FIDError(f"{path} holds one array, not a .npz of `mu` and `sigma`")
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise FIDError(f"{path} has no {' / '.join(missing)} (keys: {keys}); FID statistics files hold `mu` and "
                       "`sigma`")
    mu, sigma = arrays["mu"], arrays["sigma"]
    _check_stats(mu, sigma, os.fspath(path))
    return mu, sigma


# ---------------------------------------------------------------------------- folders


def image_files(folder: str | os.PathLike) -> list[str]:
    """The PNG / JPEG files of a folder, sorted (not its subfolders, as pytorch-fid); for a sample
    folder of `python -m dpdmd_jax.sample` (no images at the top, an `images/` inside) its images/."""
    root = epath.Path(folder)
    if not root.is_dir():
        raise FIDError(f"{folder}: no such folder of images")

    def listed(d: epath.Path) -> list[str]:
        return sorted(os.fspath(p) for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    files = listed(root)
    if not files and (root / SAMPLE_IMAGES).is_dir():
        files = listed(root / SAMPLE_IMAGES)
    if not files:
        raise FIDError(f"{folder} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images")
    if len(files) < 2:
        raise FIDError(f"{folder} holds 1 image; FID statistics need at least 2 (a covariance), and thousands "
                       "for a meaningful FID")
    return files


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, converted to RGB as clean-fid reads it."""
    try:
        with epath.Path(path).open("rb") as f, Image.open(f) as image:
            return np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise FIDError(f"{path} is not a readable image ({e}); remove or replace it") from e


def _read_all(files: Sequence[str]) -> Iterator[np.ndarray]:
    for path in files:
        yield read_image(path)


def folder_features(folder: str | os.PathLike, features: InceptionFeatures) -> np.ndarray:
    """FID features [N, 2048] of a folder's images (`image_files`), read one at a time."""
    files = image_files(folder)
    return features(_read_all(files), total=len(files), desc=f"FID features of {os.path.basename(os.fspath(folder))}")


def stats_of_folder(folder: str | os.PathLike, features: InceptionFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a folder of images (`image_files`)."""
    return stats(folder_features(folder, features))


def stats_of(source: str | os.PathLike, features: InceptionFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a statistics `.npz` (published reference statistics) or of a folder of images."""
    if os.fspath(source).endswith(".npz"):
        return load_stats(source)
    return stats_of_folder(source, features)
