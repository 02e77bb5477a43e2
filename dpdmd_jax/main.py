"""Entry point: `python -m dpdmd_jax.main --config=configs/toy.py --workdir=runs/toy`.

Resumes automatically from --workdir. Bad config values and missing inputs stop with one
paragraph naming the field and the fix, before any weight is read or step compiled.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/toy.py[:variant].", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, summary (resumed if present).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0's coordinator "
                    "(with --num_processes and --process_id; TPU pods, SLURM and MPI are detected without them).")
flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax/clu info lines would drown the progress bar

    from dpdmd_jax.config import ConfigError
    from dpdmd_jax.distill.trainer import TrainingError, train
    from dpdmd_jax.weights.safetensors_io import CheckpointError

    if FLAGS.coordinator_address is not None:  # explicit multi-process launch (e.g. several on one machine)
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif int(os.environ.get("JAX_PROCESS_COUNT", "1")) > 1 or "COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()  # multi-host: one process per host, each feeds its batch slice
    try:
        train(FLAGS.config, FLAGS.workdir)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f"\nError: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
