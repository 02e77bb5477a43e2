#!/usr/bin/env bash
# DP-DMD on a Cloud TPU VM (one host or a pod slice): create it, install this checkout on every
# worker, run the same `python -m dpdmd_jax.main ...` on all of them, follow, stop, delete.
#
# usage: launch/tpu/tpu.sh COMMAND --name=NAME --zone=ZONE --project=PROJECT [options] [-- MAIN_FLAGS]
#
# commands:
#   create   create the TPU VM (--queued: a queued resource, waiting until it is ACTIVE); skipped if
#            it exists, deleted and created again if it was pre-empted
#   install  copy this checkout (tracked and untracked, not ignored files) to every worker and
#            install it with jax[tpu] (launch/tpu/worker.sh install)
#   run      run `python -m dpdmd_jax.main MAIN_FLAGS` on every worker (--worker=all) and follow
#            their output; exits with the run's exit code (0 finished, 75 pre-empted after saving:
#            run the same command again, 2 bad input, 1 crash). The run survives a dropped
#            connection or Ctrl-C here: `logs` follows it again, `stop` stops it
#   start    the same, without following
#   logs     follow the run's log (--worker=0 by default, --worker=all for every worker)
#   stop     SIGTERM the run on every worker: it saves its round and exits 75
#   delete   delete the TPU VM (or the queued resource and its VM)
#   up       create + install + run; after a pre-emption the same `up` command again creates the
#            TPU again if it is gone, installs, and the run resumes from its --workdir
#
# options (flags win over the environment variables in brackets; --opt=value or --opt value):
#   --name             TPU VM / queued resource name [TPU_NAME]
#   --zone             e.g. us-east5-a [ZONE]
#   --project          Google Cloud project [PROJECT]
#   --accelerator-type e.g. v5p-8, v5litepod-16, v6e-8, v4-8 (create, up) [ACCELERATOR_TYPE]
#   --version          TPU runtime version [RUNTIME_VERSION]; default from the accelerator type:
#                      v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#                      v6e v2-alpha-tpuv6e
#   --queued           use a queued resource (gcloud compute tpus queued-resources) instead of
#                      creating the VM directly
#   --spot             Spot capacity (cheaper; pre-empted at any time: the run saves, exits 75)
#   --delete-on-exit   (run, up) delete the TPU when this script ends, whatever the outcome; on
#                      Ctrl-C the run is first stopped (it saves its round)
#   --setup            (install, up) a shell command every worker runs (in its home) after the
#                      install, e.g. fetching the model: 'gcloud storage rsync -r gs://B/sd35m sd35m'
#   --worker           (logs) worker number or all (default 0)
#   --dry-run          print every command instead of running it [DRY_RUN=1]
#
# The workdir must be one every worker reaches: --workdir=gs://BUCKET/... on a pod slice.
# Example:
#   launch/tpu/tpu.sh up --name=dpdmd --zone=us-east5-a --project=my-project \
#       --accelerator-type=v5p-8 -- --config=configs/sd35.py --workdir=gs://my-bucket/runs/sd35
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "$0")/../common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

COMMAND=${1:-}
case $COMMAND in
  create | install | run | start | logs | stop | delete | up) shift ;;
  -h | --help) usage && exit 0 ;;
  *) usage >&2 && die "unknown command '$COMMAND': one of create install run start logs stop delete up" ;;
esac

NAME=${TPU_NAME:-} ZONE=${ZONE:-} PROJECT=${PROJECT:-}
TYPE=${ACCELERATOR_TYPE:-} VERSION=${RUNTIME_VERSION:-}
QUEUED=0 SPOT=0 DELETE_ON_EXIT=0 WORKER=0 SETUP=""
MAIN_FLAGS=()
while (($#)); do
  case $1 in
    --) shift && MAIN_FLAGS=("$@") && break ;;
    -h | --help) usage && exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --delete-on-exit) DELETE_ON_EXIT=1 ;;
    --name* | --zone* | --project* | --accelerator-type* | --version* | --worker* | --setup*)
      if [[ $1 == *=* ]]; then key=${1%%=*} value=${1#*=}; else
        (($# > 1)) || die "$1 needs a value"
        key=$1 value=$2 && shift
      fi
      case $key in
        --name) NAME=$value ;;
        --zone) ZONE=$value ;;
        --project) PROJECT=$value ;;
        --accelerator-type) TYPE=$value ;;
        --version) VERSION=$value ;;
        --worker) WORKER=$value ;;
        --setup) SETUP=$value ;;
        *) die "unknown option $1 (see --help)" ;;
      esac
      ;;
    *) die "unknown option $1 (dpdmd_jax.main's flags go after --; see --help)" ;;
  esac
  shift
done

need "$NAME" --name
need "$ZONE" --zone
need "$PROJECT" --project
LOC=(--zone="$ZONE" --project="$PROJECT")
VM=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
REMOTE_WORKER=dpdmd-jax/launch/tpu/worker.sh # paths on a worker are relative to its home

