r"""Batch sampling: prompts x seeds -> PNGs, one grid per prompt, and a JSONL row per image.

    # the student of a training run (latest checkpoint, or --step=N), with the config it recorded:
    python -m dpdmd_jax.sample --workdir=runs/toy --out=runs/toy/samples
    # the teacher (T steps, CFG) of the config's model.source:
    python -m dpdmd_jax.sample --config=configs/toy.py --sampler=teacher --out=runs/toy/teacher_samples
    # an exported student pipeline folder (no --workdir: the folder's weights are the student):
    python -m dpdmd_jax.sample --config=configs/sd35.py --config.model.source=EXPORT --out=DIR \
        --prompt_file=prompts.txt

With `--workdir` the config is the one the run recorded (`WORKDIR/config.json`; `dpdmd_jax.run_config`)
unless `--config` names a file; `--config.FIELD=VALUE` overrides apply on top of either. A config that
differs from the run's in a field that says what its checkpoints mean (anything but layout and loop
knobs such as `mesh`, `model.scan_layers`, `evals`) is refused, naming the field.

Prompts: `--prompt_file` (one per line), else the config's data source (its prompt file, or the
DiffusionDB TFDS prompts); the toy's prompts are its class names ("red square", ...), all six by
default. `--num_prompts` keeps the first N. Each prompt gets `--seeds` R images.

Determinism: the image of (prompt index p, seed s) is drawn from its own key,
fold_in(fold_in(key(--seed), p), s): its initial noise, and for the VP student the noise each step
re-noises with. So it does not depend on which other images share its batch, on the device count
or on the order images are made in. Work is data-parallel over every device (and process): a batch
is `--per_device_batch` images per device; the last batch is padded.

Several processes (hosts, or several on one machine) run the same command with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (TPU pods, SLURM and MPI need no
flags), as `dpdmd_jax.main` does; they make the same images as one process with as many devices.
Every process reads the checkpoint (--workdir); process 0 alone reads and writes `--out`, and tells
the others which images are left, so every process runs the same batches.

Output (`--out`): `images/p{p:05d}_s{s:03d}.png`, `grids/p{p:05d}.png` (the prompt's R images in
a row, once all are written), `samples.jsonl` (one row per image: prompt, prompt_index, seed, file,
sampler, steps, grid, cfg_scale, nfe, source, seconds) and `run.json` (what made them). A re-run
skips the images already written and never overwrites a file; a folder made by different settings
(source, checkpoint step, sampler, seeds' key) is refused. PNGs are written to a temporary name and
renamed, so a killed sampler leaves only whole images behind; a re-run checks the PNGs it would skip
and moves an unreadable one (a disk fault, a copy cut short) to `corrupt/`, then makes it again.

SIGTERM (a scheduler's pre-emption) stops every process after the same batch, once its images and
rows are written, and the command exits with code 75 (`dpdmd_jax.cli.EXIT_PREEMPTED`); the same
command resumes. Bad input exits with code 2 and one message.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from dpdmd_jax import cli, run_config

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program, so importing the module defines no flags)."""
    from dpdmd_jax.parallel import multihost

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/toy.py[:variant]. Default with "
                                    "--workdir: the config the run recorded (its config.json).", lock_config=True)
    flags.DEFINE_string("out", None, "Output folder (created; resumed if it holds this run's samples).")
    flags.DEFINE_string("workdir", None, "A training run: sample its student at --step (default: latest "
                        "checkpoint), with the config it recorded.")
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
    flags.DEFINE_enum("sampler", "student", ["student", "teacher"],
                      "student: the N-step student grid, no CFG; teacher: the config's T-step teacher with CFG.")
    flags.DEFINE_string("prompt_file", None, "Prompts, one per line (default: the config's data source).")
    flags.DEFINE_integer("num_prompts", None, "Only the first N prompts.")
    flags.DEFINE_integer("seeds", 9, "Images per prompt (R).")
    flags.DEFINE_integer("seed", 0, "Root of every image's key.")
    flags.DEFINE_integer("per_device_batch", 4, "Images per device per batch.")
    flags.DEFINE_string("vae_dtype", "float32", "VAE decode dtype (pipeline backbones).")
    multihost.define_flags()
    flags.mark_flags_as_required(["out"])


