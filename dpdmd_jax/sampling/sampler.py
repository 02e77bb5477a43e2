"""Sampling a built run: prompts x seeds -> images in a sample folder (`sampling.folder`), resumably,
data-parallel over every device and process.

The image of (prompt index p, seed s) is drawn from its own key, fold_in(fold_in(key(seed), p), s):
its initial noise, and for the VP student the noise each step re-noises with. So it does not
depend on which other images share its batch, on the device count or on the order images are made
in. `sample_with` is what the sample command, the toy's metrics evaluator and the tests call.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from tqdm import tqdm

from dpdmd_jax.core import Backbone, DataSource, Frozen, NoPrompts
from dpdmd_jax.data import pairs as pairs_lib
from dpdmd_jax.diffusion.sampler import image_key, image_noise
from dpdmd_jax.distill.step import Distiller
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel import multihost
from dpdmd_jax.parallel.multihost import SyncedJit
from dpdmd_jax.run_config import absolute
from dpdmd_jax.sampling.folder import (Job, SampleError, append_rows, exists, plan, png_path, read_prompts,
                                       read_rows, to_unit, write_array, write_grids, write_png)


class SamplingRun(Protocol):
    """What sampling reads of a run (`run.setup.Run` has it all)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: Any
    backbone: Backbone
    distiller: Distiller
    frozen: Frozen
    data: DataSource


def prompt_list(data: DataSource, prompt_file: str | None, column: str = "") -> list[str]:
    """--prompt_file's prompts (its `column` for a structured file, "" = auto; checked against what the
    source can encode), else the source's own."""
    if prompt_file:
        prompts = read_prompts(prompt_file, column)
        problems = data.prompt_problems(prompts)
        if problems:
            raise SampleError(f"{prompt_file}: " + "; ".join(problems))
        return prompts
    try:
        return list(data.prompts())
    except NoPrompts as e:
        raise SampleError(f"{e}: pass --prompt_file=FILE.") from e


def sampler_info(run: SamplingRun, sampler: str) -> dict:
    c, d = run.config, run.distiller
    grid = d.student_grid if sampler == "student" else d.teacher_grid
    cfg = 1.0 if sampler == "student" else float(c.teacher.cfg_scale)
    steps = len(grid) - 1
    return dict(sampler=sampler, steps=steps, grid=[float(x) for x in grid], cfg_scale=cfg,
                nfe=steps * (1 if cfg == 1.0 else 2))


def make_sample_fn(run: SamplingRun, sampler: str, root_seed: int, vae: Any = None,
                   latents: bool = False) -> functools.partial:
    """(params, (p, s) int arrays [B], cond, uncond) -> images [B, H, W, 3] in [-1, 1], jitted; with
    `latents`, (images, the sampled latents [B, *latent_shape] before decoding).

    Every array the program reads is an argument, none is closed over: the model's frozen buffers
    (e.g. the MMDiT's position table) and the VAE live on the whole mesh, and on several processes
    JAX cannot embed an array that spans other hosts' devices as a constant. The frozen arrays are
    bound as the leading arguments of the jitted function (`.func`, a `SyncedJit`; `.args`)."""
    d, backbone = run.distiller, run.backbone
    buffers = run.frozen.buffers
    vae_graph, vae_state = nnx.split(vae) if vae is not None else (None, None)

    def sample_images(buffers, vae_state, params, p, s, cond, uncond):
        keys = jax.vmap(lambda p, s: image_key(root_seed, p, s))(p, s)
        eps = image_noise(root_seed, p, s, d.latent_shape)
        if sampler == "student":
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
            z = d.sample(params, buffers, eps, cond, step_keys)
        else:
            z = d.teacher_sample(params, buffers, eps, cond, uncond)
        if vae_graph is None:
            images = jnp.clip(z, -1.0, 1.0)  # the toy: latents are images
        else:
            images = jnp.clip(backbone.decode(nnx.merge(vae_graph, vae_state), z.astype(jnp.float32)), -1.0, 1.0)
        return (images, z) if latents else images

    fn = SyncedJit(mesh_lib.rows_split(run.mesh, sample_images), f"sample_{sampler}",
                   out_shardings=mesh_lib.replicated(run.mesh))
    return functools.partial(fn, buffers, vae_state)


def check_pairs(sampler: str, pairs: bool) -> None:
    """A pair cache holds the teacher's samples: --pairs needs --sampler=teacher."""
    if pairs and sampler != "teacher":
        raise SampleError("--pairs keeps the teacher's samples for DMD v1's regression; use it with --sampler=teacher")


def write_pairs(out: str, chunk: Sequence[Job], z: np.ndarray, cond: Any) -> None:
    """A pair cache's files for the images of `chunk` (their latents `z` and the conditionings `cond`
    of the batch they were sampled in, row for row; `data.pairs` names the files), in float32 (a
    .npy file cannot name bfloat16)."""
    for b, j in enumerate(chunk):
        write_array(pairs_lib.cond_path(out, j.p), np.savez,
                    {f.name: np.asarray(getattr(cond, f.name)[b], np.float32) for f in dataclasses.fields(cond)})
        write_array(pairs_lib.latent_path(out, j.name), np.save, np.asarray(z[b], np.float32))