if [[ $COMMAND == create || $COMMAND == up ]]; then
  need "$TYPE" --accelerator-type
  if [[ -z $VERSION ]]; then
    case $TYPE in
      v4-*) VERSION=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
      *) die "no default runtime version for --accelerator-type=$TYPE: give --version" ;;
    esac
  fi
fi
if [[ $COMMAND == run || $COMMAND == start || $COMMAND == up ]]; then
  ((${#MAIN_FLAGS[@]})) || die "give dpdmd_jax.main's flags after --, e.g. -- --config=configs/sd35.py --workdir=gs://BUCKET/runs/sd35"
  for flag in "${MAIN_FLAGS[@]}"; do
    if [[ $flag == --workdir=* && $flag != --workdir=gs://* ]]; then
      echo "warning: $flag is not on gs://: on a pod slice every worker needs the same workdir, and a VM's disk goes with the VM" >&2
    fi
  done
fi

# The TPU's state (READY, PREEMPTED, ... / a queued resource's ACTIVE, SUSPENDED, ...); fails if it does not exist.
state() {
  if ((QUEUED)); then
    "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)' 2> /dev/null
  else
    "${VM[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2> /dev/null
  fi
}

wait_active() {
  local now
  while ! dry; do
    now=$(state) || now=GONE
    case $now in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | GONE) echo "error: queued resource $NAME is $now: delete it (launch/tpu/tpu.sh delete --queued ...) and create it again" >&2 && exit 1 ;;
    esac
    echo "queued resource $NAME is $now; waiting for ACTIVE" >&2
    sleep "${TPU_POLL_SECONDS:-30}"
  done
}

create() {
  local now="" spot=()
  ((SPOT)) && spot=(--spot)
  dry || now=$(state) || now=""
  case $now in
    "") ;;
    PREEMPTED | TERMINATED | SUSPENDED)
      echo "$NAME is $now: deleting it to create it again" >&2
      delete
      ;;
    *)
      echo "$NAME exists ($now): not creating it" >&2
      if ((QUEUED)); then wait_active; fi
      return 0
      ;;
  esac
  if ((QUEUED)); then
    run "${QR[@]}" create "$NAME" --node-id="$NAME" "${LOC[@]}" --accelerator-type="$TYPE" \
      --runtime-version="$VERSION" "${spot[@]}"
    wait_active
  else
    run "${VM[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION" "${spot[@]}"
  fi
}

install() {
  local tarball=${TMPDIR:-/tmp}/dpdmd-jax-$NAME.tar.gz
  if dry; then
    echo "cd $(shquote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(shquote "$tarball")"
  else
    git -C "$REPO_ROOT" rev-parse --git-dir > /dev/null 2>&1 || die "$REPO_ROOT is not a git checkout: install copies its git-tracked and untracked (not ignored) files"
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done |
      tar --null -T - -czf "$tarball")
  fi
  run "${VM[@]}" scp "$tarball" "$NAME:dpdmd-jax.tar.gz" "${LOC[@]}" --worker=all
  run "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="rm -rf dpdmd-jax.new && mkdir dpdmd-jax.new && tar -xzf dpdmd-jax.tar.gz -C dpdmd-jax.new && bash dpdmd-jax.new/launch/tpu/worker.sh install"
  if [[ -n $SETUP ]]; then
    run "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$SETUP"
  fi
}

on_workers() { # on_workers WORKER WORKER_SH_ARGS...
  local worker=$1
  shift
  run "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker="$worker" --command="bash $REMOTE_WORKER $(shquote "$@")"
}

delete() {
  if ((QUEUED)); then
    run "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run "${VM[@]}" delete "$NAME" "${LOC[@]}" --quiet
  fi
}

INTERRUPTED=0
delete_on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if ((INTERRUPTED)); then
    echo "interrupted: stopping the run (it saves its round) before deleting $NAME" >&2
    on_workers all stop || true
  fi
  delete || echo "error: could not delete $NAME: delete it yourself (launch/tpu/tpu.sh delete ...): it costs money while it exists" >&2
  exit "$rc"
}

explain() {
  case $1 in
    0) echo "finished" >&2 ;;
    75) echo "pre-empted after saving its round (exit code 75): run the same command again to resume" >&2 ;;
    *) echo "the run failed (exit code $1); the workers' logs: launch/tpu/tpu.sh logs --worker=all ..." >&2 ;;
  esac
  return "$1"
}

run_and_follow() {
  if ((DELETE_ON_EXIT)); then
    trap delete_on_exit EXIT
    trap 'INTERRUPTED=1 && exit 130' INT TERM
  else
    trap 'echo "detached: the run goes on; follow it with launch/tpu/tpu.sh logs, stop it with launch/tpu/tpu.sh stop" >&2 && exit 130' INT
  fi
  if [[ $COMMAND == up ]]; then
    create
    install
  fi
  local rc=0
  on_workers all run "${MAIN_FLAGS[@]}" || rc=$?
  dry || explain "$rc"
}

case $COMMAND in
  create) create ;;
  install) install ;;
  run | up) run_and_follow ;;
  start) on_workers all start "${MAIN_FLAGS[@]}" ;;
  logs) on_workers "$WORKER" logs ;;
  stop) on_workers all stop ;;
  delete) delete ;;
esac