class SampleError(ValueError):
    """Bad sampling input; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One image: prompt index p, seed s."""

    p: int
    s: int

    @property
    def name(self) -> str:
        return f"p{self.p:05d}_s{self.s:03d}"


def image_key(root_seed: int, p: Any, s: Any):
    """The key an image's noise comes from (works on traced ints, under vmap)."""
    import jax

    return jax.random.fold_in(jax.random.fold_in(jax.random.key(root_seed), p), s)


# ---------------------------------------------------------------------------- output folder


def _json_lines(path: str):
    """(line, row) for each line of a JSONL file that parses; a torn line (killed while writing) is skipped."""
    with open(path) as f:
        for line in f:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


def read_rows(path: str) -> dict[str, dict]:
    """samples.jsonl -> {file name: row}; a torn last line (killed while writing) is ignored."""
    return {row["file"]: row for _, row in _json_lines(path)} if os.path.exists(path) else {}


def check_run(out: str, run: dict) -> None:
    """First call writes run.json; later ones must describe the same samples."""
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        if diff:
            changes = "; ".join(f"{k}: {saved.get(k)!r} -> {run.get(k)!r}" for k in diff)
            raise SampleError(f"{out} holds samples made with other settings ({changes}); use another --out.")
        return
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(run, f, indent=2)
    os.replace(path + ".tmp", path)


