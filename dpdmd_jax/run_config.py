"""A training run's recorded config as the default `--config` of the commands that read a run.

The trainer records the config of a run in `WORKDIR/config.json` (`run.workdir.check_workdir_config`,
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
import re
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

from dpdmd_jax import cli
from dpdmd_jax.config import base_config

RECORD = "config.json"


class RecordError(ValueError):
    """A workdir's config.json is missing or unreadable; the message says what to do."""


def is_uri(path: str) -> bool:
    """Whether `path` names a remote store (gs://bucket/run, s3://...) rather than a local folder."""
    return re.match(r"[A-Za-z][\w+.-]*://", os.fspath(path)) is not None


def absolute(path: str) -> str:
    """A local `path` made absolute (`~` expanded); a URI as it is: os.path.abspath would turn
    gs://bucket/run into the local folder ./gs:/bucket/run. A multi-host run's workdir must be shared
    by every host, so it is often such a URI; every file of a run is then reached through
    `etils.epath` (what Orbax uses), never through open() / os.path."""
    return os.fspath(path) if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def record_path(workdir: str) -> epath.Path:
    return epath.Path(absolute(workdir)) / RECORD


def read_record(workdir: str) -> dict:
    """The JSON the trainer recorded in `workdir`."""
    path = record_path(workdir)
    if not path.exists():
        raise RecordError(f"--workdir={workdir} holds no {RECORD}: is it a training run's workdir?")
    try:
        record = json.loads(path.read_text())
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
    if flag_value(argv, "config") is not None or not workdir or not record_path(workdir).exists():
        return argv
    read_record(workdir)  # an unreadable record: one line now, not a traceback from the flag parser
    return [argv[0], f"--config={os.path.abspath(__file__)}:{absolute(workdir)}",
            *argv[1:]]


def use_recorded_config() -> None:
    """In a command's `__main__`, before `cli.run`: `sys.argv = with_recorded_config(sys.argv)` (absl
    and ml_collections read the command line from `sys.argv`); an unreadable record stops the
    command with one line and exit code 2."""


    try:
        sys.argv[:] = with_recorded_config(sys.argv)
    except RecordError as e:
        cli.fail(str(e))
