"""The one trainer: set-up (validated up front), the round loop, Orbax checkpoints, CLU metrics,
pre-emption, non-finite guards, and the final toy evaluation.

Resuming is automatic: a workdir with checkpoints continues from the latest one (onto whatever
mesh this run has). Data and noise are functions of (seed, round), so a resumed run replays
exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from dpdmd_jax import config as config_lib
from dpdmd_jax.distill import step as step_lib
from dpdmd_jax.models.mmdit import MMDiT, MMDiTConfig
from dpdmd_jax.parallel import mesh as mesh_lib


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the message says what to do."""


# ---------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    mesh: Mesh
    distiller: step_lib.Distiller
    frozen: step_lib.Frozen
    teacher_model: MMDiT
    data: Any  # RoundSource


def _exec_overrides(c: ml_collections.ConfigDict) -> dict[str, Any]:
    m = c.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                remat_policy=m.remat_policy, attention_impl=m.attention_impl)


def load_teacher(c: ml_collections.ConfigDict, mesh: Mesh) -> MMDiT:
    """The frozen teacher, placed on `mesh` by its logical axes."""
    source = c.model.source
    if source == "toy":
        from dpdmd_jax.toy.teacher import load_toy_teacher

        return load_toy_teacher(mesh=mesh, **_exec_overrides(c))
    if source.startswith("random"):  # tests and benchmarks: a random model of `model.arch`
        cfg = MMDiTConfig(**dict(c.model.arch), **_exec_overrides(c))
        model = MMDiT(cfg, rngs=nnx.Rngs(c.seed))
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, mesh_lib.state_shardings(state, mesh)))
        return model
    from dpdmd_jax.weights.sd3 import load_mmdit

    return load_mmdit(source, mesh=mesh, **_exec_overrides(c))


class ToyRounds:
    """Class-conditioned toy prompts: round r's class ids come from a generator seeded by (seed, r)."""

    def __init__(self, c: ml_collections.ConfigDict, model_cfg: MMDiTConfig):
        from dpdmd_jax.toy import teacher as toy_teacher

        self._cond = lambda ids: toy_teacher.toy_conditioning(
            ids, model_cfg.joint_attention_dim, model_cfg.pooled_projection_dim
        )
        self.seed, self.batch = c.seed, c.batch_size
        self.rows = c.distill.fake_updates_per_student + 1
        self.latent_shape = (model_cfg.sample_size, model_cfg.sample_size, model_cfg.in_channels)

    def round(self, r: int) -> step_lib.RoundBatch:
        ids = np.random.default_rng([self.seed, r]).integers(0, 6, size=self.rows * self.batch)
        ctx, pooled = self._cond(ids)
        cond = step_lib.Cond(ctx.reshape(self.rows, self.batch, *ctx.shape[1:]),
                             pooled.reshape(self.rows, self.batch, -1))
        uctx, upooled = self._cond(np.full(self.batch, -1))
        return step_lib.RoundBatch(cond=cond, uncond=step_lib.Cond(uctx, upooled))


def make_data(c: ml_collections.ConfigDict, model_cfg: MMDiTConfig):
    if c.data.kind == "toy":
        return ToyRounds(c, model_cfg)
    raise config_lib.ConfigError(
        "data.kind='prompts' needs the SD3 text encoders (CLIP-L, OpenCLIP-bigG, T5-XXL) to turn prompts "
        "into `context`/`pooled` embeddings, and they are not ported yet (tracked in the text-encoder "
        "issue). Until then only the toy (--config=configs/toy.py) can train."
    )


