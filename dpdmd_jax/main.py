"""Entry point: `python -m dpdmd_jax.main --config=configs/toy.py --workdir=runs/toy`.

Resumes automatically from --workdir. Every problem of the run (config values, model and data
folders, the workdir) is listed at once, one line each, before anything is loaded or written;
`--dry_run` does only that, and prints every config field with its value and origin. Without
`--config`, a workdir holding a run resumes with the config that run recorded. Exit codes:
0 finished, 2 bad input, 75 pre-empted (saved; run the same command again), 1 crash
(`dpdmd_jax.cli`).
"""

from __future__ import annotations

import jax
from absl import flags, logging
from ml_collections import config_flags

from dpdmd_jax import cli, run_config
from dpdmd_jax.config import ConfigError
from dpdmd_jax.core import TrainingError
from dpdmd_jax.parallel import multihost
from dpdmd_jax.run import preflight
from dpdmd_jax.run.baseline import train_with_baseline
from dpdmd_jax.run.train import end_of_run_message
from dpdmd_jax.run.workdir import absolute
from dpdmd_jax.weights.safetensors_io import CheckpointError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/toy.py[:variant]; override any field with --config.FIELD=VALUE "
    "(--dry_run lists them all). Default: the config --workdir's run recorded (resume it as it was).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, summary (resumed if present).")
flags.DEFINE_bool("dry_run", False, "Check everything the run needs (config, model and data folders, workdir), print "
                  "every config field with its value and origin and what would be loaded, and exit without compiling.")
multihost.define_flags()
flags.adopt_module_key_flags(multihost)  # --help lists the multi-process flags with ours
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's info lines (and each log step's) would drown the progress bar
    workdir = absolute(FLAGS.workdir)
    if FLAGS.dry_run:
        sources = preflight.field_sources(config_flags.get_config_filename(FLAGS["config"]),
                                          config_flags.get_override_values(FLAGS["config"]))
        print(f"Config (field, value, origin):\n{preflight.config_table(FLAGS.config, sources)}\n")
        print(f"Would load and write:\n{preflight.plan(FLAGS.config, workdir)}\n")
        multi = FLAGS.coordinator_address is not None  # the other processes' devices are not known yet
        problems = preflight.run_problems(FLAGS.config, workdir, check_mesh=not multi)
        if problems:
            raise cli.UsageError("the run cannot start:\n  - " + "\n  - ".join(problems))
        print("Dry run: every check passed; nothing was compiled or written.")
        return
    multihost.initialize_from_flags(FLAGS)
    try:
        summary = train_with_baseline(FLAGS.config, workdir)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        raise cli.UsageError(str(e)) from e
    if "preempted_at" in summary:
        raise cli.Preempted(f"Pre-empted: round {summary['preempted_at']} is saved in {workdir}/checkpoints; run the "
                            f"same command again to resume (exit code {cli.EXIT_PREEMPTED}).")
    if jax.process_index() == 0:
        print(end_of_run_message(FLAGS.config, workdir, summary))


if __name__ == "__main__":
    run_config.use_recorded_config()  # no --config: resume WORKDIR with the config it recorded
    cli.run(main)
