"""What every command-line module shares: exit codes a scheduler can read, flag parsing whose user
errors are one line (not a traceback), and the mapping of our error types to those codes.

Exit codes (documented in the README; `launch/` scripts and SLURM requeue logic key on them):

    0   finished
    1   crashed (a bug or an unexpected failure: the traceback is printed)
    2   bad input (a flag, a config field, a missing file): fix the command and run it again
    75  pre-empted (SIGTERM): the current state was saved; run the same command again to resume
        (75 is sysexits.h's EX_TEMPFAIL: "a temporary failure; the user is invited to retry")
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75

_HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


class UsageError(ValueError):
    """Bad command-line input; the message says what to fix."""


class Preempted(Exception):  # noqa: N818 (a state, not an error: the run saved and may be resumed)
    """Raised after a pre-empted run saved its state: the program exits with EXIT_PREEMPTED."""


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Prints `Error: message` on stderr and exits with `code`."""
    print(f"Error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config_overrides(argv: Sequence[str], name: str) -> list[str]:
    """The dotted fields of `--NAME.field=value` / `--NAME.field value` arguments."""
    prefix = f"--{name}."
    return [a[len(prefix):].split("=", 1)[0] for a in argv if a.startswith(prefix)]


def _unknown_field_message(argv: Sequence[str], error: Exception, config_flag: str) -> str | None:
    """One line for an override of a field the config does not have (ml_collections raises an
    AttributeError / KeyError whose text holds the bad key and, if any, its closest valid name)."""
    text = str(error)  # e.g. '\'lamda_div\'\nDid you mean "lambda_div" instead of "lamda_div"?' (escaped)
    first = re.search(r"[A-Za-z_]\w*", text)
    if first is None:
        return None
    key = first.group(0)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    for field in _config_overrides(argv, config_flag):
        parts = field.split(".")
        if key not in parts:
            continue
        fixed = None
        if suggestion:
            fixed = ".".join(parts[: parts.index(key)] + [suggestion.group(1)] + parts[parts.index(key) + 1:])
        hint = f"; did you mean --{config_flag}.{fixed}?" if fixed else ""
        return (f"--{config_flag}.{field}: the config has no field {key!r}{hint} (`python -m dpdmd_jax.main "
                f"--config=... --workdir=... --dry_run` prints every field of a config with its value)")
    return None


def parse_flags(argv: Sequence[str], config_flag: str = "config") -> list[str]:
    """absl's flag parsing, with user errors as one line and exit code 2 instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # absl's --help / --helpfull print the usage, then exit 1: asking for help is no failure
        if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(EXIT_OK)
        raise
    except flags.Error as e:
        fail(f"{e}\nPass --help to see the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a --config.* override the config refuses
        message = _unknown_field_message(argv, e, config_flag)
        fail(message or f"{type(e).__name__}: {e}")
    raise AssertionError("unreachable")


def run(main: Callable[[list[str]], None], user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """`app.run(main)` with one-line flag errors, `user_errors` turned into exit code 2 with one
    line each (no traceback), and `Preempted` into exit code 75."""
    errors = (UsageError, *user_errors)

    def wrapped(argv):
        try:
            main(argv)
        except Preempted as e:
            print(str(e), file=sys.stderr, flush=True)
            sys.exit(EXIT_PREEMPTED)
        except errors as e:
            fail(str(e))

    app.run(wrapped, flags_parser=parse_flags)