def check_prompts_input(c: ml_collections.ConfigDict) -> None:
    """Cheap input checks that must fail before any weight is read."""
    if c.data.kind == "prompts":
        if not c.data.prompt_file or not os.path.isfile(c.data.prompt_file):
            raise config_lib.ConfigError(
                f"data.prompt_file={c.data.prompt_file!r} does not exist; point it at a text file with one "
                "prompt per line (--config.data.prompt_file=prompts.txt)."
            )
        with open(c.data.prompt_file, encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                raise config_lib.ConfigError(f"data.prompt_file={c.data.prompt_file!r} holds no prompts.")
        make_data(c, None)  # raises while the text encoders are missing
    if c.model.source not in ("toy",) and not c.model.source.startswith("random") and not os.path.exists(
        c.model.source
    ):
        raise config_lib.ConfigError(
            f"model.source={c.model.source!r} does not exist; set --config.model.source to a diffusers "
            "SD3/SD3.5 transformer/ folder (or the pipeline root that contains it)."
        )


def build(c: ml_collections.ConfigDict, devices=None) -> Setup:
    """Validates, builds the mesh (over `devices`, default all) and loads the teacher onto it."""
    config_lib.validate(c)
    try:
        mesh = mesh_lib.make_mesh(**c.mesh, devices=devices)
    except ValueError as e:
        raise config_lib.ConfigError(f"mesh: {e} (--config.mesh.data / .fsdp / .tensor)") from e
    try:
        mesh_lib.check_batch_divisible(c.batch_size, mesh, "batch_size")
    except ValueError as e:
        raise config_lib.ConfigError(f"{e} (--config.batch_size)") from e
    check_prompts_input(c)
    teacher = load_teacher(c, mesh)
    data = make_data(c, teacher.cfg)
    graphdef, params, buffers = nnx.split(teacher, nnx.Param, ...)
    distiller = step_lib.Distiller(c, graphdef, data.latent_shape)
    return Setup(c, mesh, distiller, step_lib.Frozen(teacher=params, buffers=buffers), teacher, data)


# ---------------------------------------------------------------------------- sharding / jit


def state_shardings(setup: Setup, state: step_lib.TrainState) -> step_lib.TrainState:
    """Params and optimizer moments sharded like the teacher (by logical axes); scalars replicated."""
    mesh = setup.mesh
    param_sh = mesh_lib.state_shardings(setup.frozen.teacher, mesh)
    rep = mesh_lib.replicated(mesh)

    # optax moments mirror the params tree (sharded alike); counts and other leaves are replicated.
    opt_sh = lambda opt_state: _match_params(opt_state, param_sh, rep)
    return step_lib.TrainState(
        step=rep, rng=rep, student=param_sh, fake=param_sh,
        opt_student=opt_sh(state.opt_student), opt_fake=opt_sh(state.opt_fake), nonfinite=rep, skipped=rep,
    )


def _match_params(opt_state, param_sh, rep):
    """Shardings for an optax state: subtrees shaped like the params get the params' shardings."""
    param_struct = jax.tree.structure(param_sh)

    def visit(node):
        if jax.tree.structure(node) == param_struct:
            return param_sh
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(visit(x) for x in node))
        if isinstance(node, (tuple, list)):
            return type(node)(visit(x) for x in node)
        return jax.tree.map(lambda _: rep, node)

    return visit(opt_state)


def batch_shardings(mesh: Mesh, batch: step_lib.RoundBatch):
    round_sh = lambda x: NamedSharding(mesh, PartitionSpec(None, mesh_lib.BATCH_AXES, *([None] * (x.ndim - 2))))
    return step_lib.RoundBatch(
        cond=jax.tree.map(round_sh, batch.cond),
        uncond=jax.tree.map(lambda x: mesh_lib.batch_sharding(mesh, x.ndim), batch.uncond),
    )


