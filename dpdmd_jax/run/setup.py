"""Assembling a run from its config: mesh and sharding rules, backbone and frozen teacher, data
source, the anchor step K, the `Distiller`, the train state's shardings, batch placement and the
jitted round. `build` returns a frozen `Run`; nothing here trains or writes checkpoints (`run.train`).

On several hosts each process builds only its rows of every round's batch (`local_rows`), and
`put_batch` assembles the global arrays from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax import backbones
from dpdmd_jax import data as data_lib
from dpdmd_jax.core import Backbone, DataSource, Frozen, Params, RoundBatch, TrainState
from dpdmd_jax.distill import anchor
from dpdmd_jax.distill.step import Distiller, init_state
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.multihost import SyncedJit
from dpdmd_jax.run.preflight import check_can_start


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run's programs are made of; built once by `build`, read by the loop, the sampler
    and the evaluators."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: Any  # logical axis -> mesh axis (`parallel.mesh.mesh_rules`)
    backbone: Backbone
    distiller: Distiller
    frozen: Frozen
    teacher_model: nnx.Module
    data: DataSource


def build(c: ml_collections.ConfigDict, devices=None, checked: bool = False, workdir: str | None = None) -> Run:
    """Validates (unless the caller already ran `preflight.check_can_start`: `checked`), builds the
    mesh (over `devices`, default all), loads the teacher onto it and assembles the run. The anchor
    step K of distill.anchor_k="auto" is resolved for a training run (`workdir`, whose config.json
    must be written: `run.workdir.check_workdir_config`); readers (sampling, export) leave it open."""
    if not checked:
        check_can_start(c, devices=devices)  # the mesh and the batch split among the rest
    mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    rules = mesh_lib.mesh_rules(c)
    backbone = backbones.get(c)
    teacher = backbone.load(mesh, rules)
    graphdef, params, buffers = nnx.split(teacher, nnx.Param, ...)
    frozen = Frozen(teacher=params, buffers=buffers)
    data = data_lib.make_source(c, backbone, mesh, rules)
    k = anchor.resolve_k(c, workdir, Distiller(c, backbone, graphdef, anchor_k=None), frozen, mesh,
                         lambda: _round_batch(c, mesh, data, 0))
    return Run(c, mesh, rules, backbone, Distiller(c, backbone, graphdef, anchor_k=k), frozen, teacher, data)


# ---------------------------------------------------------------------------- batches


def local_rows(run: Run) -> slice:
    """The rows of each round's global batch this process builds."""
    return mesh_lib.process_batch_rows(run.mesh, run.config.batch_size)


def put_batch(run: Run, local: RoundBatch) -> RoundBatch:
    """This process's rows (host arrays) -> global arrays (`parallel.mesh.put_round`)."""
    return mesh_lib.put_round(run.mesh, run.config.batch_size, local)


def _round_batch(c: ml_collections.ConfigDict, mesh: Mesh, data: DataSource, r: int) -> RoundBatch:
    rows = mesh_lib.process_batch_rows(mesh, c.batch_size)
    return data.encode(mesh_lib.put_round(mesh, c.batch_size, data.round(r, rows)))


def round_batch(run: Run, r: int) -> RoundBatch:
    """Round r's global batch, of which this process built only its own rows (then encoded on
    device, for sources that return token ids)."""
    return _round_batch(run.config, run.mesh, run.data, r)


def batch_spec(run: Run) -> RoundBatch:
    """Shapes of a round's global batch, from the backbone (no data is built)."""
    c, spec = run.config, run.backbone.cond_spec(run.config.batch_size)
    rows = c.distill.fake_updates_per_student + 1
    return RoundBatch(cond=jax.tree.map(lambda s: jax.ShapeDtypeStruct((rows, *s.shape), s.dtype), spec),
                      uncond=spec)


# ---------------------------------------------------------------------------- state and the round


def state_shardings(run: Run, state: TrainState) -> TrainState:
    """Params sharded by their logical axes; optimizer moments like the params they belong to
    (found by optax from the optimizer's own structure); every other leaf replicated."""
    param_sh = mesh_lib.state_shardings(run.frozen.teacher, run.mesh, run.rules)
    rep = mesh_lib.replicated(run.mesh)
    opt_sh = lambda tx, opt_state: optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_state, param_sh, transform_non_params=lambda _: rep)
    d = run.distiller
    return TrainState(
        step=rep, rng=rep, student=param_sh, fake=param_sh,
        opt_student=opt_sh(d.tx_student, state.opt_student), opt_fake=opt_sh(d.tx_fake, state.opt_fake),
    )


def abstract_train_state(run: Run) -> TrainState:
    """The train state as `jax.ShapeDtypeStruct`s carrying their shardings (nothing allocated): what
    an ahead-of-time compile or a checkpoint restore takes."""
    shapes, shardings = train_state_shapes(run)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_student(run: Run) -> Params:
    """The student of `abstract_train_state`: what a checkpoint's student is restored onto."""
    return abstract_train_state(run).student


def train_state_shapes(run: Run) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings): the train state's shapes, dtypes and layout, nothing allocated
    (what a checkpoint is restored onto: a resume never holds a fresh state beside the restored one)."""
    shapes = jax.eval_shape(_initial_state(run), run.frozen.teacher)
    return shapes, state_shardings(run, shapes)


def init_train_state(run: Run) -> tuple[TrainState, TrainState]:
    """(state, shardings): student and fake copied from the teacher directly on their shardings."""
    _, shardings = train_state_shapes(run)
    return SyncedJit(_initial_state(run), "init_state", out_shardings=shardings)(run.frozen.teacher), shardings


def _initial_state(run: Run):
    return lambda teacher: init_state(run.distiller, teacher, run.config.seed)


def compile_round(run: Run, state_sh: TrainState) -> SyncedJit:
    """The jitted round; on several processes its first call also waits for every host's compile."""
    frozen_sh = jax.tree.map(lambda x: x.sharding, run.frozen)
    return SyncedJit(
        mesh_lib.rows_split(run.mesh, run.distiller.train_round),
        "round",
        in_shardings=(state_sh, frozen_sh, mesh_lib.round_shardings(run.mesh, batch_spec(run))),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )
