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
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from dpdmd_jax import backbones
from dpdmd_jax import config as config_lib
from dpdmd_jax import data as data_lib
from dpdmd_jax.core import Backbone, DataSource, Frozen, Pairs, Params, Perceptual, RoundBatch, TrainState
from dpdmd_jax.distill import adapters, anchor
from dpdmd_jax.distill.step import Distiller, init_state
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.multihost import SyncedJit
from dpdmd_jax.run.preflight import check_can_start
from dpdmd_jax.weights.lpips import load_lpips


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
    frozen = Frozen(teacher=_stored(params, c.model.teacher_dtype), buffers=buffers,
                    perceptual=_perceptual(c, backbone, mesh, rules))
    nnx.update(teacher, frozen.teacher)  # the module holds what the run holds (the cast donated the rest)
    lora = adapters.adapted_roles(c, backbone, graphdef, frozen.teacher, buffers)
    data = data_lib.make_source(c, backbone, mesh, rules)
    k = anchor.resolve_k(c, workdir, Distiller(c, backbone, graphdef, anchor_k=None), frozen, mesh, data)
    return Run(c, mesh, rules, backbone, Distiller(c, backbone, graphdef, anchor_k=k, adapters=lora), frozen,
               teacher, data)


def _perceptual(c: ml_collections.ConfigDict, backbone: Backbone, mesh: Mesh, rules) -> Perceptual | None:
    """The VAE and LPIPS of DMD v1's LPIPS regression (frozen, float32), or None without it."""
    if not config_lib.lpips_regression(c):
        return None
    r = c.regression
    vae_graphdef, vae = nnx.split(backbone.load_vae(mesh, rules))
    lpips_graphdef, lpips = nnx.split(load_lpips(r.vgg, r.lpips_heads, mesh=mesh, progress=True))
    return Perceptual(vae_graphdef, vae, lpips_graphdef, lpips)


def _stored(params: Params, dtype: str) -> Params:
    """The frozen teacher in `model.teacher_dtype` ("" keeps the loaded dtype), cast in place on its
    shardings (the loaded copy is donated: never two copies on device)."""
    if not dtype or all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(params)):
        return params
    shardings = jax.tree.map(lambda x: x.sharding, params)
    cast = lambda p: jax.tree.map(lambda x: x.astype(dtype), p)
    return SyncedJit(cast, "teacher_dtype", out_shardings=shardings, donate_argnums=(0,))(params)


# ---------------------------------------------------------------------------- batches


def local_rows(run: Run) -> slice:
    """The rows of each round's global batch this process builds."""
    return mesh_lib.process_batch_rows(run.mesh, run.config.batch_size)


def put_batch(run: Run, local: RoundBatch) -> RoundBatch:
    """This process's rows (host arrays) -> global arrays (`parallel.mesh.put_round`)."""
    return mesh_lib.put_round(run.mesh, run.config.batch_size, local)


def round_batch(run: Run, r: int) -> RoundBatch:
    """Round r's global batch (`data.global_round`)."""
    return data_lib.global_round(run.data, run.mesh, run.config.batch_size, r)


def batch_spec(run: Run) -> RoundBatch:
    """Shapes of a round's global batch, from the backbone (no data is built)."""
    c, spec = run.config, run.backbone.cond_spec(run.config.batch_size)
    rows = c.distill.fake_updates_per_student + 1
    real = None
    if config_lib.gan_on_real_data(c):  # the GAN's real latents, aligned with the conditionings
        real = jax.ShapeDtypeStruct((rows, c.batch_size, *run.backbone.latent_shape()), jnp.float32)
    pairs = None
    if config_lib.regression_pairs(c):  # DMD v1's cached pairs for the generator update
        latents = jax.ShapeDtypeStruct((c.batch_size, *run.backbone.latent_shape()), jnp.float32)
        pairs = Pairs(cond=spec, noise=latents, target=latents)
    return RoundBatch(cond=jax.tree.map(lambda s: jax.ShapeDtypeStruct((rows, *s.shape), s.dtype), spec),
                      uncond=spec, real=real, pairs=pairs)


# ---------------------------------------------------------------------------- state and the round


def state_shardings(run: Run, state: TrainState) -> TrainState:
    """Params sharded by their logical axes (the GAN's head by its own); optimizer moments like the
    params they belong to (found by optax from the optimizer's own structure); every other leaf
    replicated."""
    d = run.distiller
    params = lambda role: d.adapters[role][1] if role in d.adapters else run.frozen.teacher  # LoRA: its adapters
    param_sh = {role: mesh_lib.state_shardings(params(role), run.mesh, run.rules) for role in adapters.ROLES}
    rep = mesh_lib.replicated(run.mesh)
    opt_sh = lambda tx, opt_state, sh: optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_state, sh, transform_non_params=lambda _: rep)
    disc_sh = None if state.disc is None else mesh_lib.state_shardings(state.disc, run.mesh, run.rules)
    return TrainState(
        step=rep, rng=rep, student=param_sh["student"], fake=param_sh["fake"],
        opt_student=opt_sh(d.tx_student, state.opt_student, param_sh["student"]),
        opt_fake=opt_sh(d.tx_fake, state.opt_fake, param_sh["fake"]),
        disc=disc_sh, opt_disc=None if state.opt_disc is None else opt_sh(d.tx_disc, state.opt_disc, disc_sh),
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
    # The buffers' shapes only: the GAN head is sized by the features they take part in (nothing is computed).
    buffers = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.frozen.buffers)
    return lambda teacher: init_state(run.distiller, teacher, run.config.seed, buffers)


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