def put_batch(mesh: Mesh, batch: step_lib.RoundBatch) -> step_lib.RoundBatch:
    """Host arrays -> global arrays. Every process builds the same round from (seed, round), so on
    several hosts each one places just the shards its devices hold."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), batch, batch_shardings(mesh, batch))


def init_train_state(setup: Setup) -> tuple[step_lib.TrainState, step_lib.TrainState]:
    """(state, shardings): student and fake copied from the teacher directly on their shardings."""
    make = lambda teacher: step_lib.init_state(setup.distiller, teacher, setup.config.seed)
    shardings = state_shardings(setup, jax.eval_shape(make, setup.frozen.teacher))
    return jax.jit(make, out_shardings=shardings)(setup.frozen.teacher), shardings


def compile_round(setup: Setup, state_sh, example_batch):
    frozen_sh = jax.tree.map(lambda x: x.sharding, setup.frozen)
    return jax.jit(
        setup.distiller.train_round,
        in_shardings=(state_sh, frozen_sh, batch_shardings(setup.mesh, example_batch)),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )


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


_RESUMABLE_CHANGES = {"num_rounds", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                      "max_nonfinite", "eval", "mesh", "model.scan_layers", "model.remat_policy"}


def check_workdir_config(workdir: str, c: ml_collections.ConfigDict) -> None:
    """First run writes config.json; later runs must match it (except loop/layout knobs), so a
    workdir never silently mixes two experiments."""
    path = os.path.join(workdir, "config.json")
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
            raise config_lib.ConfigError(
                f"{workdir} holds a run with a different config ({changes}). "
                "Resume with the same settings, or start this experiment in a new --workdir."
            )
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(current, f, indent=2)
        os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------- loop


class MetricsLog:
    """workdir/metrics.jsonl: one JSON line per logged round. On resume, lines past the restored
    round (written after the last checkpoint by a killed run) are dropped, so the log always
    describes one consistent run."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        if os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)

    def write(self, step: int, scalars: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")


class _Preemption:
    """SIGTERM -> finish the current round, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _grid(images: np.ndarray, cols: int, scale: int = 4) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one [rows*H*scale, cols*W*scale, C] image in [0, 1]."""
    images = np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)
    n, h, w, ch = images.shape
    rows = -(-n // cols)
    images = np.concatenate([images, np.zeros((rows * cols - n, h, w, ch), np.float32)])
    grid = images.reshape(rows, cols, h, w, ch).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, ch)
    return grid.repeat(scale, 0).repeat(scale, 1)


