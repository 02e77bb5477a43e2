"""PyTorch state-dict files (`.pt` / `.pth` / `.bin`) -> `.safetensors`, once, where torch is installed.

Every loader here reads safetensors only (torch is a conversion and test dependency, not a runtime
one); the published weights of the evaluation towers and of some students are torch pickles. This
module reads them with `torch.load(weights_only=True)` (tensors only: no code from the file runs)
and writes what the loaders read. torch is imported inside the functions, so importing this module
never needs it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

from dpdmd_jax.weights.safetensors_io import CheckpointError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers in saved training states


def read_pt_state_dict(path: str) -> dict[str, Any]:
    """{key: torch.Tensor} of a `.pt` state dict, or of a training checkpoint holding it under
    "state_dict" (HPSv2's files), read with weights_only=True; a DDP / torch.compile prefix is removed."""
    import torch  # torch is for conversion only (requirements-dev), not a runtime dependency

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled Python objects besides tensors, which torch.load(weights_only=True) refuses "
            f"(loading them could run arbitrary code): {str(e).splitlines()[0]}. Re-save it as a plain "
            "state dict: torch.save({k: v for k, v in model.state_dict().items()}, path)."
        ) from e
    except Exception as e:  # truncated, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable torch .pt file ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} is not a state dict (a dict of name -> tensor), nor a checkpoint with one "
                              f"under 'state_dict'; got {type(state).__name__}")
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def pt_to_safetensors(path_in: str | os.PathLike, path_out: str | os.PathLike,
                      check: Callable[[dict[str, tuple[int, ...]]], None], *,
                      keep: Callable[[str], bool] = lambda key: True, overwrite: bool = False) -> str:
    """Writes the tensors of `path_in` whose key `keep`s as `path_out` (.safetensors, stored dtypes),
    after `check` ({key: shape} of every tensor read) has accepted them: nothing is written for a
    wrong file, and never a half-written file under the final name."""
    from safetensors.torch import save_file  # needs torch, as read_pt_state_dict

    path_in, path_out = os.fspath(path_in), os.fspath(path_out)
    if os.path.exists(path_out) and not overwrite:
        raise CheckpointError(f"{path_out} exists; pass overwrite=True or choose another path")
    state = read_pt_state_dict(path_in)
    check({k: tuple(v.shape) for k, v in state.items()})
    tmp = path_out + ".tmp"
    save_file({k: v.contiguous() for k, v in state.items() if keep(k)}, tmp)
    os.replace(tmp, path_out)
    return path_out