def sample_with(run: SamplingRun, params: Any, source: str, out: str, prompts: Sequence[str], *,
                sampler: str = "student", seeds: int = 9, seed: int = 0, per_device_batch: int = 4,
                vae_dtype: str = "float32", progress: bool = True, stop_on_sigterm: bool = False,
                pairs: bool = False) -> dict:
    """`prompts` x `seeds` images of `params` (student or teacher, per `sampler`) into `out`, resumably,
    for a built run (the sample command, and the toy_metrics evaluator mid-run).
    `pairs` (teacher only): also keep each image's latents and each prompt's conditioning, which make
    `out` a pair cache for DMD v1's regression (`data.pairs`, `regression.pairs`).
    `stop_on_sigterm`: a SIGTERM stops it after the current batch (`multihost.Preemption`), with
    `preempted` set in the summary; leave it off inside a program that handles SIGTERM itself."""
    check_pairs(sampler, pairs)
    c = run.config
    out = absolute(out)  # a gs:// URI as it is; its files go through etils.epath (sampling.folder)
    info = sampler_info(run, sampler)
    made_by = dict(source=source, seed=seed, backbone=c.backbone, data_kind=c.data.kind, **info,
                   **({"pairs": True} if pairs else {}))
    is_main = jax.process_index() == 0
    rows_path = str(epath.Path(out) / "samples.jsonl")
    jobs = [Job(p, s) for p in range(len(prompts)) for s in range(seeds)]
    has_latents = (lambda j: exists(pairs_lib.latent_path(out, j.name))) if pairs else None
    todo, expected_rows = plan(out, made_by, jobs, also=has_latents)
    if progress and is_main:
        print(f"{len(prompts)} prompts x {seeds} seeds = {len(jobs)} images; {len(jobs) - len(todo)} already in {out}")

    vae = run.backbone.load_vae(run.mesh, run.rules, vae_dtype) if run.backbone.has_vae() else None
    fn = make_sample_fn(run, sampler, seed, vae, latents=pairs)
    batch = per_device_batch * mesh_lib.batch_divisor(run.mesh)
    bar = tqdm(total=len(todo), desc=f"sampling ({sampler})", disable=not (is_main and progress),
               dynamic_ncols=True)
    stop, made, stopped_after = multihost.Preemption(enabled=stop_on_sigterm), 0, None
    try:
        for i, start in enumerate(range(0, len(todo), batch)):
            chunk = todo[start:start + batch]
            padded = chunk + [chunk[0]] * (batch - len(chunk))  # fixed shapes: one compile
            t0 = time.time()
            idx = np.array([j.p for j in padded], np.int32)
            cond = jax.tree.map(np.asarray, run.data.encode_prompts([prompts[i] for i in idx]))  # host arrays
            uncond = run.data.uncond(batch)
            put = lambda x: mesh_lib.global_batch(run.mesh, np.asarray(x))
            images = fn(params, put(idx), put(np.array([j.s for j in padded], np.int32)),
                        jax.tree.map(put, cond), jax.tree.map(put, uncond))
            if pairs:
                images, z = images
                if is_main:  # before the PNGs: an image on disk has its pair
                    write_pairs(out, chunk, np.asarray(z.addressable_data(0)), cond)
            images = to_unit(images.addressable_data(0))[: len(chunk)]
            seconds = (time.time() - t0) / len(chunk)
            if is_main:
                rows = []
                for j, image in zip(chunk, images):
                    if not write_png(png_path(out, j), image):
                        print(f"kept the existing {png_path(out, j)} (not overwritten)")
                    rows.append(json.dumps(dict(prompt=prompts[j.p], prompt_index=j.p, seed=j.s, file=j.name + ".png",
                                                **info, source=source, seconds=round(seconds, 4))) + "\n")
                append_rows(rows_path, rows)  # on disk (or in the bucket) before the batch counts as made
            bar.update(len(chunk))
            made += len(chunk)
            if stop.reached(i):  # checked once the batch's PNGs and rows are whole on disk
                stopped_after = i
                break
    finally:
        bar.close()
        stop.restore()
    if stopped_after is not None:  # pre-empted: stop now (the re-run writes the grids)
        if progress:
            print(f"\nSIGTERM: stopped after batch {stopped_after + 1} of {-(-len(todo) // batch)} "
                  f"({made} images made now)", flush=True)
        return dict(out=out, images=len(jobs), made=made, rows=expected_rows - (len(todo) - made),
                    preempted=True, **made_by)
    if is_main:
        write_grids(out, len(prompts), seeds)
    # Process 0 counts what it wrote; the others may not see its last rows yet (or at all).
    n_rows = len(read_rows(rows_path)) if is_main else expected_rows
    return dict(out=out, images=len(jobs), made=made, rows=n_rows, preempted=False, **made_by)