def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the distillation described by `c` in `workdir`; returns the summary."""
    from clu import metric_writers, periodic_actions

    workdir = os.path.abspath(os.path.expanduser(workdir))
    setup = build(c)
    check_workdir_config(workdir, c)
    state, shardings = init_train_state(setup)
    mngr = checkpoint_manager(workdir, c)
    latest = mngr.latest_step()
    if latest is not None:
        logging.info("resuming from %s step %d", mngr.directory, latest)
        print(f"Resuming from checkpoint step {latest} in {mngr.directory}")
        state = restore(mngr, latest, state, shardings)
    start = int(state.step)

    round_fn = compile_round(setup, shardings, setup.data.round(0))
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=not is_main)
    report = periodic_actions.ReportProgress(num_train_steps=c.num_rounds, writer=writer)
    preempt = _Preemption()
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start) if is_main else None
    meta = lambda st: {"step": int(st.step), "data_position": int(st.step), "seed": c.seed}
    samples = _sample_fn(setup)
    last_log = time.time()
    bar = tqdm(total=c.num_rounds, initial=start, desc="rounds", disable=not is_main, dynamic_ncols=True)
    try:
        for r in range(start, c.num_rounds):
            batch = put_batch(setup.mesh, setup.data.round(r))
            state, metrics = round_fn(state, setup.frozen, batch)
            step = r + 1
            report(step)
            if int(state.nonfinite) >= c.max_nonfinite:
                raise TrainingError(
                    f"{int(state.nonfinite)} consecutive rounds had non-finite generator losses (last at round "
                    f"{step}); their updates were skipped and the last good checkpoint is intact. Lower "
                    "optim.student.lr / optim.fake.lr or check the teacher weights, then resume."
                )
            if step % c.log_every == 0 or step == c.num_rounds:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                scalars["rounds_per_sec"] = c.log_every / max(now - last_log, 1e-9)
                scalars["lr_student"], scalars["lr_fake"] = c.optim.student.lr, c.optim.fake.lr
                scalars["skipped_updates"] = float(state.skipped)
                last_log = now
                writer.write_scalars(step, scalars)
                if log is not None:
                    log.write(step, {k: v for k, v in scalars.items() if k != "rounds_per_sec"})
                bar.set_postfix(loss=f"{scalars['loss']:.4g}", dmd=f"{scalars['loss_dmd']:.3g}",
                                div=f"{scalars['loss_div']:.3g}", fake=f"{scalars.get('loss_fake', 0):.3g}")
            if step % c.sample_every == 0 or step == c.num_rounds:
                writer.write_images(step, {"student_samples": samples(state.student)[None]})
            if step % c.checkpoint_every == 0 or step == c.num_rounds:
                save(mngr, state, meta(state))
            bar.update(1)
            if preempt.requested:
                print(f"\nSIGTERM received: saving round {step} and exiting.")
                save(mngr, state, meta(state), force=True)
                break
    finally:
        bar.close()
        mngr.wait_until_finished()
        writer.flush()
        preempt.restore()
    if preempt.requested:
        return {"preempted_at": int(state.step)}
    summary = evaluate(setup, state, workdir) if c.eval.enabled and c.data.kind == "toy" else {}
    writer.flush()
    mngr.close()
    return summary


def _sample_fn(setup: Setup):
    """Student sample grid (6 toy classes x 8 seeds) for TensorBoard."""
    if setup.config.data.kind != "toy":
        return lambda params: np.zeros((8, 8, 3), np.float32)
    from dpdmd_jax.toy.teacher import toy_conditioning

    ids = np.repeat(np.arange(6), 8)
    ctx, pooled = toy_conditioning(ids, setup.teacher_model.cfg.joint_attention_dim,
                                   setup.teacher_model.cfg.pooled_projection_dim)
    cond = step_lib.Cond(ctx, pooled)
    eps = jax.random.normal(jax.random.key(1234), (ids.size, *setup.distiller.latent_shape))
    fn = jax.jit(lambda p, b: setup.distiller.sample(p, b, eps, cond))
    return lambda params: _grid(np.asarray(fn(params, setup.frozen.buffers)), cols=8)


def evaluate(setup: Setup, state: step_lib.TrainState, workdir: str) -> dict:
    """Toy metrics of the 4-step student vs the T-step teacher (same noise, same prompts); printed and
    written to workdir/summary.json."""
    from dpdmd_jax.toy import metrics as toy_metrics
    from dpdmd_jax.toy.teacher import evaluate_sampler

    c = setup.config
    kw = dict(seeds=c.eval.seeds_per_prompt, repeats=c.eval.repeats, seed=c.seed + 777)
    cache = os.path.join(workdir, "teacher_metrics.json")
    if os.path.exists(cache):
        with open(cache) as f:
            teacher = json.load(f)
    else:
        teacher = evaluate_sampler(setup.teacher_model, (c.teacher.cfg_scale,),
                                   sigmas=setup.distiller.teacher_sigmas, **kw)[float(c.teacher.cfg_scale)]
        with open(cache, "w") as f:
            json.dump(teacher, f, indent=2)
    student_model = nnx.merge(setup.distiller.graphdef, state.student, setup.frozen.buffers)
    student = evaluate_sampler(student_model, (1.0,), sigmas=setup.distiller.student_sigmas, **kw)[1.0]
    summary = {
        "rounds": int(state.step),
        "teacher": {"nfe": 2 * c.teacher.steps, "cfg_scale": c.teacher.cfg_scale, **teacher},
        "student": {"nfe": len(c.student.sigmas), **student},
        "spread_ratio": toy_metrics.spread_ratio(student, teacher),
        "skipped_updates": int(state.skipped),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    keys = ["diversity_layout", "diversity_pixel", "spread_cx", "spread_cy", "spread_size", "adherence", "valid",
            "frechet_layout"]
    print(f"\nToy metrics after {summary['rounds']} rounds (R={c.eval.seeds_per_prompt} seeds per prompt):")
    print(f"{'':10s}" + "".join(f"{k:>17s}" for k in ["nfe", *keys]))
    for name in ("teacher", "student"):
        row = summary[name]
        print(f"{name:10s}" + "".join(f"{row[k]:17.4f}" for k in ["nfe", *keys]))
    print(f"summary written to {os.path.join(workdir, 'summary.json')}")
    return summary
