"""The one trainer: set-up (validated up front), the round loop, Orbax checkpoints, CLU metrics,
pre-emption and non-finite guards. It knows no model family: the backbone (`backbones`), the
data source (`data`) and the evaluators (`eval`) are picked by the config.

Resuming is automatic: a workdir with checkpoints continues from the latest one (onto whatever
mesh this run has). Data and noise are functions of (seed, round), so a resumed run replays
exactly what an uninterrupted run would have seen. On several hosts each process builds only its
rows of every round's batch, and a SIGTERM on any host makes all of them save the same round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from dpdmd_jax import backbones
from dpdmd_jax import config as config_lib
from dpdmd_jax import data as data_lib
from dpdmd_jax import eval as eval_lib
from dpdmd_jax import preflight
from dpdmd_jax.distill import anchor
from dpdmd_jax.distill import step as step_lib
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.mesh import mesh_rules
from dpdmd_jax.run_config import check_workdir_config
from dpdmd_jax.parallel import multihost
from dpdmd_jax.parallel.multihost import SyncedJit


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the message says what to do."""


# ---------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    mesh: Mesh
    backbone: backbones.Backbone
    distiller: step_lib.Distiller
    frozen: step_lib.Frozen
    teacher_model: nnx.Module
    data: data_lib.DataSource


def build(c: ml_collections.ConfigDict, devices=None, checked: bool = False) -> Setup:
    """Validates (unless the caller already ran `check_can_start`: `checked`), builds the mesh
    (over `devices`, default all) and loads the teacher onto it."""
    if not checked:
        check_can_start(c)
    try:
        mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    except ValueError as e:
        raise config_lib.ConfigError(f"mesh: {e} (--config.mesh.data / .fsdp / .tensor)") from e
    try:
        mesh_lib.check_batch_divisible(c.batch_size, mesh, "batch_size")
    except ValueError as e:
        raise config_lib.ConfigError(f"{e} (--config.batch_size)") from e
    backbone = backbones.get(c)
    teacher = backbone.load(mesh, mesh_rules(c))
    graphdef, params, buffers = nnx.split(teacher, nnx.Param, ...)
    distiller = step_lib.Distiller(c, backbone, graphdef)
    data = data_lib.make_source(c, backbone, mesh, mesh_rules(c))
    return Setup(c, mesh, backbone, distiller, step_lib.Frozen(teacher=params, buffers=buffers), teacher, data)


# ---------------------------------------------------------------------------- sharding / jit


def state_shardings(setup: Setup, state: step_lib.TrainState) -> step_lib.TrainState:
    """Params sharded by their logical axes; optimizer moments like the params they belong to
    (found by optax from the optimizer's own structure); every other leaf replicated."""
    mesh = setup.mesh
    param_sh = mesh_lib.state_shardings(setup.frozen.teacher, mesh, mesh_rules(setup.config))
    rep = mesh_lib.replicated(mesh)
    opt_sh = lambda tx, opt_state: optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_state, param_sh, transform_non_params=lambda _: rep)
    d = setup.distiller
    return step_lib.TrainState(
        step=rep, rng=rep, student=param_sh, fake=param_sh,
        opt_student=opt_sh(d.tx_student, state.opt_student), opt_fake=opt_sh(d.tx_fake, state.opt_fake),
    )


def batch_shardings(mesh: Mesh, batch: step_lib.RoundBatch):
    round_sh = lambda x: NamedSharding(mesh, PartitionSpec(None, mesh_lib.BATCH_AXES, *([None] * (x.ndim - 2))))
    return step_lib.RoundBatch(
        cond=jax.tree.map(round_sh, batch.cond),
        uncond=jax.tree.map(lambda x: mesh_lib.batch_sharding(mesh, x.ndim), batch.uncond),
    )


def local_rows(setup: Setup) -> slice:
    """The rows of each round's global batch this process builds."""
    return mesh_lib.process_batch_rows(setup.mesh, setup.config.batch_size)


def put_batch(setup: Setup, local: step_lib.RoundBatch) -> step_lib.RoundBatch:
    """This process's rows (host arrays) -> global arrays: each process supplies only the rows its
    devices hold, so no host ever builds the whole batch."""
    b = setup.config.batch_size

    def put(x, sharding, axis):
        shape = list(x.shape)
        shape[axis] = b
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), tuple(shape))

    sh = batch_shardings(setup.mesh, local)
    return step_lib.RoundBatch(cond=jax.tree.map(lambda x, s: put(x, s, 1), local.cond, sh.cond),
                               uncond=jax.tree.map(lambda x, s: put(x, s, 0), local.uncond, sh.uncond))


def round_batch(setup: Setup, r: int) -> step_lib.RoundBatch:
    """Round r's global batch, of which this process built only its own rows (then encoded on
    device, for sources that return token ids)."""
    batch = put_batch(setup, setup.data.round(r, local_rows(setup)))
    encode = getattr(setup.data, "encode", None)
    return encode(batch) if encode is not None else batch


