r"""Batch sampling: prompts x seeds -> PNGs, one grid per prompt, and a JSONL row per image.

    # the student of a training run (latest checkpoint, or --step=N), with the config it recorded:
    python -m dpdmd_jax.sample --workdir=runs/toy --out=runs/toy/samples
    # the teacher (T steps, CFG) of the config's model.source:
    python -m dpdmd_jax.sample --config=configs/toy.py --sampler=teacher --out=runs/toy/teacher_samples
    # the same, kept as DMD v1's pair cache (latents, conditionings) for --config.regression.pairs:
    python -m dpdmd_jax.sample --config=configs/toy.py --sampler=teacher --pairs --out=runs/toy/pairs --seeds=64
    # an exported student pipeline folder (no --workdir: the folder's weights are the student):
    python -m dpdmd_jax.sample --config=configs/sd35.py --config.model.source=EXPORT --out=DIR \
        --prompt_file=prompts.txt
    # a LoRA student's diffusers LoRA folder over the teacher (the run's config gives rank and targets):
    python -m dpdmd_jax.sample --workdir=runs/sd35_lora --lora=exports/sd35_lora --out=DIR

With `--workdir` the config is the one the run recorded (`WORKDIR/config.json`; `dpdmd_jax.run_config`)
unless `--config` names a file; `--config.FIELD=VALUE` overrides apply on top of either. A config that
differs from the run's in a field that says what its checkpoints mean (anything but layout and loop
knobs such as `mesh`, `model.scan_layers`, `evals`) is refused, naming the field.

Prompts: `--prompt_file` (.txt: one per line; .jsonl / .json / .csv / .tsv / .parquet: the field
`--prompt_column`, default the first of prompt / caption / text it has; `dpdmd_jax.data.prompts`),
else the config's data source (its prompt file, or the DiffusionDB TFDS prompts); the toy's prompts
are its class names ("red square", ...), all six by default. `--num_prompts` keeps the first N. Each
prompt gets `--seeds` R images.

Each image's noise comes from its own key (prompt index, seed): the same image whatever the batch,
device count or order (`dpdmd_jax.sampling.sampler`). Several processes run the same command with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (TPU pods, SLURM and MPI need no
flags) and make the same images as one process; process 0 alone reads and writes `--out`.

Output (`--out`, `dpdmd_jax.sampling.folder`): `images/p{p:05d}_s{s:03d}.png`, `grids/p{p:05d}.png`,
`samples.jsonl` (one row per image) and `run.json` (what made them). A re-run skips the images already
written and never overwrites a file; a folder made by different settings is refused; an unreadable
PNG is moved to `corrupt/` and made again.

SIGTERM (a scheduler's pre-emption) stops every process after the same batch, once its images and
rows are written, and the command exits with code 75 (`dpdmd_jax.cli.EXIT_PREEMPTED`); the same
command resumes. Bad input exits with code 2 and one message.
"""

from __future__ import annotations

import jax
from absl import flags, logging
from ml_collections import config_flags

from dpdmd_jax import cli, run_config
from dpdmd_jax.config import ConfigError
from dpdmd_jax.core import TrainingError
from dpdmd_jax.parallel import multihost
from dpdmd_jax.run.sample import sample
from dpdmd_jax.sampling.folder import SampleError
from dpdmd_jax.weights.safetensors_io import CheckpointError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program, so importing the module defines no flags)."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/toy.py[:variant]. Default with "
                                    "--workdir: the config the run recorded (its config.json).", lock_config=True)
    flags.DEFINE_string("out", None, "Output folder (created; resumed if it holds this run's samples).")
    flags.DEFINE_string("workdir", None, "A training run: sample its student at --step (default: latest "
                        "checkpoint), with the config it recorded.")
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
    flags.DEFINE_string("lora", None, "A diffusers LoRA folder of the student (`dpdmd_jax.export` of a LoRA run): "
                        "sample the teacher plus it, adapters shaped by the config's student.lora (rank, targets).")
    flags.DEFINE_enum("sampler", "student", ["student", "teacher"],
                      "student: the N-step student grid, no CFG; teacher: the config's T-step teacher with CFG.")
    flags.DEFINE_string("prompt_file", None, "Prompts: .txt (one per line), .jsonl, .json, .csv, .tsv or .parquet "
                        "(default: the config's data source).")
    flags.DEFINE_string("prompt_column", "", "The prompt field / column of a structured --prompt_file (default: "
                        "the config's data.prompt_column, else the first of prompt, caption, text it has).")
    flags.DEFINE_integer("num_prompts", None, "Only the first N prompts.")
    flags.DEFINE_integer("seeds", 9, "Images per prompt (R).")
    flags.DEFINE_integer("seed", 0, "Root of every image's key.")
    flags.DEFINE_integer("per_device_batch", 4, "Images per device per batch.")
    flags.DEFINE_string("vae_dtype", "float32", "VAE decode dtype (pipeline backbones).")
    flags.DEFINE_bool("pairs", False, "With --sampler=teacher: also keep each image's latents and each prompt's "
                      "conditioning, making --out a pair cache for DMD v1's regression (--config.regression.pairs).")
    multihost.define_flags()
    flags.mark_flags_as_required(["out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.config is None:  # with --workdir, `run_config` made the run's record the default
        if FLAGS.workdir:
            run_config.read_record(FLAGS.workdir)  # says why there is none
        raise cli.UsageError("--config is required without --workdir: the config file of the model to sample, "
                             "e.g. --config=configs/toy.py --sampler=teacher")
    multihost.initialize_from_flags(FLAGS)
    try:
        summary = sample(FLAGS.config, FLAGS.out, workdir=FLAGS.workdir, step=FLAGS.step, sampler=FLAGS.sampler,
                         prompt_file=FLAGS.prompt_file, prompt_column=FLAGS.prompt_column,
                         num_prompts=FLAGS.num_prompts, seeds=FLAGS.seeds, seed=FLAGS.seed,
                         per_device_batch=FLAGS.per_device_batch, vae_dtype=FLAGS.vae_dtype, lora=FLAGS.lora,
                         pairs=FLAGS.pairs)
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
