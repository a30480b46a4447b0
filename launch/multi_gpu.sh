#!/usr/bin/env bash
# Runs an experiment on several GPU nodes as one JAX program: one process per GPU, joined by
# jax.distributed (under SLURM it reads the layout from SLURM's variables: process i drives GPU
# SLURM_LOCALID of its node, so a node must run as many tasks as it has GPUs).
#
# Under SLURM, from the repository root, with the package and JAX's CUDA build in the
# environment you submit from (sbatch passes it on), e.g. `bash launch/setup.sh --no-data &&
# .venv/bin/python -m pip install -U "jax[cuda13]" && source .venv/bin/activate` (cuda13
# needs an NVIDIA driver >= 580, cuda12 one >= 525; the job prints the driver's version;
# PYTHON names another interpreter than `python`):
#   NODES=4 GPUS_PER_NODE=8 bash launch/multi_gpu.sh submit configs/in1k_ipc50.py \
#       /shared/sre2l_runs/in1k_ipc50 [main.py flags...]
# which runs `sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=...
# --time=... --signal=B:USR1@300 --requeue ... launch/multi_gpu.sh CONFIG WORKDIR ...`
# (or call sbatch yourself with those options; the #SBATCH lines below are the defaults).
# Settings for `submit`: NODES (1), GPUS_PER_NODE (8), CPUS_PER_TASK (8: JPEG decoding threads
# per GPU process), TIME (24:00:00), PARTITION, ACCOUNT, MAX_RESTARTS (10), GRES=1 (ask for
# the GPUs as --gres=gpu:N, for clusters that take no --gpus-per-node), DRY_RUN=1 (print the
# sbatch command only).
#
# Time limits: 5 minutes before --time runs out SLURM signals the batch script (USR1), which
# sends TERM to the job step, waits until every task has saved its stage's checkpoint and
# exited (JAX takes TERM as a preemption notice: all processes save at the same step), and only
# then requeues the job (up to MAX_RESTARTS times, SLURM_RESTART_COUNT counts them): a requeue
# alone would give the tasks KillWait (30 s) to save. The requeued job runs the same command on
# the same WORKDIR and every stage resumes from that checkpoint. Logs: sre2l_<jobid>.log,
# appended across requeues, every line prefixed by its task number.
#
# Without SLURM, start it on every node with the same coordinator (node 0's address); each
# node then runs one process that drives all of its GPUs:
#   COORDINATOR=node0:12345 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#       bash launch/multi_gpu.sh configs/in1k_ipc50.py /shared/sre2l_runs/in1k_ipc50
#
# WORKDIR must be on a filesystem every node sees (NFS, Lustre, a gcsfuse mount with its
# metadata caches off): the processes write one checkpoint together.
#SBATCH --job-name=sre2l
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=sre2l_%j.log
set -euo pipefail

