#!/usr/bin/env bash
# Runs an experiment on several GPU nodes: one process per node (each sees all of its
# node's GPUs), joined by jax.distributed.
#
# Usage, under SLURM (JAX detects the SLURM layout by itself):
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/multi_gpu.sh \
#       configs/in1k_ipc50.py /shared/sre2l_runs/in1k_ipc50
# Without SLURM, start it on every node with the same coordinator (node 0's address):
#   COORDINATOR=node0:12345 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#       bash launch/multi_gpu.sh configs/in1k_ipc50.py /shared/sre2l_runs/in1k_ipc50
# WORKDIR must be on a filesystem every node sees (NFS, Lustre, a gcsfuse mount; a gs:// URL
# is not supported, the stages write with POSIX file calls): the processes
# write one checkpoint together. Install on every node: pip install -e . "jax[cuda12]".
#SBATCH --job-name=sre2l
#SBATCH --ntasks-per-node=1
#SBATCH --output=sre2l_%j.log
set -euo pipefail

CONFIG="${1:-configs/in1k_ipc50.py}"
WORKDIR="${2:?give a WORKDIR on a shared filesystem}"
shift 2
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

if [[ -n "${COORDINATOR:-}" ]]; then
  # Read by sre2l_jax.multihost.initialize().
  export JAX_COORDINATOR_ADDRESS="${COORDINATOR}"
  export JAX_NUM_PROCESSES="${NUM_PROCESSES:?set NUM_PROCESSES}"
  export JAX_PROCESS_ID="${PROCESS_ID:?set PROCESS_ID}"
  exec python -m sre2l_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" --distributed "$@"
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "Not under SLURM: set COORDINATOR, NUM_PROCESSES and PROCESS_ID (see the header)." >&2
  exit 2
fi
# One task per node; srun starts them all and JAX reads the SLURM variables.
srun --ntasks-per-node=1 python -m sre2l_jax.main --config="${CONFIG}" \
  --workdir="${WORKDIR}" --distributed "$@"
