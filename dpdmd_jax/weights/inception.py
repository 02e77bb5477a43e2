r"""The FID Inception's weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torch state
dict of its `fid_inception_v3()`, the TF 2015-12-05 graph's weights) <-> our `InceptionV3`.

torch is not a runtime dependency, so the runtime loader reads `.safetensors` only; the published
`.pth` is converted once, with torch (requirements-dev), into a safetensors file of the same keys:

    python -m dpdmd_jax.weights.inception --pth=pt_inception-2015-12-05-6726825d.pth \
        --out=pt_inception-2015-12-05.safetensors

Keys are the state dict's: our attribute paths are its module names, the leaves renamed (conv
`kernel` -> `weight` in (O, I, kh, kw), BatchNorm `scale` / `bias` / `mean` / `var` -> `weight` /
`bias` / `running_mean` / `running_var`, fc `kernel` -> `weight` transposed). The
`*.num_batches_tracked` counters that torch >= 0.4.1 saves with each BatchNorm are training-only and
skipped. Every other key must match, both ways, with its shape: one error names the file and every
missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax import cli
from dpdmd_jax.models.inception import InceptionConfig, InceptionV3
from dpdmd_jax.parallel.mesh import DEFAULT_RULES
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.safetensors_io import CheckpointError, read_header, write_file
from dpdmd_jax.weights.torch_files import pt_to_safetensors

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID_WEIGHTS_URL
CONVERT_COMMAND = "python -m dpdmd_jax.weights.inception --pth=PTH --out=OUT.safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
IGNORED_SUFFIX = ".num_batches_tracked"  # BatchNorm's step counter: not used in eval mode
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

FLAGS = flags.FLAGS


def state_dict_key(path: tuple[Any, ...]) -> str:
    """Our state path -> pytorch-fid's state-dict key (`Mixed_7c.branch_pool.bn.running_var`)."""
    return ".".join([*(str(p) for p in path[:-1]), _LEAVES[path[-1]]])


def key_map(abstract_state: nnx.State) -> dict[tuple, loader.Source]:
    """For every leaf of an InceptionV3 state: its state-dict key, shape there and layout change."""
    sources = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = tuple(var.get_value().shape)
        transform, ckpt_shape = loader.identity, shape
        if path[-1] == "kernel" and len(shape) == 4:  # (kh, kw, I, O) <- (O, I, kh, kw)
            kh, kw, i, o = shape
            transform, ckpt_shape = loader.conv_to_ours, (o, i, kh, kw)
        elif path[-1] == "kernel":  # fc: (in, out) <- (out, in)
            transform, ckpt_shape = loader.linear_to_ours, shape[::-1]
        sources[path] = loader.Source(keys=(state_dict_key(path),), shape=ckpt_shape, transform=transform)
    return sources


def abstract_inception(cfg: InceptionConfig | None = None) -> InceptionV3:
    """The model with shape-only parameters (no allocation)."""
    return loader.abstract_model(lambda rngs: InceptionV3(cfg or InceptionConfig(), rngs=rngs))


def _summarise(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_keys(shapes: dict[str, tuple[int, ...]], path: str) -> None:
    """Raises one CheckpointError naming `path` and every missing, unexpected and mis-shaped key of
    a state dict (key -> shape) against the FID Inception (num_batches_tracked counters allowed)."""
    expected = {k: s.shape for s in key_map(nnx.state(abstract_inception())).values() for k in s.keys}
    got = {k: tuple(v) for k, v in shapes.items() if not k.endswith(IGNORED_SUFFIX)}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(f"{k} {list(got[k])} (expected {list(expected[k])})"
                        for k in set(got) & set(expected) if got[k] != tuple(expected[k]))
    problems = [f"{what}: {_summarise(names)}" for what, names in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if names]
    if problems:
        raise CheckpointError(f"{path} is not pytorch-fid's FID Inception state dict ({PTH_NAME}): "
                              + "; ".join(problems))


def _looks_like_torch(path: str) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a bare pickle (older)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_inception(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    precision: str = "highest",
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    progress: bool = True,
) -> InceptionV3:
    """The FID Inception from a `.safetensors` of pytorch-fid's state dict (`convert_pth` writes it
    from the published `.pth`). Each parameter is placed on its sharding on `mesh` (replicated: the
    network has no logical axes), else on device 0."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist (or is not a file); the FID Inception weights are pytorch-fid's "
                              f"{PTH_NAME} converted with `{CONVERT_COMMAND}`")
    torch_file = CheckpointError(f"{path} is a torch file, which the runtime does not read (torch is not a runtime "
                                 f"dependency); convert it once with `{CONVERT_COMMAND}` "
                                 "(dpdmd_jax.weights.inception.convert_pth) and load the .safetensors")
    if path.endswith(TORCH_SUFFIXES):
        raise torch_file
    cfg = InceptionConfig(dtype=dtype, param_dtype=param_dtype or dtype, precision=precision)
    try:
        tensors = read_header(path)
    except CheckpointError:
        if _looks_like_torch(path):  # a torch.save file under another name
            raise torch_file from None
        raise
    check_keys({k: v.shape for k, v in tensors.items()}, path)
    ignore = [k for k in tensors if k.endswith(IGNORED_SUFFIX)]
    return loader.load_module(abstract_inception(cfg), key_map, path, prefix="", mesh=mesh, rules=rules,
                              progress=progress, tensors=tensors, ignore=ignore)


def save_inception(model: InceptionV3, path: str | os.PathLike, *, dtype: str | None = None,
                   overwrite: bool = False) -> str:
    """Writes `model` as a `.safetensors` of pytorch-fid's state-dict keys (which its
    `fid_inception_v3()` module loads with `load_state_dict(strict=True)`)."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another file")
    state = nnx.state(model)
    sources = key_map(state)
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    write_file(path, loader.export_tensors(state, sources, np_dtype),
               loader.checkpoint_shapes(state, sources, np_dtype))
    return path


def convert_pth(path_in: str | os.PathLike, path_out: str | os.PathLike, *, overwrite: bool = False) -> str:
    """pytorch-fid's `.pth` state dict -> a `.safetensors` of the same keys and tensors (less the
    training-only `num_batches_tracked` counters), checked against the FID Inception before
    anything is written (`torch_files.pt_to_safetensors`: needs torch, computing FID does not)."""
    return pt_to_safetensors(path_in, path_out, lambda shapes: check_keys(shapes, os.fspath(path_in)),
                             keep=lambda k: not k.endswith(IGNORED_SUFFIX), overwrite=overwrite)


def define_flags() -> None:
    """The command line (defined only when run as a program)."""
    flags.DEFINE_string("pth", None, f"pytorch-fid's FID Inception state dict ({PTH_NAME}).")
    flags.DEFINE_string("out", None, "The .safetensors file to write.")
    flags.mark_flags_as_required(["pth", "out"])


def main(argv):
    del argv
    out = convert_pth(FLAGS.pth, FLAGS.out)
    print(f"Wrote {out}; dpdmd_jax.weights.inception.load_inception({out!r}) reads it.")


if __name__ == "__main__":
    define_flags()
    cli.run(main, user_errors=(CheckpointError,))

