r"""Trains a toy teacher with CFG dropout and exports its EMA weights: the MMDiT by flow matching,
or (`configs/toy_teacher.py:unet`) the UNet by epsilon prediction on SDXL's VP schedule.

    python -m dpdmd_jax.toy.train_teacher --config=configs/toy_teacher.py --workdir=runs/toy_teacher
    python -m dpdmd_jax.toy.train_teacher --config=configs/toy_teacher.py:unet --workdir=runs/toy_teacher_unet

The export (`--config.export_dir`, default WORKDIR/teacher) is a diffusers
SD3Transformer2DModel / UNet2DConditionModel folder that `load_toy_teacher(path, family)` reads;
copy it to `dpdmd_jax/toy/assets/teacher/` (`teacher_unet/`) to ship it. An existing export is never overwritten unless
`--config.overwrite=True`, and exports are written to a temporary folder and renamed into
place, so an interrupted run cannot leave a half-written teacher behind.

The step is pure: `graphdef, params, rest = nnx.split(model, nnx.Param, ...)` once; the
jitted step takes and returns plain pytrees (params, optimizer state, EMA params). The loss is the
schedule's own: noise at a level, regress `schedule.critic_target` (flow: v = eps - x; VP: eps),
the same target the fake score is trained on during distillation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from dpdmd_jax.diffusion import flow
from dpdmd_jax.toy import data, teacher

EVAL_KEYS = ("diversity_layout", "diversity_pixel", "spread_cx", "spread_cy", "spread_size",
             "adherence", "shape_acc", "valid", "frechet_layout", "saturation")


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up and cosine decay, global-norm clipping; no decay on vectors.
    Returns (optimizer, learning-rate schedule)."""
    o = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
        decay_steps=max(config.num_steps, o.warmup_steps + 1), end_value=o.lr * o.end_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    ), schedule


