#!/usr/bin/env bash
# Runs on every worker of a TPU VM; launch/tpu/tpu.sh calls it through
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="bash dpdmd-jax/launch/tpu/worker.sh ..."`.
#
#   worker.sh install           move this unpacked copy of the project to ~/dpdmd-jax and install it,
#                               with jax[tpu], into ~/dpdmd-venv (Python 3.11 through uv)
#   worker.sh run MAIN_FLAGS    start `python -m dpdmd_jax.main MAIN_FLAGS` in ~/dpdmd-jax, detached from
#                               this ssh session, follow its log and exit with its exit code; if a run
#                               is already going (gcloud re-sent the command), follow that one
#   worker.sh start MAIN_FLAGS  the same, without following
#   worker.sh logs              follow the run's log until it ends; exit with its exit code
#   worker.sh stop              SIGTERM the run (it saves its round and exits 75); wait; exit with its code
#
# The run survives a dropped ssh connection (nohup); its pid, log and exit code are in ~/dpdmd-run/.
# Environment: PYTHON (the run's interpreter, default ~/dpdmd-venv/bin/python), JAX_EXTRA (the jax
# extra `install` adds, default tpu), DPDMD_PYTHON_VERSION (default 3.11).
set -euo pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
CODE=$HOME/dpdmd-jax
VENV=$HOME/dpdmd-venv
STATE=$HOME/dpdmd-run
PYTHON=${PYTHON:-$VENV/bin/python}
HOST=$(hostname)

say() { echo "[$HOST] $*" >&2; }

# The pid of the run going on this worker, if any (a stale pid file names no dpdmd_jax.main process).
live_pid() {
  local pid
  pid=$(cat "$STATE/pid" 2> /dev/null) || return 1
  [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q 'dpdmd_jax\.main' && echo "$pid"
}

explain() {
  case $1 in
    0) say "finished (exit code 0)" ;;
    75) say "pre-empted after saving its round (exit code 75): run the same command again to resume" ;;
    2) say "bad input (exit code 2): fix the command" ;;
    *) say "failed (exit code $1)" ;;
  esac
}

install() {
  local src pid
  src=$(cd "$(dirname "$SELF")/../.." && pwd)
  if pid=$(live_pid); then
    say "a run is going (pid $pid): stop it first (launch/tpu/tpu.sh stop)"
    exit 2
  fi
  if [[ "$src" != "$CODE" ]]; then
    rm -rf "$CODE"
    mv "$src" "$CODE"
  fi
  # TPU VM images ship Python 3.10 and pip; uv brings the project's Python (>= 3.11) and installs fast.
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user --upgrade uv
  [[ -x "$VENV/bin/python" ]] || python3 -m uv venv --python "${DPDMD_PYTHON_VERSION:-3.11}" "$VENV"
  python3 -m uv pip install --python "$VENV/bin/python" --upgrade "jax[${JAX_EXTRA:-tpu}]"
  python3 -m uv pip install --python "$VENV/bin/python" -e "$CODE"
  "$VENV/bin/python" -c 'import jax, dpdmd_jax; print("installed dpdmd_jax with jax", jax.__version__)'
}

# Detached (nohup): runs the command, records its pid and, when it ends, its exit code.
supervise() {
  "$PYTHON" -m dpdmd_jax.main "$@" &
  echo $! > "$STATE/pid"
  local rc=0
  wait $! || rc=$?
  echo "$rc" > "$STATE/rc"
}

start() {
  local pid
  if pid=$(live_pid); then
    say "a run is already going (pid $pid): following it (stop it with launch/tpu/tpu.sh stop)"
    return 0
  fi
  if [[ ! -d "$CODE" ]] || ! command -v "$PYTHON" > /dev/null; then
    say "the project is not installed here ($CODE, $PYTHON): run launch/tpu/tpu.sh install first"
    exit 2
  fi
  mkdir -p "$STATE"
  rm -f "$STATE/pid" "$STATE/rc"
  [[ -f "$STATE/log" ]] && mv "$STATE/log" "$STATE/log.previous"
  cd "$CODE"
  nohup bash "$SELF" supervise "$@" > "$STATE/log" 2>&1 < /dev/null &
  for _ in $(seq 100); do
    [[ -s "$STATE/pid" ]] && break
    sleep 0.1
  done
  say "started python -m dpdmd_jax.main (pid $(cat "$STATE/pid")) in $CODE; log: $STATE/log"
}

# Waits for the run's exit code (written just after it ends) and exits with it.
finish() {
  for _ in $(seq 300); do
    [[ -s "$STATE/rc" ]] && break
    sleep 0.1
  done
  [[ -s "$STATE/rc" ]] || { say "the run ended without an exit code (see $STATE/log)"; exit 1; }
  local rc
  rc=$(cat "$STATE/rc")
  explain "$rc"
  exit "$rc"
}

logs() {
  [[ -f "$STATE/log" ]] || { say "no run on this worker yet"; exit 2; }
  local pid
  pid=$(live_pid) || pid=0
  if ((pid)); then
    tail -n +1 -F -s 0.5 --pid="$pid" "$STATE/log" 2> /dev/null | sed -u "s/^/[$HOST] /"
  else
    sed "s/^/[$HOST] /" "$STATE/log"
  fi
  finish
}

stop() {
  local pid
  if ! pid=$(live_pid); then
    say "no run is going"
    return 0
  fi
  say "SIGTERM to pid $pid: it saves its round and exits"
  kill -TERM "$pid"
  while kill -0 "$pid" 2> /dev/null; do sleep 1; done
  finish
}

cmd=${1:-}
shift || true
case $cmd in
  install) install ;;
  run) start "$@" && logs ;;
  start) start "$@" ;;
  logs) logs ;;
  stop) stop ;;
  supervise) supervise "$@" ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
