# shellcheck shell=bash disable=SC2034  # variables for the scripts that source this file
# Helpers shared by the launch scripts (sourced, not run). Conventions:
#   DRY_RUN=1 (or --dry-run): `run` prints each command, shell-quoted, instead of running it;
#   otherwise it echoes the command to stderr ("+ ...") and runs it.
#   Bad input: `die` prints one line "error: ..." and exits 2, like the project's commands.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=${DRY_RUN:-0}

die() {
  echo "error: $*" >&2
  exit 2
}

dry() { [[ "$DRY_RUN" == 1 ]]; }

# Shell-quotes the arguments into one line a shell turns back into the same words; a value is
# quoted after its --flag= so that the line stays readable.
shquote() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      out+=("${BASH_REMATCH[1]}$(quote1 "${BASH_REMATCH[2]}")")
    else
      out+=("$(quote1 "$a")")
    fi
  done
  printf '%s\n' "${out[*]}"
}

quote1() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s\n' "$1"
  elif [[ "$1" != *"'"* ]]; then
    echo "'$1'"
  elif [[ "$1" != *[\\\"\$\`!]* ]]; then
    echo "\"$1\""
  else
    echo "'${1//\'/\'\\\'\'}'"
  fi
}

run() {
  if dry; then
    shquote "$@"
  else
    echo "+ $(shquote "$@")" >&2
    "$@"
  fi
}

# need VALUE FLAG: dies naming FLAG when VALUE is empty.
need() {
  [[ -n "$1" ]] || die "$2 is required (see --help)"
}
