"""LoRA students and fake scores over one frozen base (config `student.lora`, `fake.lora`).

With `rank > 0` a role (student or fake score) is the frozen teacher plus low-rank adapters on the
linear layers its `targets` select (`models.lora`); only the adapters and their optimizer moments
are trained state. The teacher's parameters are the shared base: the device holds them once, and
the teacher, the student and the fake score all read them.

Targets are matched as peft matches a list of `target_modules`: a layer is adapted if its module
name in the diffusers model (the backbone's `module_names`) equals a target or ends with "." and
the target. A scanned stack adapts all its layers or none (their adapters are stacked too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

from dpdmd_jax.core import Backbone
from dpdmd_jax.models import lora

ROLES = ("student", "fake")
Path = tuple


def settings(c: ml_collections.ConfigDict, role: str) -> ml_collections.ConfigDict:
    """The `lora` block of `role` ("student" or "fake")."""
    return c[role].lora


def rank(c: ml_collections.ConfigDict, role: str) -> int:
    return int(settings(c, role).rank)


def any_lora(c: ml_collections.ConfigDict) -> bool:
    return any(rank(c, role) > 0 for role in ROLES)


def alpha(c: ml_collections.ConfigDict, role: str) -> float:
    """alpha (0 in the config = the rank, i.e. scale 1)."""
    return float(settings(c, role).alpha) or float(rank(c, role))


def module_names(backbone: Backbone, model: nnx.Module) -> dict[Path, tuple[str, ...]]:
    """Each linear layer's module names (one per layer of a scanned stack): the backbone's diffusers
    names where it has them, else our dotted path."""
    layers = lora.dense_layers(model)
    if hasattr(backbone, "module_names"):
        return {path: names for path, names in backbone.module_names(model).items() if path in layers}
    return {path: (".".join(str(p) for p in path),) for path in layers}


def targets(c: ml_collections.ConfigDict, role: str, backbone: Backbone) -> tuple[str, ...] | None:
    """The role's target names: the config's, else the backbone's defaults (None: every linear layer)."""
    return tuple(settings(c, role).targets) or getattr(backbone, "lora_targets", None)


def matches(name: str, names: Sequence[str]) -> bool:
    """peft's rule for a list of target_modules: the full module name, or a suffix after a "."."""
    return any(name == t or name.endswith("." + t) for t in names)


def _layer_kinds(names: dict[Path, tuple[str, ...]]) -> str:
    kinds = sorted({re.sub(r"\.\d+\.", ".N.", n) for ns in names.values() for n in ns})
    return ", ".join(kinds[:40]) + (f" ... ({len(kinds)} in all)" if len(kinds) > 40 else "")


def select(names: dict[Path, tuple[str, ...]], wanted: Sequence[str] | None,
           field: str) -> tuple[list[Path], list[str]]:
    """(paths of the layers `wanted` selects, problems): every target must name at least one linear
    layer, and a scanned stack must match as a whole."""
    if wanted is None:
        return sorted(names, key=str), []
    problems, chosen = [], []
    for t in wanted:
        if not any(matches(n, [t]) for ns in names.values() for n in ns):
            problems.append(f"{field}: {t!r} names no linear layer of the model. Its linear layers (peft's "
                            f"names; a target matches a whole name or its end after a '.'): {_layer_kinds(names)}")
    for path, ns in names.items():
        hits = [matches(n, wanted) for n in ns]
        if all(hits):
            chosen.append(path)
        elif any(hits):
            problems.append(f"{field} selects some layers of the scanned stack {'.'.join(map(str, path))} "
                            f"({ns[0]} ... {ns[-1]}) but not all; with model.scan_layers=True a target adapts "
                            "a whole stack: name the layers by their kind (e.g. 'attn.to_q') or set "
                            "--config.model.scan_layers=False.")
    return sorted(chosen, key=str), problems


def problems(c: ml_collections.ConfigDict, backbone: Backbone) -> list[str]:
    """Checks the LoRA settings against the teacher's architecture (shapes only: no weight is read)."""
    p = []
    for role in ROLES:
        s = settings(c, role)
        if int(s.rank) < 0 or float(s.alpha) < 0:
            p.append(f"{role}.lora: rank and alpha must be >= 0 (got rank={s.rank}, alpha={s.alpha}); rank 0 "
                     "trains the full network.")
    if p or not any_lora(c):
        return p
    names = module_names(backbone, backbone.abstract_teacher())
    for role in ROLES:
        if rank(c, role) > 0:
            p += select(names, targets(c, role, backbone), f"{role}.lora.targets")[1]
    return p


def adapted(c: ml_collections.ConfigDict, role: str, backbone: Backbone, graphdef: nnx.GraphDef,
            *states: nnx.State) -> tuple[nnx.GraphDef, nnx.State] | None:
    """(graphdef, abstract adapters) of `role` over the model (`graphdef`, `states`), or None when it
    trains the full network. The graphdef merges with (adapters, base params, buffers)."""
    if rank(c, role) == 0:
        return None
    states = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states)  # shapes are all it needs

    def build():
        model = nnx.merge(graphdef, *states)
        paths, bad = select(module_names(backbone, model), targets(c, role, backbone), f"{role}.lora.targets")
        if bad:
            raise ValueError("\n".join(bad))
        lora.add_adapters(model, paths, rank(c, role), alpha(c, role))
        return model

    g, adapters, _, _ = lora.split_adapted(nnx.eval_shape(build))
    return g, adapters


def adapted_roles(c: ml_collections.ConfigDict, backbone: Backbone, graphdef: nnx.GraphDef,
                  *states: nnx.State) -> dict[str, tuple[nnx.GraphDef, nnx.State] | None]:
    """`adapted` for the student and the fake score (what `Distiller(adapters=...)` takes)."""
    return {role: adapted(c, role, backbone, graphdef, *states) for role in ROLES}
