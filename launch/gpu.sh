#!/usr/bin/env bash
# Runs an experiment on one machine with one (or several, as one process) NVIDIA GPU.
#
# Usage (from the repository root):
#   bash launch/gpu.sh [CONFIG[:ARGS]] [WORKDIR] [extra main.py flags...]
#   bash launch/gpu.sh configs/in1k_ipc50.py:smoke /tmp/in1k_smoke
# Install once: INSTALL=1 runs launch/setup.sh (the project environment .venv, see the
# README) and adds JAX's CUDA build to it (its wheels bring their own CUDA libraries; only the
# NVIDIA driver comes from the machine): CUDA=13 needs a driver >= 580, CUDA=12 one >= 525;
# by default the newest the driver takes. By hand:
#   bash launch/setup.sh --no-data && .venv/bin/python -m pip install -U "jax[cuda13]"
# PYTHON: the interpreter to run (default .venv/bin/python where it exists, else python3).
set -euo pipefail

CONFIG="${1:-configs/in1k_ipc50.py}"
WORKDIR="${2:-${HOME}/sre2l_runs/$(basename "${CONFIG%%:*}" .py)}"
shift $(( $# > 2 ? 2 : $# ))
INSTALL="${INSTALL:-0}"
# Let XLA take GPU memory as needed instead of 75% up front (recover holds large image sets).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
if [[ -z "${CUDA:-}" ]]; then
  if (( ${driver%%.*} >= 580 )); then CUDA=13; else CUDA=12; fi
fi
echo "gpu.sh: NVIDIA driver ${driver}; JAX's CUDA ${CUDA} build"
if [[ "${CUDA}" != 12 && "${CUDA}" != 13 ]]; then
  echo "gpu.sh: CUDA=${CUDA}: JAX publishes CUDA 12 and 13 builds; set CUDA=12 or 13." >&2
  exit 2
fi
if [[ "${INSTALL}" == "1" ]]; then
  bash "$(dirname "$0")/setup.sh"
  .venv/bin/python -m pip install -q -U "jax[cuda${CUDA}]"
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"${PYTHON}" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices(); print(jax.devices())'
# Re-running the same command resumes every stage from its last checkpoint.
"${PYTHON}" -m sre2l_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