LEVEL_SAMPLING = {"mmdit": ("logit_normal", "uniform"), "unet": ("timesteps",)}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any compile on a family / noise-level sampling that do not go together."""
    if config.family not in LEVEL_SAMPLING:
        raise ValueError(f"family={config.family!r}; choose one of {tuple(LEVEL_SAMPLING)}")
    if config.sigma_sampling not in LEVEL_SAMPLING[config.family]:
        raise ValueError(f"sigma_sampling={config.sigma_sampling!r} does not fit family={config.family!r}; "
                         f"use one of {LEVEL_SAMPLING[config.family]}")


def sample_levels(key: jax.Array, n: int, config: ml_collections.ConfigDict) -> jax.Array:
    """Training noise levels: flow sigmas, SD3's logit-normal (sigmoid of N(mean, std)) or uniform;
    VP: integer DDPM timesteps uniform in [0, 1000), as SD / SDXL are trained."""
    if config.sigma_sampling == "logit_normal":
        return jax.nn.sigmoid(config.logit_mean + config.logit_std * jax.random.normal(key, (n,)))
    if config.sigma_sampling == "uniform":
        return jax.random.uniform(key, (n,))
    if config.sigma_sampling == "timesteps":
        return jax.random.randint(key, (n,), 0, teacher.VP.num_train_timesteps).astype(jnp.float32)
    raise ValueError(f"sigma_sampling={config.sigma_sampling!r}; use 'logit_normal', 'uniform' or 'timesteps'")


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
    """(params, opt_state, ema, rest, batch, key, step) -> (params, opt_state, ema, metrics), jitted."""

    schedule = teacher.schedule_of(config.family)

    def loss_fn(params, rest, batch, key):
        model = nnx.merge(graphdef, params, rest)
        k_noise, k_level = jax.random.split(key)
        x = batch["images"]
        noise = jax.random.normal(k_noise, x.shape, x.dtype)
        level = sample_levels(k_level, x.shape[0], config)
        prediction = teacher.apply(model, schedule.add_noise(x, noise, level), level, batch["cond"])
        return jnp.mean(jnp.square(prediction - schedule.critic_target(x, noise)))

    def step(params, opt_state, ema, rest, batch, key, step):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # EMA with the usual warm-up so early averages are not dominated by the random init.
        decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, opt_state, ema, dict(loss=loss, grad_norm=optax.tree.norm(grads))

    return jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=dict(config.compiler_options) or None)


def host_batch(rng: np.random.Generator, config: ml_collections.ConfigDict, model_cfg) -> dict:
    """A data batch with CFG dropout: a `cfg_dropout` fraction of labels become NULL_CLASS."""
    b = data.sample_batch(rng, config.batch_size)
    ids = np.where(rng.uniform(size=config.batch_size) < config.cfg_dropout, data.NULL_CLASS, b["class_ids"])
    return dict(images=b["images"], cond=teacher.model_cond(model_cfg, ids))


def resolve_export_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return os.path.abspath(config.export_dir or os.path.join(workdir, "teacher"))


def check_export_dir(export_dir: str, overwrite: bool) -> None:
    """Fails before any training if an export is already there and overwriting was not asked."""
    if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
        raise FileExistsError(
            f"{export_dir} already holds an export; pass --config.overwrite=True to replace it "
            "or choose another --config.export_dir"
        )
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise FileExistsError(f"{export_dir} exists and is not a folder")


def export_atomically(model: teacher.ToyModel, export_dir: str) -> None:
    """The diffusers export into a temporary sibling folder, then renamed into place: readers (and
    an interrupted run) only ever see a complete old export or a complete new one."""
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(export_dir) + ".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        teacher.save_toy_model(model, tmp, overwrite=True)
        if os.path.exists(export_dir):
            old = tempfile.mkdtemp(prefix=os.path.basename(export_dir) + ".old-", dir=parent)
            os.rename(export_dir, os.path.join(old, "export"))
            os.rename(tmp, export_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, export_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def evaluate(model: teacher.ToyModel, config: ml_collections.ConfigDict) -> dict[float, dict[str, float]]:
    e = config.eval
    if config.family == "unet":
        sigmas = teacher.teacher_grid("unet", e.num_steps)  # leading DDIM timesteps
    else:
        sigmas = flow.flow_match_sigmas(e.num_steps, e.shift)
    return teacher.evaluate_sampler(model, tuple(e.cfg_scales), sigmas=sigmas, seeds=e.seeds,
                                    repeats=e.repeats, seed=e.seed)


def _format_eval(results: dict[float, dict[str, float]]) -> str:
    return " | ".join(
        f"cfg {w:g}: " + " ".join(f"{k}={m[k]:.3f}" for k in EVAL_KEYS) for w, m in results.items()
    )


def train_and_export(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains, evaluates and exports; returns a summary (also written to WORKDIR/summary.json)."""
    check_config(config)
    workdir = os.path.abspath(workdir)
    export_dir = resolve_export_dir(config, workdir)
    check_export_dir(export_dir, config.overwrite)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    model_cfg = teacher.model_config(config.family, **config.model)
    if config.init_from:
        # Warm start (continue training an exported teacher); the optimizer starts afresh.
        model = teacher.load_toy_teacher(config.init_from, family=config.family)
        if model.cfg.to_diffusers() != model_cfg.to_diffusers():
            raise ValueError(f"init_from={config.init_from!r} holds a different architecture than config.model: "
                             f"{model.cfg.to_diffusers()} vs {model_cfg.to_diffusers()}")
        logging.info("initialised from %s", config.init_from)
    else:
        model = teacher.build_model(model_cfg, config.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    logging.info("toy %s teacher: %d parameters (%.2f MB fp32), arch %s", config.family, n_params, 4e-6 * n_params,
                 model_cfg.to_diffusers())

    tx, schedule = make_optimizer(config)
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    train_step = make_train_step(graphdef, tx, config)
    rng = np.random.default_rng(config.seed)
    base_key = jax.random.key(config.seed)
    log_path = os.path.join(workdir, "metrics.jsonl")
    log_file = open(log_path, "a")

    def record(kind: str, step: int, values: dict) -> None:
        log_file.write(json.dumps(dict(kind=kind, step=step, **values)) + "\n")
        log_file.flush()

    def eval_and_export(step: int) -> dict[float, dict[str, float]]:
        ema_model = nnx.merge(graphdef, ema, rest)
        t0 = time.time()
        results = evaluate(ema_model, config)
        logging.info("eval (EMA) step %d [%.0fs]: %s", step, time.time() - t0, _format_eval(results))
        record("eval", step, {f"cfg{w:g}": m for w, m in results.items()})
        export_atomically(ema_model, export_dir)
        logging.info("exported EMA weights at step %d to %s", step, export_dir)
        return results

    start = time.time()
    window, window_start, last_loss = [], time.time(), float("nan")
    results = {}
    pbar = tqdm(range(config.num_steps), desc="toy teacher", dynamic_ncols=True, mininterval=5.0)
    for step in pbar:
        batch = host_batch(rng, config, model_cfg)
        params, opt_state, ema, m = train_step(
            params, opt_state, ema, rest, batch, jax.random.fold_in(base_key, step), jnp.float32(step)
        )
        window.append(m["loss"])
        done = step + 1
        if done % config.log_every == 0 or done == config.num_steps:
            losses = np.asarray(jax.device_get(window))
            last_loss = float(losses.mean())
            rate = len(window) / (time.time() - window_start)
            logging.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.2f steps/s", done, config.num_steps,
                         last_loss, float(m["grad_norm"]), float(schedule(step)), rate)
            record("train", done, dict(loss=last_loss, grad_norm=float(m["grad_norm"]), steps_per_s=rate,
                                       elapsed_s=time.time() - start))
            pbar.set_postfix(loss=f"{last_loss:.4f}")
            window, window_start = [], time.time()
        if done == config.num_steps or (config.eval_every and done % config.eval_every == 0):
            results = eval_and_export(done)
    pbar.close()
    log_file.close()

    summary = dict(
        steps=config.num_steps, wall_s=time.time() - start, final_loss=last_loss, n_params=n_params,
        export_dir=export_dir, eval={f"{w:g}": m for w, m in results.items()},
    )
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("done: %d steps in %.0f s, final loss %.4f, teacher in %s",
                 config.num_steps, summary["wall_s"], last_loss, export_dir)
    return summary


_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (configs/toy_teacher.py[:smoke]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for logs and (by default) the export.")


def main(argv):
    del argv
    train_and_export(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