# Every whole PNG ends with its IEND chunk (length 0, "IEND", CRC); PIL's verify() stops before its CRC.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def readable_png(path: str) -> bool:
    """Whether `path` is a whole PNG: every chunk's CRC checks out (PIL's verify, no decoding) and
    the file ends with the IEND chunk (a file cut short anywhere fails one or the other)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.verify()
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return False


def set_aside(out: str, path: str) -> str:
    """Moves an unreadable file to `out`/corrupt/ (kept, never deleted: it may be worth a look, and a
    file we misjudged is not lost); returns its new path."""
    folder = os.path.join(out, "corrupt")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    dest, n = os.path.join(folder, name), 1
    while os.path.exists(dest):
        dest, n = os.path.join(folder, f"{name}.{n}"), n + 1
    os.replace(path, dest)
    print(f"{path} is not a readable PNG: moved to {dest}; it will be made again", flush=True)
    return dest


def _torn(path: str) -> bool:
    """Whether a JSONL file's last line is cut short (no newline: a kill while it was written)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def rewrite_rows(path: str, drop: set[str]) -> None:
    """samples.jsonl without the rows of the files in `drop` (made again: one row per image) and
    without a torn last line (the next row appended to it would be lost with it), replaced atomically."""
    keep = [line if line.endswith("\n") else line + "\n"
            for line, row in _json_lines(path) if row.get("file") not in drop]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_png(path: str, image_01) -> bool:
    """Writes [H, W, 3] in [0, 1] as an 8-bit PNG via a temporary file; False if `path` exists
    (never overwritten)."""
    import numpy as np
    from PIL import Image

    if os.path.exists(path):
        return False
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(np.round(np.clip(image_01, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return True


def to_unit(images) -> Any:
    """[-1, 1] -> [0, 1]."""
    import numpy as np

    return np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)


# ---------------------------------------------------------------------------- prompts


def toy_prompts(prompt_file: str | None) -> list[str]:
    from dpdmd_jax.toy import data as toy_data

    if not prompt_file:
        return list(toy_data.CLASS_NAMES)
    prompts = read_prompts(prompt_file)
    unknown = sorted({p for p in prompts if p not in toy_data.CLASS_NAMES})
    if unknown:
        raise SampleError(f"{prompt_file}: the toy's prompts are its class names {toy_data.CLASS_NAMES}; "
                          f"unknown: {unknown[:5]}")
    return prompts


def read_prompts(path: str) -> list[str]:
    from dpdmd_jax.data.prompts import PromptFileError, read_prompt_file

    try:
        prompts, bad = read_prompt_file(path)
    except PromptFileError as e:
        raise SampleError(f"--prompt_file: {e}; point it at a UTF-8 text file with one prompt per line.") from e
    if bad:
        print(f"{path}: skipped {bad} lines that are not valid UTF-8; {len(prompts)} prompts remain")
    return prompts


class Conditioner:
    """Prompts -> the backbone's conditioning (host arrays), and its unconditional branch."""

    def __init__(self, setup: Any, prompts: Sequence[str]):
        self.setup, self.prompts = setup, list(prompts)
        self.toy = setup.config.data.kind == "toy"
        if self.toy:
            from dpdmd_jax.toy import data as toy_data

            self.ids = [toy_data.class_id(p) for p in self.prompts]
        else:
            self.text = setup.data.text  # the TextSource's encoder (sharded on the mesh)

    def cond(self, indices: Sequence[int]) -> Any:
        if self.toy:
            return self.setup.data.embed([self.ids[i] for i in indices])
        return self.text.encode([self.prompts[i] for i in indices])

    def uncond(self, n: int) -> Any:
        import jax
        import numpy as np

        if self.toy:
            from dpdmd_jax.toy import data as toy_data

            return self.setup.data.embed(np.full(n, toy_data.NULL_CLASS))
        empty = jax.device_get(self.text.empty())  # [1, ...]: the embedding of ""
        return jax.tree.map(lambda e: np.broadcast_to(np.asarray(e), (n, *e.shape[1:])), empty)


def prompt_list(setup: Any, prompt_file: str | None) -> list[str]:
    from dpdmd_jax import data as data_lib

    c = setup.config
    if c.data.kind == "toy":
        return toy_prompts(prompt_file)
    if prompt_file:
        return read_prompts(prompt_file)
    if c.data.kind in ("prompts", "diffusiondb"):
        return list(data_lib.prompt_sequence(c))
    raise SampleError(f"data.kind={c.data.kind!r} has no prompts to sample; pass --prompt_file=FILE.")


# ---------------------------------------------------------------------------- sampling


def plan(out: str, run: dict, jobs: Sequence[Job]) -> tuple[list[Job], int]:
    """(the jobs still to make, the rows samples.jsonl will then hold), the same on every process.

    Only process 0 writes `out`, so only it reads it: it checks (or, first, writes) run.json and
    finds the jobs whose row and PNG are both there; the others get its answer, so every process
    runs the same batches (their collectives must match) whatever file system they see. An error
    on process 0 stops every process."""
    import jax
    import numpy as np

    done, n_rows, error = np.zeros(len(jobs), np.int32), 0, None
    if jax.process_index() == 0:
        try:
            check_run(out, run)
            for sub in ("images", "grids"):
                os.makedirs(os.path.join(out, sub), exist_ok=True)
            rows_path = os.path.join(out, "samples.jsonl")
            rows = read_rows(rows_path)
            # A PNG we would skip (or keep) must be whole: one cut short by a disk fault or a partial
            # copy is set aside and made again, with its row.
            bad = {j.name + ".png" for j in jobs if os.path.exists(_png(out, j)) and not readable_png(_png(out, j))}
            for name in sorted(bad):
                set_aside(out, os.path.join(out, "images", name))
                rows.pop(name, None)
            if os.path.exists(rows_path) and (bad or _torn(rows_path)):
                rewrite_rows(rows_path, bad)
            done[:] = [j.name + ".png" in rows and os.path.exists(_png(out, j)) for j in jobs]
            n_rows = len(rows.keys() | {j.name + ".png" for j in jobs})
        except Exception as e:  # re-raised below, once the other processes know to stop too
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        from dpdmd_jax.parallel.multihost import barrier

        barrier("sample_plan")  # process 0 may read a slow file system: gloo's 30 s set-up would not wait
        shared = multihost_utils.broadcast_one_to_all(np.array([error is not None, n_rows, *done], np.int32))
        failed, n_rows, done = bool(shared[0]), int(shared[1]), shared[2:]
        if failed and error is None:
            raise SampleError(f"process 0 could not sample into {out}; its output says why")
    if error is not None:
        raise error
    return [j for j, d in zip(jobs, done) if not d], n_rows


def sampler_info(setup: Any, sampler: str) -> dict:
    c, d = setup.config, setup.distiller
    grid = d.student_grid if sampler == "student" else d.teacher_grid
    cfg = 1.0 if sampler == "student" else float(c.teacher.cfg_scale)
    steps = len(grid) - 1
    return dict(sampler=sampler, steps=steps, grid=[float(x) for x in grid], cfg_scale=cfg,
                nfe=steps * (1 if cfg == 1.0 else 2))


def make_sample_fn(setup: Any, sampler: str, root_seed: int, vae: Any = None) -> functools.partial:
    """(params, (p, s) int arrays [B], cond, uncond) -> images [B, H, W, 3] in [-1, 1], jitted.

    Every array the program reads is an argument, none is closed over: the model's frozen buffers
    (e.g. the MMDiT's position table) and the VAE live on the whole mesh, and on several processes
    JAX cannot embed an array that spans other hosts' devices as a constant. The frozen arrays are
    bound as the leading arguments of the jitted function (`.func`, a `SyncedJit`; `.args`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dpdmd_jax.parallel import mesh as mesh_lib
    from dpdmd_jax.parallel.multihost import SyncedJit

    d, backbone = setup.distiller, setup.backbone
    buffers = setup.frozen.buffers
    vae_graph, vae_state = nnx.split(vae) if vae is not None else (None, None)

    def run(buffers, vae_state, params, p, s, cond, uncond):
        keys = jax.vmap(lambda p, s: image_key(root_seed, p, s))(p, s)
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), d.latent_shape))(keys)
        if sampler == "student":
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
            z = d.sample(params, buffers, eps, cond, step_keys)
        else:
            z = d.teacher_sample(params, buffers, eps, cond, uncond)
        if vae_graph is None:
            return jnp.clip(z, -1.0, 1.0)  # the toy: latents are images
        return jnp.clip(backbone.decode(nnx.merge(vae_graph, vae_state), z.astype(jnp.float32)), -1.0, 1.0)

    fn = SyncedJit(run, f"sample_{sampler}", out_shardings=mesh_lib.replicated(setup.mesh))
    return functools.partial(fn, buffers, vae_state)


def load_student(setup: Any, workdir: str | None, step: int | None) -> tuple[Any, str]:
    """(student params, source description): a run's checkpoint, or model.source's weights."""
    from dpdmd_jax.distill import trainer

    if not workdir:
        if step is not None:
            raise SampleError("--step needs --workdir (the run whose checkpoint to sample)")
        return setup.frozen.teacher, f"model.source={setup.config.model.source}"
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise SampleError(f"--workdir={workdir} holds no checkpoints/ folder: is it a training run's workdir?")
    mngr = trainer.checkpoint_manager(workdir, setup.config)
    steps = sorted(mngr.all_steps())
    if not steps:
        raise SampleError(f"{workdir} has no checkpoint yet; train first (python -m dpdmd_jax.main).")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise SampleError(f"--step={step}: {workdir} has checkpoints at steps {steps}, not {step}.")
    like, shardings = trainer.init_train_state(setup)
    state = trainer.restore(mngr, chosen, like, shardings)
    mngr.close()
    return state.student, f"{workdir}/checkpoints/{chosen}"


def sample(c: Any, out: str, *, workdir: str | None = None, step: int | None = None, sampler: str = "student",
           prompt_file: str | None = None, num_prompts: int | None = None, seeds: int = 9, seed: int = 0,
           per_device_batch: int = 4, vae_dtype: str = "float32", devices: Sequence[Any] | None = None) -> dict:
    """Samples prompts x `seeds` images into `out` (resumably) on `devices` (default: all); returns a
    summary dict (`preempted`: a SIGTERM stopped it early, and a re-run finishes)."""
    from dpdmd_jax.distill import trainer

    if seeds < 1 or per_device_batch < 1:
        raise SampleError(f"--seeds={seeds} and --per_device_batch={per_device_batch} must be >= 1")
    if sampler == "teacher" and workdir:
        raise SampleError("--sampler=teacher samples the config's model.source; drop --workdir")
    out = os.path.abspath(os.path.expanduser(out))
    from dpdmd_jax.preflight import workdir_problems

    problems = workdir_problems(out, flag="--out")  # before any model is loaded
    if problems:
        raise SampleError(" ".join(problems))
    if workdir:  # the run's config must be this one (before any prompt-source change below)
        run_config.check_workdir_config(os.path.abspath(os.path.expanduser(workdir)), c, write=False)
    c = c.copy_and_resolve_references()
    if prompt_file and c.data.kind != "toy":  # encode these prompts with the pipeline's text encoders
        c.data.kind, c.data.prompt_file = "prompts", prompt_file
    setup = trainer.build(c, devices)
    prompts = prompt_list(setup, prompt_file)[:num_prompts]
    if not prompts:
        raise SampleError("no prompts to sample")
    params, source = load_student(setup, workdir, step) if sampler == "student" else (
        setup.frozen.teacher, f"model.source={c.model.source}")
    return sample_with(setup, params, source, out, prompts, sampler=sampler, seeds=seeds, seed=seed,
                       per_device_batch=per_device_batch, vae_dtype=vae_dtype, stop_on_sigterm=True)


def sample_with(setup: Any, params: Any, source: str, out: str, prompts: Sequence[str], *, sampler: str = "student",
                seeds: int = 9, seed: int = 0, per_device_batch: int = 4, vae_dtype: str = "float32",
                progress: bool = True, stop_on_sigterm: bool = False) -> dict:
    """`sample` for a built trainer `Setup` and params in hand (the toy_metrics evaluator samples
    its student this way, mid-run): `prompts` x `seeds` images into `out`, resumably.
    `stop_on_sigterm`: a SIGTERM stops it after the current batch (`multihost.Preemption`), with
    `preempted` set in the summary; leave it off inside a program that handles SIGTERM itself."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from dpdmd_jax.parallel import mesh as mesh_lib
    from dpdmd_jax.parallel import multihost

    c = setup.config
    out = os.path.abspath(os.path.expanduser(out))
    info = sampler_info(setup, sampler)
    run = dict(source=source, seed=seed, backbone=c.backbone, data_kind=c.data.kind, **info)
    is_main = jax.process_index() == 0
    rows_path = os.path.join(out, "samples.jsonl")
    jobs = [Job(p, s) for p in range(len(prompts)) for s in range(seeds)]
    todo, expected_rows = plan(out, run, jobs)
    if progress and is_main:
        print(f"{len(prompts)} prompts x {seeds} seeds = {len(jobs)} images; {len(jobs) - len(todo)} already in {out}")

    conditioner = Conditioner(setup, prompts)
    vae = None
    if c.data.kind != "toy":
        vae = setup.backbone.load_vae(setup.mesh, mesh_lib.mesh_rules(c), vae_dtype)
    fn = make_sample_fn(setup, sampler, seed, vae)
    batch = per_device_batch * mesh_lib.batch_divisor(setup.mesh)
    bar = tqdm(total=len(todo), desc=f"sampling ({sampler})", disable=not (is_main and progress),
               dynamic_ncols=True)
    stop, made, stopped_after = multihost.Preemption(enabled=stop_on_sigterm), 0, None
    try:
        with open(rows_path, "a") if is_main else open(os.devnull, "w") as log:
            for i, start in enumerate(range(0, len(todo), batch)):
                chunk = todo[start:start + batch]
                padded = chunk + [chunk[0]] * (batch - len(chunk))  # fixed shapes: one compile
                t0 = time.time()
                idx = np.array([j.p for j in padded], np.int32)
                cond = conditioner.cond(idx)
                uncond = conditioner.uncond(batch)
                put = lambda x: mesh_lib.global_batch(setup.mesh, np.asarray(x))
                images = fn(params, put(idx), put(np.array([j.s for j in padded], np.int32)),
                            jax.tree.map(put, cond), jax.tree.map(put, uncond))
                images = to_unit(images.addressable_data(0))[: len(chunk)]
                seconds = (time.time() - t0) / len(chunk)
                if is_main:
                    for j, image in zip(chunk, images):
                        if not write_png(_png(out, j), image):
                            print(f"kept the existing {_png(out, j)} (not overwritten)")
                        row = dict(prompt=prompts[j.p], prompt_index=j.p, seed=j.s, file=j.name + ".png",
                                   **info, source=source, seconds=round(seconds, 4))
                        log.write(json.dumps(row) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
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
                    preempted=True, **run)
    if is_main:
        write_grids(out, len(prompts), seeds)
    # Process 0 counts what it wrote; the others may not see its last rows yet (or at all).
    n_rows = len(read_rows(rows_path)) if is_main else expected_rows
    return dict(out=out, images=len(jobs), made=made, rows=n_rows, preempted=False, **run)


def _png(out: str, j: Job) -> str:
    return os.path.join(out, "images", j.name + ".png")


def write_grids(out: str, num_prompts: int, seeds: int) -> None:
    """grids/p{p}.png: the prompt's R images in a row, for every prompt whose images are all there
    (an existing grid is kept if it is a whole PNG, else set aside and made again)."""
    import numpy as np
    from PIL import Image

    for p in range(num_prompts):
        path = os.path.join(out, "grids", f"p{p:05d}.png")
        files = [_png(out, Job(p, s)) for s in range(seeds)]
        if os.path.exists(path) and not readable_png(path):
            set_aside(out, path)
        if os.path.exists(path) or not all(os.path.exists(f) for f in files):
            continue
        row = np.concatenate([np.asarray(Image.open(f).convert("RGB")) for f in files], axis=1)
        write_png(path, row.astype(np.float32) / 255.0)


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from dpdmd_jax.config import ConfigError
    from dpdmd_jax.distill.trainer import TrainingError
    from dpdmd_jax.parallel import multihost
    from dpdmd_jax.weights.safetensors_io import CheckpointError

    if FLAGS.config is None:  # with --workdir, `run_config` made the run's record the default
        if FLAGS.workdir:
            run_config.read_record(FLAGS.workdir)  # says why there is none
        raise cli.UsageError("--config is required without --workdir: the config file of the model to sample, "
                             "e.g. --config=configs/toy.py --sampler=teacher")
    multihost.initialize_from_flags(FLAGS)
    try:
        summary = sample(FLAGS.config, FLAGS.out, workdir=FLAGS.workdir, step=FLAGS.step, sampler=FLAGS.sampler,
                         prompt_file=FLAGS.prompt_file, num_prompts=FLAGS.num_prompts, seeds=FLAGS.seeds,
                         seed=FLAGS.seed, per_device_batch=FLAGS.per_device_batch, vae_dtype=FLAGS.vae_dtype)
    except (SampleError, ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        raise cli.UsageError(str(e)) from e
    if summary["preempted"]:
        raise cli.Preempted(f"Pre-empted (SIGTERM): {summary['rows']} of {summary['images']} images are in "
                            f"{summary['out']}; run the same command again to make the rest.")
    if jax.process_index() == 0:
        print(f"{summary['rows']} images in {summary['out']} ({summary['made']} made now)")


if __name__ == "__main__":
    run_config.use_recorded_config()
    define_flags()
    cli.run(main, user_errors=(SampleError, run_config.RecordError))
