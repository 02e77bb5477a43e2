"""Will a run fit, and what will a round cost? Plan it before renting the hardware.

    python -m dpdmd_jax.plan --config=configs/sd35.py --target=tpu:v5p:2x2x1 [--per_device_batch=4] [--search]

Builds the run shape-only on the target's devices (no weights read: an empty `model.source` plans
the family's default architecture; `--config.model.source=preset:NAME` or a pipeline folder pick
another), compiles its round ahead of time as training would, and prints per device the round's
arguments, outputs, temporaries and code, the text encoders held beside it, the peak against the
chip's memory, the FLOPs per round and a roofline time. `--search` walks from the config towards
more frugal settings (embedding cache, more remat, smaller per-device batch) and stops at the first
that fits. Targets: `tpu:<topology>` (libtpu on this host: `pip install -r requirements-plan.txt`),
`cpu:<N>` (virtual devices) or `local` (this host's devices, e.g. a GPU node). The plan is also
written to --out (plan.json). Exit codes: 0 fits (or no memory to compare with), 3 does not fit,
2 bad input (`dpdmd_jax.cli`).
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from dpdmd_jax import cli
from dpdmd_jax.config import ConfigError
from dpdmd_jax.run import plan as plan_lib

FLAGS = flags.FLAGS
EXIT_DOES_NOT_FIT = 3


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/sd35.py[:variant]; override any "
                                    "field with --config.FIELD=VALUE.", lock_config=True)
    flags.DEFINE_string("target", None, f"Where the run would go: {plan_lib.TARGET_FORMS}.")
    flags.DEFINE_integer("per_device_batch", None, "Set batch_size to this many samples per device (default: the "
                         "config's batch_size, split over the target's devices).")
    flags.DEFINE_bool("search", False, "Try more frugal settings until one fits; print the first that does.")
    flags.DEFINE_string("chip", None, "The chip whose memory and peak apply when the target's devices do not say "
                        "(cpu:N): v4, v5e, v5p, v6e, a100, a100-40gb, h100, h200.")
    flags.DEFINE_float("memory_gib", None, "Memory per device to plan against, GiB (default: the chip's).")
    flags.DEFINE_string("out", "plan.json", "Where to write the plan (JSON; an existing file is not overwritten).")
    flags.mark_flags_as_required(["config", "target"])


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        target = plan_lib.parse_target(FLAGS.target)
    except plan_lib.PlanError as e:
        raise cli.UsageError(str(e)) from e
    problems = plan_lib.target_problems(target) + plan_lib.out_problems(FLAGS.out)
    if problems:
        raise cli.UsageError(" ".join(problems))
    plan_lib.prepare_jax(target)
    try:
        devices = plan_lib.target_devices(target)
        c = FLAGS.config
        if FLAGS.per_device_batch:
            c = plan_lib.with_per_device_batch(c, devices, FLAGS.per_device_batch)
        memory = None if FLAGS.memory_gib is None else int(FLAGS.memory_gib * 2**30)
        kw = dict(chip=FLAGS.chip, memory_bytes=memory, log=lambda line: print(line, file=sys.stderr, flush=True))
        if FLAGS.search:
            result = plan_lib.search(c, target, **kw)
            best = result["best"]
            print(plan_lib.format_search(result))
        else:
            result = best = plan_lib.plan(c, target, **kw)
            print(plan_lib.format_plan(best))
        plan_lib.write_json(FLAGS.out, result)
    except (ConfigError, plan_lib.PlanError) as e:
        raise cli.UsageError(str(e)) from e
    print(f"Plan written to {FLAGS.out}")
    if best is None or best["fits"] is False:
        sys.exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
