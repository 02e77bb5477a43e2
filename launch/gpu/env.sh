# shellcheck shell=bash
# The XLA / NCCL environment of a GPU node for DP-DMD, sourced by launch/gpu/run.sh (a SLURM script
# may source it too). Values already in the environment win.

# JAX preallocates 75% of each GPU's memory by default; a full-size round needs more.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# Overlap the FSDP all-gathers / reduce-scatters with compute (XLA's latency-hiding scheduler).
if [[ ${XLA_FLAGS:-} != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
fi

# NCCL prints warnings only; NCCL_DEBUG=INFO prints the topology and transports it chose (for hangs
# and slow steps).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Cluster-specific: set them before starting run.sh where needed.
#   NCCL_SOCKET_IFNAME=eth0   the interface the nodes reach each other on (`ip addr`), when NCCL
#                             picks a wrong one (a docker bridge, a management network)
#   NCCL_IB_HCA=mlx5          the InfiniBand adapters NCCL may use; NCCL_IB_DISABLE=1 on nodes
#                             without InfiniBand that stall trying it
#   JAX_COMPILATION_CACHE_DIR=/shared/jax_cache   a compile cache on the shared filesystem: a
#                             resumed run skips the minutes-long compile of the round
# One process per node drives all of the node's GPUs: leave CUDA_VISIBLE_DEVICES unset (or list them all).
