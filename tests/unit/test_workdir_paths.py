"""A multi-host run's workdir is shared by every host (gs://bucket/run or a shared file system), so
every file a run reads or writes there -- config.json, the auto anchor's record, metrics.jsonl,
summaries, the failed-start cleanup, sample folders and their evaluation -- goes through
`etils.epath` (what Orbax uses), never open() / os.path, which would use a local ./gs:/... instead.

Checked here statically: no builtin file operation in the modules that touch a run's files, except
the listed local-only ones, and the check catches a planted regression. The same files in a fake
gs:// bucket, through a tiny training run, sampling, evaluation and the failed-start cleanup:
tests/integration/test_workdir_bucket.py.
"""

from __future__ import annotations

import ast
import pathlib



ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dpdmd_jax"

# ---------------------------------------------------------------------------- the static check

# The modules the issue names; every other module that names a `workdir` is checked too (below).
NAMED = {"run_config.py", "run/workdir.py", "run/train.py", "run/baseline.py", "run/preflight.py", "run/sample.py",
         "run/export.py", "distill/writers.py", "distill/anchor.py", "sampling/folder.py", "sampling/sampler.py",
         "eval/folder.py", "eval/toy.py"}
# Modules that name a workdir but whose files are local by design (not a run's shared workdir).
LOCAL_ONLY = {
    "toy/train_teacher.py": "trains the shipped toy teacher into a local folder (a tool, not a distillation run)",
    "export.py": "prints the export folder it wrote, which is local (run/export.py refuses a URI --out)",
}
# Builtin file operations that stay, each on a path that is never a run's file.
ALLOWED = {
    ("run_config.py", "absolute", "os.path.abspath"): "a local path only: a URI is returned as it is",
    ("run_config.py", "absolute", "os.path.expanduser"): "a local path only: a URI is returned as it is",
    ("run_config.py", "with_recorded_config", "os.path.abspath"): "this module's own file (the --config it names)",
    ("run/preflight.py", "<module>", "import tempfile"): "the local branch of workdir_problems",
    ("run/preflight.py", "workdir_problems", "tempfile.TemporaryFile"):
        "a local folder only (a URI is probed through epath): an unnamed file, gone even if killed",
    ("eval/folder.py", "Towers._preprocessing", "os.path.join"): "names the --clip / --dino model folder's file",
    ("eval/folder.py", "evaluate", "os.path.isfile"): "--clip / --dino model folders: local inputs",
    ("eval/folder.py", "evaluate", "os.path.join"): "--clip / --dino model folders: local inputs",
    ("distill/writers.py", "_png", "Image.save"): "into an in-memory buffer (the events file goes through epath)",
}
FS_MODULES = {"shutil", "glob", "tempfile", "pathlib"}
OS_FS_FUNCTIONS = {"makedirs", "mkdir", "remove", "unlink", "rename", "replace", "listdir", "scandir", "rmdir",
                   "removedirs", "walk", "stat", "lstat", "chmod", "symlink", "link", "access", "open", "truncate"}


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of names and attributes; None for anything else (a call's result, ...)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def file_operations(source: str) -> list[tuple[str, str, int]]:
    """(enclosing function, operation, line) of every builtin file operation in `source`: open(),
    os.path.*, os's file functions, shutil / glob / tempfile / pathlib, and PIL reading or writing a
    path rather than a file object (one epath opened, or an io.BytesIO)."""
    tree = ast.parse(source)
    file_objects = {item.optional_vars.id for node in ast.walk(tree) if isinstance(node, ast.With)
                    for item in node.items
                    if isinstance(item.context_expr, ast.Call) and isinstance(item.context_expr.func, ast.Attribute)
                    and item.context_expr.func.attr == "open" and isinstance(item.optional_vars, ast.Name)}
    found = []

    def is_file_object(args: list[ast.expr]) -> bool:
        if not args:
            return False
        a = args[0]
        return (isinstance(a, ast.Name) and a.id in file_objects) or (
            isinstance(a, ast.Call) and _dotted(a.func) == "io.BytesIO")

    def visit(node: ast.AST, scope: list[str]) -> None:
        where = ".".join(scope) or "<module>"
        if isinstance(node, ast.Import):
            found.extend((where, f"import {a.name}", node.lineno) for a in node.names
                         if a.name.split(".")[0] in FS_MODULES or a.name == "os.path")
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            names = {a.name for a in node.names}
            if top in FS_MODULES or node.module == "os.path" or (
                    node.module == "os" and names & (OS_FS_FUNCTIONS | {"path"})):
                found.append((where, f"from {node.module} import {', '.join(sorted(names))}", node.lineno))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func) or ""
            parts = name.split(".")
            if (name == "open" or name.startswith("os.path.") or (parts[0] == "os" and len(parts) == 2
                                                                      and parts[1] in OS_FS_FUNCTIONS)
                    or (parts[0] in FS_MODULES and len(parts) > 1)):
                found.append((where, name, node.lineno))
            elif name == "Image.open" and not is_file_object(node.args):
                found.append((where, "Image.open", node.lineno))
            elif (isinstance(node.func, ast.Attribute) and node.func.attr == "save"
                  and isinstance(node.func.value, ast.Call)  # Image.fromarray(...).save(...)
                  and (_dotted(node.func.value.func) or "").startswith("Image.") and not is_file_object(node.args)):
                found.append((where, "Image.save", node.lineno))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = [*scope, node.name]
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, [])
    return found


