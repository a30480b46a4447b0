#!/usr/bin/env bash
# Installs everything sre2l_jax needs on a fresh Debian/Ubuntu machine (or any machine with
# pip): the Fashion-MNIST data package (apt, where available), a CPU build of PyTorch for
# the parity tests and the benchmark reference, and the package with its test extras.
# Usage: bash launch/setup.sh            (run from the repository root; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."

FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "No apt-get here: place train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz," \
         "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and run with" \
         "--config.dataset.source_dir=<that folder>." >&2
  fi
fi

PIP="python3 -m pip"
# torch 2.13.0 resolves to a CPU build on this project's machines; an unpinned torch would
# pull a multi-GB CUDA build.
if ! python3 -c "import torch" >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -e ".[test]"
