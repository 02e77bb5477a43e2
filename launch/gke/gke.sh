#!/usr/bin/env bash
# DP-DMD on GKE TPU node pools through xpk (https://github.com/AI-Hypercomputer/xpk): build the
# image, create the workload (the same `python -m dpdmd_jax.main ...` on every host of every
# slice), follow its logs, list and delete workloads.
#
# usage: launch/gke/gke.sh COMMAND [options] [-- MAIN_FLAGS]
#
# commands:
#   build   docker build this checkout with launch/gke/Dockerfile (jax[tpu] and the project) as
#           --docker-image and push it
#   create  xpk workload create ... --command "python -m dpdmd_jax.main MAIN_FLAGS"
#   list    xpk workload list --cluster=CLUSTER
#   logs    follow the workload's pods (kubectl logs -f; fetches the cluster's credentials first)
#   delete  xpk workload delete --cluster=CLUSTER --workload=WORKLOAD
#
# options (flags win over the environment variables in brackets; --opt=value or --opt value):
#   --cluster            the xpk / GKE cluster [CLUSTER]
#   --workload           the workload's name (lower case, digits, -) [WORKLOAD]
#   --project, --zone    passed to xpk (it falls back to gcloud's config) [PROJECT, ZONE]
#   --tpu-type           e.g. v5p-8, v5litepod-16, v6e-8 (create) [TPU_TYPE]
#   --num-slices         slices (multislice over DCN; default 1)
#   --docker-image       (build, create) an image with the project installed, e.g.
#                        us-docker.pkg.dev/PROJECT/REPO/dpdmd-jax:TAG [DOCKER_IMAGE]
#   --base-docker-image  (create) instead: a local image with the dependencies; xpk copies this
#                        checkout into it (--script-dir) and pushes the result
#   --max-restarts       times the JobSet restarts the workload after a disruption such as a
#                        pre-empted node (default 10): the run saves its round, exits 75 and
#                        resumes from --workdir
#   --xpk-flag           one more flag for `xpk workload create`, repeatable, e.g.
#                        --xpk-flag=--spot --xpk-flag=--restart-on-user-code-failure
#   --dry-run            print every command instead of running it [DRY_RUN=1]
#
# The workdir must be one every host reaches: --workdir=gs://BUCKET/...
# Example:
#   launch/gke/gke.sh create --cluster=tpu-cluster --workload=sd35 --tpu-type=v5p-8 \
#       --docker-image=us-docker.pkg.dev/my-project/dpdmd/dpdmd-jax:v1 \
#       -- --config=configs/sd35.py --workdir=gs://my-bucket/runs/sd35
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "$0")/../common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

COMMAND=${1:-}
case $COMMAND in
  build | create | list | logs | delete) shift ;;
  -h | --help) usage && exit 0 ;;
  *) usage >&2 && die "unknown command '$COMMAND': one of build create list logs delete" ;;
esac

CLUSTER=${CLUSTER:-} WORKLOAD=${WORKLOAD:-} PROJECT=${PROJECT:-} ZONE=${ZONE:-}
TPU_TYPE=${TPU_TYPE:-} DOCKER_IMAGE=${DOCKER_IMAGE:-} BASE_IMAGE=""
NUM_SLICES=1 MAX_RESTARTS=10
XPK_FLAGS=() MAIN_FLAGS=()
while (($#)); do
  case $1 in
    --) shift && MAIN_FLAGS=("$@") && break ;;
    -h | --help) usage && exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --*)
      if [[ $1 == *=* ]]; then key=${1%%=*} value=${1#*=}; else
        (($# > 1)) || die "$1 needs a value"
        key=$1 value=$2 && shift
      fi
      case $key in
        --cluster) CLUSTER=$value ;;
        --workload) WORKLOAD=$value ;;
        --project) PROJECT=$value ;;
        --zone) ZONE=$value ;;
        --tpu-type) TPU_TYPE=$value ;;
        --num-slices) NUM_SLICES=$value ;;
        --docker-image) DOCKER_IMAGE=$value ;;
        --base-docker-image) BASE_IMAGE=$value ;;
        --max-restarts) MAX_RESTARTS=$value ;;
        --xpk-flag) XPK_FLAGS+=("$value") ;;
        *) die "unknown option $key (dpdmd_jax.main's flags go after --; see --help)" ;;
      esac
      ;;
    *) die "unknown argument $1 (dpdmd_jax.main's flags go after --; see --help)" ;;
  esac
  shift
done

LOC=()
[[ -n $PROJECT ]] && LOC+=(--project="$PROJECT")
[[ -n $ZONE ]] && LOC+=(--zone="$ZONE")

build() {
  need "$DOCKER_IMAGE" --docker-image
  run docker build --platform=linux/amd64 -f "$REPO_ROOT/launch/gke/Dockerfile" -t "$DOCKER_IMAGE" "$REPO_ROOT"
  run docker push "$DOCKER_IMAGE"
}

create() {
  need "$CLUSTER" --cluster
  need "$WORKLOAD" --workload
  need "$TPU_TYPE" --tpu-type
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices=$NUM_SLICES must be a positive integer"
  ((${#MAIN_FLAGS[@]})) || die "give dpdmd_jax.main's flags after --, e.g. -- --config=configs/sd35.py --workdir=gs://BUCKET/runs/sd35"
  local image=()
  if [[ -n $DOCKER_IMAGE && -n $BASE_IMAGE ]]; then
    die "give --docker-image or --base-docker-image, not both"
  elif [[ -n $DOCKER_IMAGE ]]; then
    image=(--docker-image="$DOCKER_IMAGE")
  elif [[ -n $BASE_IMAGE ]]; then
    image=(--base-docker-image="$BASE_IMAGE" --script-dir="$REPO_ROOT")
  else
    die "--docker-image is required (launch/gke/gke.sh build makes one), or --base-docker-image"
  fi
  for flag in "${MAIN_FLAGS[@]}"; do
    if [[ $flag == --workdir=* && $flag != --workdir=gs://* ]]; then
      echo "warning: $flag is not on gs://: every host (and every restart) needs the same workdir" >&2
    fi
  done
  run xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" \
    --num-slices="$NUM_SLICES" "${image[@]}" --max-restarts="$MAX_RESTARTS" "${LOC[@]}" "${XPK_FLAGS[@]}" \
    --command="python -m dpdmd_jax.main $(shquote "${MAIN_FLAGS[@]}")"
}

list() {
  need "$CLUSTER" --cluster
  run xpk workload list --cluster="$CLUSTER" "${LOC[@]}"
}

logs() {
  need "$CLUSTER" --cluster
  need "$WORKLOAD" --workload
  need "$ZONE" --zone
  need "$PROJECT" --project
  # xpk's clusters are regional: the region is the zone without its last part.
  run gcloud container clusters get-credentials "$CLUSTER" --region="${ZONE%-*}" --project="$PROJECT"
  run kubectl logs --follow --prefix --max-log-requests=1000 --selector=jobset.sigs.k8s.io/jobset-name="$WORKLOAD"
}

delete() {
  need "$CLUSTER" --cluster
  need "$WORKLOAD" --workload
  run xpk workload delete --cluster="$CLUSTER" --workload="$WORKLOAD" "${LOC[@]}"
}

"$COMMAND"
