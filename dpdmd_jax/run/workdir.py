"""A run's folder: its recorded config (`config.json`), Orbax checkpoints, and the guarantee that a
failed start leaves it as it was found.

Checkpoints are written asynchronously (keep-N) and restored onto any mesh; a step already saved is
never written again. Every later run (and every reader: sample, export) is checked against the
recorded config, so a workdir never silently mixes two experiments.

A multi-host run's workdir is shared by every host: gs://bucket/run or a shared file system. Every
file in it is therefore reached through `etils.epath` (Orbax's own path layer), never open() /
os.path, which would read or write a local ./gs:/ folder instead (tests/unit/test_workdir_paths.py).
"""

from __future__ import annotations

import contextlib
import json

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from dpdmd_jax.config import ConfigError, base_config
from dpdmd_jax.core import Params, TrainingError, TrainState
from dpdmd_jax.distill.anchor import RECORD as ANCHOR_RECORD
from dpdmd_jax.run_config import RECORD, absolute

CHECKPOINTS = "checkpoints"  # workdir/checkpoints/<step>/: Orbax's folders


def checkpoint_steps(workdir: str) -> list[int]:
    """The rounds saved in `workdir`/checkpoints (Orbax names each step's folder by its number)."""
    folder = epath.Path(workdir) / CHECKPOINTS
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


# ---------------------------------------------------------------------------- the recorded config


# Values a run records in its own config.json (no config sets them): kept when config.json is
# rewritten, and not compared with the config of a later run.
_RECORDED = ("distill.auto_anchor.chosen_k",)
_RESUMABLE_CHANGES = {*_RECORDED, "compare_with_dmd", "num_rounds", "log_every",
                      "checkpoint_every", "keep_checkpoints", "max_nonfinite", "evals", "mesh", "model.scan_layers",
                      "model.remat_policy"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and key not in _RESUMABLE_CHANGES else {key: v})
    return out


def check_workdir_config(workdir: str, c: ml_collections.ConfigDict, write: bool = True) -> None:
    """First run writes config.json; later runs must match it (except loop/layout knobs), so a
    workdir never silently mixes two experiments, and rewrite it keeping what the run recorded
    there (`_RECORDED`). `write=False` (readers such as the sampler) only compares."""
    path = epath.Path(workdir) / RECORD
    current = json.loads(c.to_json_best_effort())
    if path.exists():
        saved = json.loads(path.read_text())
        # A field the record lacks was added to the code after the run started: the run used what is
        # now its default (e.g. gan.weight = 0), so the record is read as if it held that default.
        a, b = {**_flat(json.loads(base_config().to_json_best_effort())), **_flat(saved)}, _flat(current)
        diff = sorted(k for k in set(a) | set(b) if k not in _RESUMABLE_CHANGES and a.get(k) != b.get(k))
        if diff:
            changes = ", ".join(f"{k}: {a.get(k)} -> {b.get(k)}" for k in diff[:8])
            # A reader (sample, export) wants this run's checkpoints as they are: the fix is to read
            # the recorded config, not to start a new experiment.
            advice = ("These fields say what its checkpoints mean: drop --config to use the run's recorded config "
                      "(its config.json), and any --config.* override of these fields." if not write else
                      "Resume with the same settings, or start this experiment in a new --workdir.")
            raise ConfigError(f"{workdir} holds a run with a different config ({changes}). {advice}")
        for key in _RECORDED:
            if key in a:
                *parents, leaf = key.split(".")
                node = current
                for name in parents:
                    node = node.setdefault(name, {})
                node[leaf] = a[key]
    if write and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")  # never a half-written record under the final name
        tmp.write_text(json.dumps(current, indent=2))
        tmp.replace(path)


@contextlib.contextmanager
def undo_failed_start(workdir: str):
    """A start that fails before its first checkpoint leaves the workdir as it found it: a folder this
    run created is removed, and so is a config.json it wrote (else the corrected command would be
    refused as "a different config"). Anything an earlier run wrote is never touched."""
    root = epath.Path(workdir)
    created = not root.exists()
    had_config = (root / RECORD).exists()
    had_checkpoints = (root / CHECKPOINTS).exists()
    try:
        yield
    except Exception:
        if jax.process_index() == 0 and not checkpoint_steps(workdir):
            if created:
                _remove(root)
            elif not had_config:
                for name in (RECORD, ANCHOR_RECORD):
                    _remove(root / name)
                if not had_checkpoints:  # the checkpoint manager's folder, with no checkpoint in it
                    _remove(root / CHECKPOINTS)
        raise


def _remove(path: epath.Path) -> None:
    """Removes a file or folder if it is there; best effort: the start's own error is the one to report
    (and an object store's errors are not all OSErrors)."""
    with contextlib.suppress(Exception):
        if path.is_dir():
            path.rmtree(missing_ok=True)
        else:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, c: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep_checkpoints, enable_async_checkpointing=True, create=True
    )
    directory = epath.Path(absolute(workdir)) / CHECKPOINTS  # Orbax needs absolute paths (or gs:// URIs)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: dict, force: bool = False) -> None:
    """Saves `state` as checkpoint meta["step"] (no device read) unless that step exists."""
    step = meta["step"]
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=force)


def restore(mngr: ocp.CheckpointManager, step: int, state_like, shardings) -> TrainState:
    """Restores onto `shardings` (any mesh): arrays are read straight into their new layout."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings)
    return _restore(mngr, step, ocp.args.StandardRestore(abstract))


def restore_student(mngr: ocp.CheckpointManager, step: int, student_like: Params) -> Params:
    """Only the student of checkpoint `step`, onto the shardings of `student_like` (abstract arrays):
    what sampling and export need. The fake score and both optimizers' moments (four more copies of
    the model) are neither read nor allocated."""
    item = {"student": student_like}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return _restore(mngr, step, args)["student"]


def _restore(mngr: ocp.CheckpointManager, step: int, args: ocp.args.CheckpointArgs):
    try:
        return mngr.restore(step, args=ocp.args.Composite(state=args)).state
    except Exception as e:  # corrupt / incompatible checkpoint: say which and what to do
        raise TrainingError(
            f"could not restore checkpoint step {step} from {mngr.directory} ({type(e).__name__}: {e}). "
            "If it is corrupt, delete that step's folder to resume from the previous one; if the model "
            "changed, use a new --workdir."
        ) from e
