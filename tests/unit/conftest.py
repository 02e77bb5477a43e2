"""The unit tier runs without torch, diffusers and transformers: importing any of them from here fails.

`python -m pytest tests/unit` must pass in an environment with only requirements.txt installed (no
torch), so a test that needs the reference libraries belongs in tests/parity or tests/integration.
This guard makes such an import fail in the full environment too, loudly, instead of later in a
torch-free one, and it keeps the other tiers working when all three run in one pytest process
(`python -m pytest -n 2` from the repository root: each worker collects every folder and runs unit,
parity and integration items interleaved, and parity modules import torch at collection time):

* The guard is on only while a module under tests/unit is being imported (its collection) or one
  of its tests runs (setup, call, teardown): `_active`, set by the two hook wrappers below, which
  check the node's path (pytest calls `pytest_runtest_protocol` on every conftest, whatever the
  item's folder).
* While it is on, `builtins.__import__` (every `import` statement, even of a module another tier
  already imported) and a `sys.meta_path` finder (`importlib.import_module`, `find_spec`) refuse
  torch, diffusers and transformers and their submodules, whoever asks: a unit test, a helper it
  calls, or library code it runs. Outside it they are untouched.
* A module imported before the guard was on (a parity module importing a unit module's helpers,
  collected first) was not checked when it ran, so after each unit module is collected its
  namespace is checked too: no torch/diffusers/transformers module in it, in a `tests.*` module it
  holds, or in the module of a `tests.*` function or class it imported.

The refusal is a ModuleNotFoundError, as in an environment without torch, naming this guard.
"""

from __future__ import annotations

import builtins
import importlib.abc
import sys
import types
from pathlib import Path

import pytest

BLOCKED = frozenset({"torch", "diffusers", "transformers"})
UNIT_DIR = Path(__file__).resolve().parent
_active = False
_builtin_import = builtins.__import__


class TorchFreeError(ModuleNotFoundError):
    """A unit-tier test (or code it runs) imported torch, diffusers or transformers."""


def _is_blocked(name: str) -> bool:
    return name.partition(".")[0] in BLOCKED


def _refuse(name: str):
    raise TorchFreeError(
        f"tests/unit is torch-free, but this imports {name!r} (tests/unit/conftest.py blocks torch, diffusers "
        f"and transformers there). Move the test to tests/parity (agreement with a reference library) or "
        f"tests/integration, or build its model with JAX (tests/helpers.py).", name=name)


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if _active and level == 0 and _is_blocked(name):
        _refuse(name)
    return _builtin_import(name, globals, locals, fromlist, level)


class _Refuser(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if _active and _is_blocked(fullname):
            _refuse(fullname)
        return None  # let the other finders find everything else


def _install():
    if getattr(builtins.__import__, "_torch_free_guard", False):
        return  # installed by an earlier import of this conftest
    _guarded_import._torch_free_guard = True
    builtins.__import__ = _guarded_import
    sys.meta_path.insert(0, _Refuser())


_install()


def _in_unit(path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(UNIT_DIR)
    except (TypeError, ValueError, OSError):
        return False


def _blocked_in(module: types.ModuleType) -> list[str]:
    """Names in `module` (and in the tests.* modules it reaches) bound to a blocked module."""
    found, seen, todo = [], set(), [module]
    while todo:
        mod = todo.pop()
        if mod.__name__ in seen:
            continue
        seen.add(mod.__name__)
        for attr, value in list(vars(mod).items()):
            if isinstance(value, types.ModuleType):
                if _is_blocked(value.__name__):
                    found.append(f"{mod.__name__}.{attr} is the module {value.__name__}")
                elif value.__name__.startswith("tests."):
                    todo.append(value)
            else:
                owner = sys.modules.get(getattr(value, "__module__", None) or "")
                if owner is not None and owner.__name__.startswith("tests.") and (
                        isinstance(value, (type, types.FunctionType))):
                    todo.append(owner)
    return found


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    global _active
    if not _in_unit(collector.path):
        return (yield)
    before, _active = _active, True
    try:
        report = yield
    finally:
        _active = before
    if isinstance(collector, pytest.Module) and report.passed:
        found = _blocked_in(collector.obj)
        if found:
            report.outcome, report.result = "failed", []
            report.longrepr = ("tests/unit is torch-free (tests/unit/conftest.py), but " + "; ".join(found)
                               + ". Move the test to tests/parity or tests/integration.")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _active
    if not _in_unit(item.path):
        return (yield)
    before, _active = _active, True
    try:
        return (yield)
    finally:
        _active = before