def init_train_state(setup: Setup) -> tuple[step_lib.TrainState, step_lib.TrainState]:
    """(state, shardings): student and fake copied from the teacher directly on their shardings."""
    make = lambda teacher: step_lib.init_state(setup.distiller, teacher, setup.config.seed)
    shardings = state_shardings(setup, jax.eval_shape(make, setup.frozen.teacher))
    return SyncedJit(make, "init_state", out_shardings=shardings)(setup.frozen.teacher), shardings


def batch_spec(setup: Setup) -> step_lib.RoundBatch:
    """Shapes of a round's global batch, from the backbone (no data is built)."""
    c, spec = setup.config, setup.backbone.cond_spec(setup.config.batch_size)
    rows = c.distill.fake_updates_per_student + 1
    return step_lib.RoundBatch(cond=jax.tree.map(lambda s: jax.ShapeDtypeStruct((rows, *s.shape), s.dtype), spec),
                               uncond=spec)


def compile_round(setup: Setup, state_sh) -> SyncedJit:
    """The jitted round; on several processes its first call also waits for every host's compile."""
    frozen_sh = jax.tree.map(lambda x: x.sharding, setup.frozen)
    return SyncedJit(
        setup.distiller.train_round,
        "round",
        in_shardings=(state_sh, frozen_sh, batch_shardings(setup.mesh, batch_spec(setup))),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )


def choose_anchor_k(setup: Setup, workdir: str) -> int | None:
    """The run's anchor step K: the config's, the one an earlier run in `workdir` chose and recorded
    in its config.json, or, for distill.anchor_k="auto", the one `dpdmd_jax.distill.anchor` picks
    from a teacher pass over round 0's first prompts (then printed and recorded in the workdir). None for plain DMD
    with "auto": lambda_div = 0 never runs the anchor, so there is nothing to choose."""
    c, d = setup.config, setup.distiller
    if c.distill.anchor_k != "auto":
        return int(c.distill.anchor_k)
    if c.distill.lambda_div == 0:
        return None
    recorded = anchor.recorded_k(workdir)
    if recorded is not None:  # a resumed run: the same K, no second teacher pass
        print(f"distill.anchor_k=auto: K={recorded}, as chosen and recorded in {workdir}/config.json")
        return recorded
    a, m = c.distill.auto_anchor, c.distill.fake_updates_per_student

    def curve(frozen, cond, uncond):
        pick = lambda x: jnp.repeat(x[: a.prompts], a.seeds, axis=0)  # a prompt's seeds adjacent
        cond, uncond = jax.tree.map(lambda x: pick(x[m]), cond), jax.tree.map(pick, uncond)
        eps = jax.random.normal(jax.random.key(c.seed), (a.prompts * a.seeds, *d.latent_shape), jnp.float32)
        return anchor.target_curve(d, frozen, eps, cond, uncond, a.seeds)

    print(f"distill.anchor_k=auto: two teacher passes ({a.prompts} prompts x {a.seeds} seeds, "
          f"{len(d.teacher_grid) - 1} steps) to choose K ...", flush=True)
    batch = round_batch(setup, 0)
    fn = SyncedJit(curve, "anchor_curve", out_shardings=mesh_lib.replicated(setup.mesh))
    ratios = np.asarray(jax.device_get(fn(setup.frozen, batch.cond, batch.uncond)))
    k = anchor.choose_k(ratios, a.fraction)
    levels = d.teacher_grid[1:]
    print(anchor.curve_table(levels, ratios, k))
    print(f"distill.anchor_k=auto: K={k}, the first K whose target carries >= {a.fraction:g} of the final samples' "
          f"within-prompt variation (recorded in {workdir}/config.json)", flush=True)
    if jax.process_index() == 0:
        anchor.record(workdir, k, dict(criterion=a.criterion, fraction=a.fraction, prompts=a.prompts, seeds=a.seeds,
                                       levels=levels.tolist(), carried=ratios.tolist()))
    return k


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, c: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep_checkpoints, enable_async_checkpointing=True, create=True
    )
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")  # Orbax needs absolute
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, state: step_lib.TrainState, meta: dict, force: bool = False) -> None:
    step = int(state.step)
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=force)


