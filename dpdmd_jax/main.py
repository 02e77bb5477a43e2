"""Entry point: `python -m dpdmd_jax.main --config=configs/toy.py --workdir=runs/toy`.

Resumes automatically from --workdir. Bad config values and missing inputs stop with one
paragraph naming the field and the fix, before any weight is read or step compiled.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from dpdmd_jax.parallel import multihost

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/toy.py[:variant].", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, summary (resumed if present).")
multihost.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax/clu info lines would drown the progress bar

    from dpdmd_jax.config import ConfigError
    from dpdmd_jax.distill.trainer import TrainingError, train_with_baseline
    from dpdmd_jax.weights.safetensors_io import CheckpointError

    multihost.initialize_from_flags(FLAGS)
    try:
        train_with_baseline(FLAGS.config, FLAGS.workdir)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f"\nError: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
