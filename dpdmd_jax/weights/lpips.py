"""LPIPS weights -> our `LPIPS` (`dpdmd_jax.models.vgg`): two local safetensors files.

  * the trunk: a torchvision VGG16 state dict (`torchvision.models.vgg16(...).state_dict()`, e.g.
    the published vgg16-397923af.pth converted), keys `features.{0,2,5,...,28}.weight/bias`. Its
    fully connected head (`classifier.{0,3,6}.*`), which LPIPS does not use, is accepted and skipped;
  * the heads: lpips' v0.1 linear weights, which the `lpips` pip package ships as
    `lpips/weights/v0.1/vgg.pth`: `lin{k}.model.1.weight`, [1, C_k, 1, 1].

Both are read as .safetensors only: torch is a test / conversion dependency, not a runtime one.
`convert_pth` (or `python -m dpdmd_jax.weights.lpips IN.pth OUT.safetensors`) turns a .pth
state dict into one, once. Our parameter paths map to the checkpoint keys one to one
(`checkpoint_key`); each file is checked against its half of the map (every expected key present,
none unexpected, shapes equal) before anything is read, and a mismatch is one error naming the file.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpdmd_jax import cli
from dpdmd_jax.models.vgg import LPIPS
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.safetensors_io import CheckpointError, TensorInfo, read_header
from dpdmd_jax.weights.torch_files import pt_to_safetensors

# torchvision's index of each conv of VGG16 inside `features` (ReLUs and max-pools sit between).
FEATURES_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# The trunk file may be a whole torchvision VGG16: its classifier head is not part of LPIPS.
CLASSIFIER_KEYS = tuple(f"classifier.{i}.{leaf}" for i in (0, 3, 6) for leaf in ("weight", "bias"))
# A .pth written by torch.save: a zip archive (torch >= 1.6) or a bare pickle (older).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_LEAF = {"kernel": "weight", "bias": "bias"}
_FIX = (
    "Pass a torchvision VGG16 state dict (features.* keys) as vgg_file and lpips' weights/v0.1/vgg.pth "
    "(lin0..lin4) as lin_file, both as .safetensors (convert_pth converts a .pth)"
)


def checkpoint_key(path: tuple[Any, ...]) -> str:
    """Our LPIPS state path -> its key: ('net', 'convs', i, leaf) in the torchvision VGG16 state dict,
    ('lins', k, 'kernel') in lpips' v0.1 linear weights."""
    if path[0] == "net":
        _, _, i, leaf = path
        return f"features.{FEATURES_CONV_INDICES[i]}.{_LEAF[leaf]}"
    _, k, _ = path
    return f"lin{k}.model.1.weight"


def key_map(abstract_state: nnx.State) -> dict[tuple, loader.Source]:
    """For every leaf of the LPIPS state: its checkpoint key, checkpoint shape (torch's
    (O, I, kh, kw) for conv kernels) and layout change."""
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        if path[-1] == "kernel":
            kh, kw, i, o = shape
            sources[path] = loader.Source((checkpoint_key(path),), (o, i, kh, kw), loader.conv_to_ours)
        else:
            sources[path] = loader.Source((checkpoint_key(path),), shape)
    return sources


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, TensorInfo]:
    """The tensor index of one .safetensors file; a missing file or a torch .pth is one clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    # The content decides: a safetensors file is a u64 header length, then the JSON header's "{".
    if head[8:9] != b"{" and (path.endswith(_TORCH_SUFFIXES) or head.startswith(_TORCH_MAGIC)):
        raise CheckpointError(
            f"{path} is a PyTorch pickle, which is read only through torch (not a runtime dependency); convert it "
            f"once with `python -m dpdmd_jax.weights.lpips {path} OUT.safetensors` "
            "(dpdmd_jax.weights.lpips.convert_pth, needs torch) and pass OUT.safetensors"
        )
    return read_header(path)


def check_file(sources: dict[tuple, loader.Source], tensors: dict[str, TensorInfo], path: str, what: str) -> None:
    """Raises one CheckpointError naming `path` unless its tensors are exactly the keys of
    `sources`, with their shapes."""
    expected = {k: s.shape for s in sources.values() for k in s.keys}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(f"{k} (file {list(tensors[k].shape)}, expected {list(expected[k])})"
                        for k in set(expected) & set(tensors) if tensors[k].shape != tuple(expected[k]))
    problems = [f"{name}: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"{path} is not {what} ({'; '.join(problems)}). {_FIX}.")


def load_lpips(
    vgg_file: str | os.PathLike,
    lin_file: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> LPIPS:
    """LPIPS (VGG16, v0.1) from a torchvision VGG16 state dict and lpips' linear weights, both
    .safetensors; parameters and compute in `dtype`, replicated on `mesh` (else on device 0)."""
    vgg_file, lin_file = os.fspath(vgg_file), os.fspath(lin_file)
    vgg = {k: v for k, v in read_safetensors(vgg_file, "VGG16").items() if k not in CLASSIFIER_KEYS}
    lin = read_safetensors(lin_file, "LPIPS linear weights")
    dtype = jnp.dtype(dtype)
    graphdef, abstract = nnx.split(loader.abstract_model(lambda rngs: LPIPS(dtype=dtype, param_dtype=dtype, rngs=rngs)))
    sources = key_map(abstract)
    check_file({p: s for p, s in sources.items() if p[0] == "net"}, vgg, vgg_file, "a torchvision VGG16 state dict")
    check_file({p: s for p, s in sources.items() if p[0] == "lins"}, lin, lin_file, "lpips' v0.1 VGG linear weights")
    sharding = NamedSharding(mesh, PartitionSpec()) if mesh is not None else jax.devices()[0]
    state = loader.load_state(abstract, sources, {**vgg, **lin}, sharding, f"{vgg_file} + {lin_file}", progress)
    return nnx.merge(graphdef, state)


def convert_pth(path_in: str | os.PathLike, path_out: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes the state dict of a torch .pth (read with weights_only=True) as .safetensors, the
    format `load_lpips` reads (`torch_files.pt_to_safetensors`: needs torch); refuses to overwrite
    unless asked. Its keys are checked when the file is loaded (either half of LPIPS may come in)."""
    return pt_to_safetensors(path_in, path_out, check=lambda shapes: None, overwrite=overwrite)


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise cli.UsageError("usage: python -m dpdmd_jax.weights.lpips IN.pth OUT.safetensors")
    print(f"Wrote {convert_pth(argv[1], argv[2])}")


if __name__ == "__main__":
    cli.run(main, user_errors=(CheckpointError,))
