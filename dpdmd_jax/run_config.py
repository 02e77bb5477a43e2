"""A training run's recorded config as the default `--config` of the commands that read a run.

The trainer records the config of a run in `WORKDIR/config.json` (`check_workdir_config` below,
written with `ConfigDict.to_json_best_effort`), and every later run or reader is checked against it.
`main`, `sample` and `export` take `--workdir`; without `--config` they read that record, so a run
trained with `--config.model.source=... --config.data.prompt_file=...` is resumed, sampled and
exported without repeating those overrides:

    python -m dpdmd_jax.sample --workdir=runs/sd35 --out=runs/sd35/samples
    python -m dpdmd_jax.sample --workdir=runs/sd35 --out=... --config.mesh.fsdp=4   # on top of the record

That is `--config=dpdmd_jax/run_config.py:WORKDIR` (this file is a config file whose argument is a
workdir), so `--config.FIELD=VALUE` overrides apply on top exactly as they do on a config file, and an
unknown field is reported the same way. The reader then checks the result against the record as the
trainer does on a resume: an override of a field that says what the checkpoints mean is refused, one of
a layout or loop knob (`mesh`, `model.scan_layers`, `evals`, ...) is allowed.

JSON has no tuples and no `FieldReference`s: the record is laid over `config.base_config()`, whose
fields carry their types (tuples, `distill.anchor_k` int | "auto", `distill.stop_grad_first_step`
None | bool), so overrides parse as they would on the config file; lists elsewhere become tuples.
Values the run recorded itself (`distill.auto_anchor.chosen_k`) are kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

RECORD = "config.json"


class RecordError(ValueError):
    """A workdir's config.json is missing or unreadable; the message says what to do."""


def record_path(workdir: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), RECORD)


def read_record(workdir: str) -> dict:
    """The JSON the trainer recorded in `workdir`."""
    path = record_path(workdir)
    if not os.path.exists(path):
        raise RecordError(f"--workdir={workdir} holds no {RECORD}: is it a training run's workdir?")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path} cannot be read ({e}); pass the run's --config=FILE instead.") from e
    if not isinstance(record, dict):
        raise RecordError(f"{path} is not a config (a JSON object); pass the run's --config=FILE instead.")
    return record


def _untyped(value: Any) -> Any:
    """A JSON value as a config holds it: lists as tuples (configs use tuples: hashable, and what
    `--config.x=(1, 2)` parses to), objects as dicts (a ConfigDict turns them into ConfigDicts)."""
    if isinstance(value, list):
        return tuple(_untyped(v) for v in value)
    if isinstance(value, dict):
        return {k: _untyped(v) for k, v in value.items()}
    return value


def _lay_over(node: ml_collections.ConfigDict, record: dict) -> None:
    for key, value in record.items():
        if key in node and isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _lay_over(node[key], value)
        else:  # a FieldReference field keeps its reference and type; its value is set
            node[key] = _untyped(value)


def from_record(record: dict) -> ml_collections.ConfigDict:
    """The config a run recorded (`config.json`'s JSON), with the types JSON lost restored."""
    from dpdmd_jax.config import base_config

    c = base_config()
    _lay_over(c, record)
    return c


def get_config(workdir: str) -> ml_collections.ConfigDict:
    """`--config=dpdmd_jax/run_config.py:WORKDIR`: the config the run in WORKDIR recorded."""
    return from_record(read_record(workdir))


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value absl would give flag `name` in `argv` (`--name=V`, `--name V`, single dash too;
    the last one wins; nothing after `--`), read before the flags are parsed; None if absent."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        for dashes in ("--", "-"):
            if arg.startswith(f"{dashes}{name}="):
                value = arg.split("=", 1)[1]
            elif arg == f"{dashes}{name}" and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def with_recorded_config(argv: Sequence[str]) -> list[str]:
    """`argv` with `--config=<this file>:WORKDIR` added when it names `--workdir=WORKDIR` and no
    `--config`, and the workdir holds a record; else `argv` as it is (a missing record is reported by
    the command, which knows whether it needs one). Call before the flags are parsed."""
    argv = list(argv)
    workdir = flag_value(argv, "workdir")
    if flag_value(argv, "config") is not None or not workdir or not os.path.exists(record_path(workdir)):
        return argv
    read_record(workdir)  # an unreadable record: one line now, not a traceback from the flag parser
    return [argv[0], f"--config={os.path.abspath(__file__)}:{os.path.abspath(os.path.expanduser(workdir))}",
            *argv[1:]]


def use_recorded_config() -> None:
    """In a command's `__main__`, before `cli.run`: `sys.argv = with_recorded_config(sys.argv)` (absl
    and ml_collections read the command line from `sys.argv`); an unreadable record stops the
    command with one line and exit code 2."""
    import sys

    from dpdmd_jax import cli

    try:
        sys.argv[:] = with_recorded_config(sys.argv)
    except RecordError as e:
        cli.fail(str(e))

# ---------------------------------------------------------------------------- the record


# Values a run records in its own config.json (no config sets them): kept when config.json is
# rewritten, and not compared with the config of a later run.
_RECORDED = ("distill.auto_anchor.chosen_k",)
_RESUMABLE_CHANGES = {*_RECORDED, "compare_with_dmd", "num_rounds", "log_every",
                      "checkpoint_every", "keep_checkpoints", "max_nonfinite", "evals", "mesh", "model.scan_layers",
                      "model.remat_policy"}


def check_workdir_config(workdir: str, c: ml_collections.ConfigDict, write: bool = True) -> None:
    """First run writes config.json; later runs must match it (except loop/layout knobs), so a
    workdir never silently mixes two experiments, and rewrite it keeping what the run recorded
    there (`_RECORDED`). `write=False` (readers such as the sampler) only compares."""
    import jax

    from dpdmd_jax.config import ConfigError

    path = os.path.join(workdir, RECORD)
    current = json.loads(c.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)

        def flat(d, prefix=""):
            out = {}
            for k, v in d.items():
                key = f"{prefix}{k}"
                out.update(flat(v, key + ".") if isinstance(v, dict) and key not in _RESUMABLE_CHANGES else {key: v})
            return out

        a, b = flat(saved), flat(current)
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
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(current, f, indent=2)
        os.replace(path + ".tmp", path)
