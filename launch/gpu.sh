#!/usr/bin/env bash
# Runs an experiment on one machine with one (or several, as one process) NVIDIA GPU.
#
# Usage (from the repository root):
#   bash launch/gpu.sh [CONFIG[:ARGS]] [WORKDIR] [extra main.py flags...]
#   bash launch/gpu.sh configs/in1k_ipc50.py:smoke /tmp/in1k_smoke
# Install once (CUDA 12 wheels bring their own CUDA libraries; a recent driver is enough):
#   pip install -e . && pip install -U "jax[cuda12]"
# Set INSTALL=1 to run those two installs first.
set -euo pipefail

CONFIG="${1:-configs/in1k_ipc50.py}"
WORKDIR="${2:-${HOME}/sre2l_runs/$(basename "${CONFIG%%:*}" .py)}"
shift $(( $# > 2 ? 2 : $# ))
INSTALL="${INSTALL:-0}"
# Let XLA take GPU memory as needed instead of 75% up front (recover holds large image sets).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

if [[ "${INSTALL}" == "1" ]]; then
  pip install -e .
  pip install -U "jax[cuda12]"
fi
python -c 'import jax; assert jax.default_backend() == "gpu", jax.devices(); print(jax.devices())'
# Re-running the same command resumes every stage from its last checkpoint.
python -m sre2l_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