def restore(mngr: ocp.CheckpointManager, step: int, state_like, shardings) -> step_lib.TrainState:
    """Restores onto `shardings` (any mesh): arrays are read straight into their new layout."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # corrupt / incompatible checkpoint: say which and what to do
        raise TrainingError(
            f"could not restore checkpoint step {step} from {mngr.directory} ({type(e).__name__}: {e}). "
            "If it is corrupt, delete that step's folder to resume from the previous one; if the model "
            "changed, use a new --workdir."
        ) from e
    return restored.state


# ---------------------------------------------------------------------------- workdir config


# ---------------------------------------------------------------------------- loop


def absolute(workdir: str) -> str:
    return os.path.abspath(os.path.expanduser(workdir))


def end_of_run_message(c: ml_collections.ConfigDict, workdir: str, summary: dict) -> str:
    """What a finished run wrote, where, and the commands that take its student further."""
    steps = preflight.checkpoint_steps(workdir)
    lines = [f"Done: {steps[-1] if steps else c.num_rounds} rounds in {workdir}",
             f"  checkpoints   {workdir}/checkpoints (latest: {steps[-1] if steps else 'none'})",
             f"  metrics       {workdir}/metrics.jsonl; TensorBoard: tensorboard --logdir {workdir}/tb"]
    for name in ("summary.json", "comparison.md"):
        if os.path.exists(os.path.join(workdir, name)):
            lines.append(f"  {name:<13} {workdir}/{name}")
    samples = os.path.join(workdir, "samples", "student")
    lines += ["Next:",
              f"  python -m dpdmd_jax.sample --workdir={workdir} --out={samples}",
              f"  python -m dpdmd_jax.evaluate --samples={samples}",
              f"  python -m dpdmd_jax.export --workdir={workdir} --out={workdir}/export"]
    return "\n".join(lines)


def check_can_start(c: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Raises ConfigError listing every problem of the run (config, sources and, given one, the
    workdir) at once, before anything is loaded or written (`dpdmd_jax.preflight`)."""
    problems = preflight.run_problems(c, workdir)
    if problems:
        raise config_lib.ConfigError("the run cannot start:\n  - " + "\n  - ".join(problems))


@contextlib.contextmanager
def undo_failed_start(workdir: str):
    """A start that fails before its first checkpoint leaves the workdir as it found it: a folder this
    run created is removed, and so is a config.json it wrote (else the corrected command would be
    refused as "a different config"). Anything an earlier run wrote is never touched."""
    created = not os.path.exists(workdir)
    had_config = os.path.exists(os.path.join(workdir, "config.json"))
    try:
        yield
    except Exception:
        if jax.process_index() == 0 and not preflight.checkpoint_steps(workdir):
            if created:
                shutil.rmtree(workdir, ignore_errors=True)
            elif not had_config:
                for name in ("config.json", anchor.RECORD):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(workdir, name))
        raise


def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the distillation described by `c` in `workdir`; returns the summary (what the
    config's final evaluators report), or {"preempted_at": round} after a pre-emption."""
    workdir = absolute(workdir)
    check_can_start(c, workdir)
    with undo_failed_start(workdir):
        return _train(c, workdir)


def _train(c: ml_collections.ConfigDict, workdir: str) -> dict:
    setup = build(c, checked=True)  # `train` ran check_can_start
    check_workdir_config(workdir, c)
    setup.distiller.anchor_k = choose_anchor_k(setup, workdir)
    state, shardings = init_train_state(setup)
    mngr = checkpoint_manager(workdir, c)
    latest = mngr.latest_step()
    if latest is not None and latest >= c.num_rounds:
        print(f"{workdir} already finished at round {latest} (num_rounds={c.num_rounds}); nothing to train "
              "(raise --config.num_rounds to train on).", flush=True)
    elif latest is not None:
        print(f"Resuming from checkpoint step {latest} in {mngr.directory}", flush=True)
    if latest is not None:
        logging.info("resuming from %s step %d", mngr.directory, latest)
        state = restore(mngr, latest, state, shardings)
    start = int(state.step)

    rows = local_rows(setup)
    if jax.process_count() > 1:
        print(f"process {jax.process_index()}/{jax.process_count()} builds batch rows {rows.start}:{rows.stop} "
              f"of {c.batch_size}", flush=True)
    round_fn = compile_round(setup, shardings)
    is_main = jax.process_index() == 0
    evaluators = eval_lib.make_evaluators(c, setup, workdir)
    # clu's writers import TensorFlow (seconds): only here, after every input has been checked.
    from clu import periodic_actions

    from dpdmd_jax.distill.writers import make_writer

    writer = make_writer(workdir, start)
    report = periodic_actions.ReportProgress(num_train_steps=c.num_rounds, writer=writer)
    preempt = multihost.Preemption()
    meta = lambda st: {"step": int(st.step), "data_position": int(st.step), "seed": c.seed}
    last_log = time.time()
    bar = tqdm(total=c.num_rounds, initial=start, desc="rounds", disable=not is_main, dynamic_ncols=True)
    try:
        for r in range(start, c.num_rounds):
            state, metrics = round_fn(state, setup.frozen, round_batch(setup, r))
            step = r + 1
            report(step)
            if int(state.nonfinite) >= c.max_nonfinite:
                raise TrainingError(
                    f"{int(state.nonfinite)} consecutive rounds had non-finite generator gradients (last at round "
                    f"{step}); their updates were skipped and the last good checkpoint is intact. Lower "
                    "optim.student.lr / optim.fake.lr or check the teacher weights, then resume."
                )
            last = step == c.num_rounds
            if step % c.log_every == 0 or last:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                scalars["rounds_per_sec"] = c.log_every / max(now - last_log, 1e-9)
                scalars["lr_student"], scalars["lr_fake"] = c.optim.student.lr, c.optim.fake.lr
                scalars["skipped_updates"] = float(state.skipped)
                last_log = now
                writer.write_scalars(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.4g}", dmd=f"{scalars['loss_dmd']:.3g}",
                                div=f"{scalars['loss_div']:.3g}", fake=f"{scalars.get('loss_fake', 0):.3g}")
            for every, evaluator in evaluators.values():
                if every and (step % every == 0 or last):
                    evaluator.run(step, state, writer)
            if step % c.checkpoint_every == 0 or last:
                save(mngr, state, meta(state))
            bar.update(1)
            if preempt.reached(step):
                print(f"\nSIGTERM received: saving round {step} and exiting.", flush=True)
                save(mngr, state, meta(state), force=True)
                break
    finally:
        bar.close()
        mngr.wait_until_finished()
        writer.flush()
        preempt.restore()
    if preempt.requested:
        return {"preempted_at": int(state.step)}
    summary = {}
    for every, evaluator in evaluators.values():
        if not every:
            summary.update(evaluator.run(int(state.step), state, writer) or {})
    writer.flush()
    mngr.close()
    return summary