def names_a_workdir(source: str) -> bool:
    return any((isinstance(n, ast.Name) and n.id == "workdir") or (isinstance(n, ast.arg) and n.arg == "workdir")
               or (isinstance(n, ast.Attribute) and n.attr == "workdir") for n in ast.walk(ast.parse(source)))


def covered_modules() -> list[str]:
    """The issue's modules, and every other module of the package that names a workdir."""
    rel = {p.relative_to(PACKAGE).as_posix(): p for p in PACKAGE.rglob("*.py")}
    return sorted((NAMED | {m for m, p in rel.items() if names_a_workdir(p.read_text())}) - set(LOCAL_ONLY))


def test_the_check_catches_file_operations_on_paths():
    planted = """
import shutil
from os.path import join
from PIL import Image
from etils import epath

def write(workdir, image):
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        f.write("{}")
    os.makedirs(workdir, exist_ok=True)
    shutil.rmtree(workdir)
    Image.open(workdir + "/a.png")
    Image.fromarray(image).save(workdir + "/b.png")
    with epath.Path(workdir, "c.png").open("wb") as fine:
        Image.fromarray(image).save(fine)  # a file object epath opened: not a path
    os.fsync(fine.fileno())  # a descriptor, not a path
"""
    assert [op for _, op, _ in file_operations(planted)] == [
        "import shutil", "from os.path import join", "open", "os.path.join", "os.makedirs", "shutil.rmtree",
        "Image.open", "Image.save"]
    assert {where for where, _, _ in file_operations(planted)} == {"<module>", "write"}


def test_the_run_files_go_through_epath_only():
    modules = covered_modules()
    assert NAMED <= set(modules) and {"main.py", "sample.py", "eval/samples.py"} <= set(modules)
    seen, offending = set(), []
    for m in modules:
        for where, op, line in file_operations((PACKAGE / m).read_text()):
            if (m, where, op) in ALLOWED:
                seen.add((m, where, op))
            else:
                offending.append(f"dpdmd_jax/{m}:{line} {where}: {op}")
    assert offending == [], "use etils.epath for a run's files (the workdir may be gs://):\n" + "\n".join(offending)
    assert seen == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - seen}"
    for m in LOCAL_ONLY:
        assert file_operations((PACKAGE / m).read_text()), f"{m} has no local file operation left: check it instead"