if [[ "${1:-}" == submit ]]; then
  shift
  : "${1:?usage: multi_gpu.sh submit CONFIG WORKDIR [main.py flags...]}"
  : "${2:?give a WORKDIR on a filesystem every node sees}"
  gpus="${GPUS_PER_NODE:-8}"
  gpu_option=--gpus-per-node="${gpus}"
  if [[ "${GRES:-0}" == 1 ]]; then gpu_option=--gres=gpu:"${gpus}"; fi
  options=(--nodes="${NODES:-1}" --ntasks-per-node="${gpus}" "${gpu_option}"
           --cpus-per-task="${CPUS_PER_TASK:-8}" --time="${TIME:-24:00:00}"
           --signal=B:USR1@300 --requeue --open-mode=append --output=sre2l_%j.log
           --export=ALL,MAX_RESTARTS="${MAX_RESTARTS:-10}")
  if [[ -n "${PARTITION:-}" ]]; then options+=(--partition="${PARTITION}"); fi
  if [[ -n "${ACCOUNT:-}" ]]; then options+=(--account="${ACCOUNT}"); fi
  command=(sbatch "${options[@]}" "$(dirname "$0")/multi_gpu.sh" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"; printf '\n'
  else
    "${command[@]}"
  fi
  exit 0
fi

CONFIG="${1:?usage: multi_gpu.sh [submit] CONFIG WORKDIR [main.py flags...]}"
WORKDIR="${2:?give a WORKDIR on a filesystem every node sees}"
shift 2
PYTHON="${PYTHON:-python}"
MAX_RESTARTS="${MAX_RESTARTS:-10}"
# Let XLA take GPU memory as needed instead of 75% up front (recover holds large image sets).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

if [[ -n "${COORDINATOR:-}" ]]; then
  # Read by sre2l_jax.multihost.initialize().
  export JAX_COORDINATOR_ADDRESS="${COORDINATOR}"
  export JAX_NUM_PROCESSES="${NUM_PROCESSES:?set NUM_PROCESSES}"
  export JAX_PROCESS_ID="${PROCESS_ID:?set PROCESS_ID}"
  exec "${PYTHON}" -m sre2l_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" --distributed \
    "$@"
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "Not under SLURM: submit with 'bash launch/multi_gpu.sh submit ...', or set" \
       "COORDINATOR, NUM_PROCESSES and PROCESS_ID (see the header)." >&2
  exit 2
fi

# One task per GPU, checked here rather than found out as idle GPUs: JAX gives task i of a
# node GPU SLURM_LOCALID only. The GPUs SLURM gave this node (MIG slices and shared nodes
# included); nvidia-smi's list only where SLURM does not say.
tasks="${SLURM_NTASKS_PER_NODE:-}"
gpus="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | grep -c '^GPU ' || true)}"
if [[ -z "${tasks}" || "${tasks}" != "${gpus}" ]]; then
  echo "multi_gpu.sh: ${tasks:-an unset number of} task(s) per node for ${gpus} GPU(s) on" \
       "$(hostname): submit with --ntasks-per-node=${gpus} --gpus-per-node=${gpus} (one" \
       "process per GPU), e.g. GPUS_PER_NODE=${gpus} bash launch/multi_gpu.sh submit ..." >&2
  exit 2
fi
cpus="${SLURM_CPUS_PER_TASK:-1}"
echo "multi_gpu.sh: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}):" \
     "${SLURM_NNODES:-1} node(s) x ${tasks} GPU processes, ${cpus} CPUs each, workdir ${WORKDIR}," \
     "NVIDIA driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null |
                      head -n 1 || true)"

STOPPING=0
step=""
stop_step() {
  # SIGUSR1 from --signal=B:USR1@300: the time limit is near. TERM to the step (srun passes
  # it to every task): each stage saves its checkpoint at the same step on all processes and
  # exits; the requeue follows once the step has ended (below).
  STOPPING=1
  echo "multi_gpu.sh: time limit near: asking job ${SLURM_JOB_ID}'s tasks to save and stop" >&2
  if [[ -n "${step}" ]]; then kill -TERM "${step}" 2>/dev/null || true; fi
}
trap stop_step USR1

# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): pass it on. --label
# prefixes each output line with its task number; --kill-on-bad-exit stops every task when one
# fails (the others would wait for it forever); --gpu-bind=none shows each task all GPUs of its
# node, JAX picks GPU SLURM_LOCALID.
srun --label --kill-on-bad-exit=1 --gpu-bind=none --ntasks-per-node="${tasks}" \
  --cpus-per-task="${cpus}" \
  "${PYTHON}" -m sre2l_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" --distributed "$@" &
step=$!
if (( STOPPING )); then kill -TERM "${step}" 2>/dev/null || true; fi  # USR1 came before srun
# A trapped signal interrupts `wait` (bash runs traps only between commands): wait again until
# srun itself has ended, then report its status.
status=0
while true; do
  wait "${step}" && status=0 || status=$?
  if ! kill -0 "${step}" 2>/dev/null; then break; fi
done
if (( STOPPING )); then
  # The tasks have saved and exited: the requeued job starts this script again and every
  # stage resumes from its checkpoint.
  if (( ${SLURM_RESTART_COUNT:-0} < MAX_RESTARTS )); then
    echo "multi_gpu.sh: the tasks saved and stopped (exit ${status}); requeueing job" \
         "${SLURM_JOB_ID}" >&2
    scontrol requeue "${SLURM_JOB_ID}"
  else
    echo "multi_gpu.sh: the tasks saved and stopped; ${MAX_RESTARTS} restarts done: not" \
         "requeueing (submit the same command again to go on)." >&2
  fi
  exit 0
fi
exit "${status}"