# ---------------------------------------------------------------------------- baseline


BASELINE_DIR = "dmd_baseline"


def train_with_baseline(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """`train`; then, with `compare_with_dmd` (the toy default), plain DMD (lambda_div = 0, every
    other setting the same) in workdir/dmd_baseline, and the teacher, DMD and DP-DMD rows of their
    summaries side by side (printed, workdir/comparison.md, summary["dmd_baseline"]). The baseline is
    an ordinary run: it resumes, and a finished one is only read back. It shares the teacher's
    cached metrics, which depend on the seed and the teacher alone."""
    import shutil

    summary = train(c, workdir)
    if not c.get("compare_with_dmd") or c.distill.lambda_div == 0 or "preempted_at" in summary:
        return summary
    workdir = os.path.abspath(os.path.expanduser(workdir))
    base_dir = os.path.join(workdir, BASELINE_DIR)
    base = c.copy_and_resolve_references()
    base.distill.lambda_div, base.compare_with_dmd = 0.0, False
    os.makedirs(base_dir, exist_ok=True)
    teacher_cache = os.path.join(workdir, "teacher_metrics.json")
    if os.path.exists(teacher_cache) and jax.process_index() == 0:
        shutil.copyfile(teacher_cache, os.path.join(base_dir, "teacher_metrics.json"))
    print(f"\nPlain DMD under the same settings (the baseline), in {base_dir}:", flush=True)
    baseline = train(base, base_dir)
    if "preempted_at" in baseline:  # the job is not finished: the caller exits "pre-empted"
        return {**summary, "preempted_at": baseline["preempted_at"], "preempted_in": base_dir}
    if "student" not in summary or "student" not in baseline:
        return summary
    k = c.distill.anchor_k if c.distill.anchor_k != "auto" else f"{anchor.recorded_k(workdir)}, auto"
    table = comparison_table(summary["teacher"], baseline["student"], summary["student"], anchor_k=k,
                             rounds=summary.get("rounds"))
    print("\n" + table)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "comparison.md"), "w") as f:
            f.write(table + "\n")
        summary["dmd_baseline"] = baseline["student"]
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


COMPARED = ("nfe", "diversity_layout", "diversity_pixel", "spread_cx", "spread_cy", "spread_size", "adherence",
            "valid", "frechet_layout")


def comparison_table(teacher: dict, dmd: dict, dp_dmd: dict, anchor_k: Any, rounds: int | None) -> str:
    """Markdown: the teacher, the DMD baseline and the DP-DMD student, on the metrics all three have."""
    from dpdmd_jax.tables import markdown_table

    keys = [k for k in COMPARED if all(k in row for row in (teacher, dmd, dp_dmd))]
    named = (("teacher", teacher), ("DMD (lambda_div = 0)", dmd), (f"DP-DMD (K = {anchor_k})", dp_dmd))
    rows = [[name, *(f"{row[k]:.0f}" if k == "nfe" else f"{row[k]:.3f}" for k in keys)] for name, row in named]
    head = f"Teacher vs students after {rounds} rounds, same settings and evaluation noise (frechet: lower is better):"
    return head + "\n\n" + markdown_table(["", *keys], rows)

