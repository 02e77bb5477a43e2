#!/usr/bin/env bash
# DP-DMD on GPU nodes without a scheduler: start this script on every node, with the same flags
# and its own NODE_RANK. One process per node drives all of the node's GPUs.
#
#   node 0: NNODES=2 NODE_RANK=0 JAX_COORDINATOR_ADDRESS=10.0.0.1:12345 launch/gpu/run.sh \
#               --config=configs/sd35.py --workdir=/shared/runs/sd35
#   node 1: NNODES=2 NODE_RANK=1 JAX_COORDINATOR_ADDRESS=10.0.0.1:12345 launch/gpu/run.sh \
#               --config=configs/sd35.py --workdir=/shared/runs/sd35
#
# It runs `python -m dpdmd_jax.main --coordinator_address=... --num_processes=NNODES
# --process_id=NODE_RANK FLAGS` (exec: signals reach the run, its exit code is this script's)
# with the XLA / NCCL environment of launch/gpu/env.sh.
#
#   NNODES                   the number of nodes (1: a single node, no coordinator needed)
#   NODE_RANK                this node's index, 0 .. NNODES-1; node 0 hosts the coordinator
#   JAX_COORDINATOR_ADDRESS  node 0's address that every node reaches: host:port, or host with
#                            JAX_COORDINATOR_PORT (default 12345)
#   PYTHON                   the interpreter (default: python on PATH)
#   DRY_RUN=1                print the command instead of running it
#
# --workdir must be on a filesystem every node sees (NFS, Lustre, gs://). Exit codes: 0 finished,
# 75 pre-empted after saving (start the same command on every node again to resume), 2 bad input,
# 1 crash.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "$0")/../common.sh"
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "$0")/env.sh"

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi

problems=()
if [[ -z ${NNODES:-} ]]; then
  problems+=("NNODES is not set: the number of nodes of the run, e.g. NNODES=2")
elif ! [[ $NNODES =~ ^[1-9][0-9]*$ ]]; then
  problems+=("NNODES=$NNODES must be a positive integer")
fi
if [[ ${NNODES:-} != 1 ]]; then
  if [[ -z ${NODE_RANK:-} ]]; then
    problems+=("NODE_RANK is not set: this node's index, 0 .. NNODES-1 (0 on the coordinator's node)")
  elif ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || { [[ ${NNODES:-} =~ ^[1-9][0-9]*$ ]] && ((NODE_RANK >= NNODES)); }; then
    problems+=("NODE_RANK=$NODE_RANK must lie in 0 .. NNODES-1")
  fi
  if [[ -z ${JAX_COORDINATOR_ADDRESS:-} ]]; then
    problems+=("JAX_COORDINATOR_ADDRESS is not set: node 0's address as host:port (or host, with JAX_COORDINATOR_PORT)")
  fi
fi
if ((${#problems[@]})); then
  printf 'error: %s\n' "${problems[@]}" >&2
  exit 2
fi

cmd=("${PYTHON:-python}" -m dpdmd_jax.main)
if ((NNODES > 1)); then
  address=$JAX_COORDINATOR_ADDRESS
  [[ $address =~ :[0-9]+$ ]] || address=$address:${JAX_COORDINATOR_PORT:-12345}
  cmd+=(--coordinator_address="$address" --num_processes="$NNODES" --process_id="$NODE_RANK")
fi
cmd+=("$@")

if dry; then
  shquote "${cmd[@]}"
  exit 0
fi
echo "node ${NODE_RANK:-0} of $NNODES: $(shquote "${cmd[@]}")" >&2
exec "${cmd[@]}"
