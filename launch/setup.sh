#!/usr/bin/env bash
# Sets up sre2l_jax on a fresh Debian/Ubuntu machine that has only the system `python3`
# (Python >= 3.11): the Fashion-MNIST data package (apt, where available and root or sudo is
# at hand; otherwise a line says how to get it, and the rest goes on), a project
# environment `.venv` (a stock Debian 12 / Ubuntu 24.04 interpreter refuses `pip install`,
# PEP 668), and this package installed into it. Nothing is installed outside `.venv` but the
# two Debian packages (data, and python3-venv where `python3 -m venv` lacks it).
#
# Usage (from anywhere; idempotent: a second run reuses `.venv` and installs only when
# setup.cfg, setup.py or pyproject.toml changed):
#   bash launch/setup.sh           what the pipeline needs; then run .venv/bin/python -m ...
#   bash launch/setup.sh --test    also a CPU build of PyTorch (the parity tests and the
#                                  benchmark reference) and the test extras (launch/test.sh)
#   bash launch/setup.sh --no-data without the Fashion-MNIST package (e.g. ImageNet only, or a
#                                  cluster login node without sudo)
# PYTHON=/path/to/python3.12 bash launch/setup.sh picks the interpreter that creates `.venv`
# (default: `python3` on PATH). `source .venv/bin/activate` puts `.venv`'s `python` first.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
DATA=1
for arg in "$@"; do
  case "${arg}" in
    --test) TEST=1 ;;
    --no-data) DATA=0 ;;
    *) echo "usage: bash launch/setup.sh [--test] [--no-data]" >&2; exit 2 ;;
  esac
done

as_root() { if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
can_root() {
  # Root, or sudo that needs no password, or one that can ask for it on this terminal.
  [[ "$(id -u)" -eq 0 ]] ||
    { command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [[ -t 0 ]]; }; }
}
APT_UPDATED=0
apt_install() {
  if [[ "${APT_UPDATED}" == 0 ]]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  as_root apt-get install -y -qq "$@"
}

# Where the Debian package puts the IDX files (and the package's default source_dir).
FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
OWN_FOLDER="place train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,\
 t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and run with\
 --config.dataset.source_dir=<that folder> (ImageNet configs need none of this)"
if [[ "${DATA}" == 1 && ! -f "${FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz" ]]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: no apt-get here for the Fashion-MNIST package: ${OWN_FOLDER}." >&2
  elif ! can_root; then
    echo "setup.sh: not installing the Fashion-MNIST package (dataset-fashion-mnist): no root" \
         "and no sudo here. Ask an admin for it, or ${OWN_FOLDER}." >&2
  elif ! apt_install dataset-fashion-mnist; then
    echo "setup.sh: installing dataset-fashion-mnist failed; ${OWN_FOLDER}." >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
# A `.venv` whose pip works is reused; a half-made one (e.g. venv without ensurepip) is not.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  if ! "${PYTHON}" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup.sh: ${PYTHON} is missing or older than Python 3.11; install python3 >= 3.11" \
         "or name one with PYTHON=..." >&2
    exit 1
  fi
  rm -rf .venv
  if ! "${PYTHON}" -m venv .venv; then
    # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a package of its own.
    if ! command -v apt-get >/dev/null 2>&1 || ! can_root; then
      echo "setup.sh: '${PYTHON} -m venv' failed (Debian and Ubuntu ship its pip bootstrap in" \
           "python3-venv) and apt-get with root or sudo is not at hand to add it: ask an admin" \
           "for python3-venv, or name a Python that has venv with PYTHON=..." >&2
      exit 1
    fi
    apt_install python3-venv
    rm -rf .venv
    "${PYTHON}" -m venv .venv
  fi
fi

# Done before with these requirements (the install is editable: code changes need no new
# one): nothing to install. Delete `.venv` to start again.
STAMP=.venv/sre2l_setup_done
requirements="$(cat setup.cfg setup.py pyproject.toml | sha256sum | cut -d' ' -f1)"
if grep -qxF "${requirements} test=${TEST}" "${STAMP}" 2>/dev/null; then
  exit 0
fi
PIP=(.venv/bin/python -m pip install -q)
if [[ "${TEST}" == 1 ]]; then
  # The CPU build: PyPI's Linux torch is a multi-GB CUDA build; PyTorch's CPU index has the
  # same version as 2.13.0+cpu, which pip prefers. TORCH_INDEX_URL= (empty) leaves pip's own
  # configuration (e.g. a local wheel) alone. The pipeline itself never needs torch.
  if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
    # --retries 0: where that index cannot be reached (an offline mirror), pip moves on at
    # once instead of retrying it for torch and each of its dependencies.
    "${PIP[@]}" "torch==2.13.0" ${index:+--extra-index-url "${index}" --retries 0}
  fi
  "${PIP[@]}" -e ".[test]"
else
  "${PIP[@]}" -e .
fi
# --test installs everything a plain set-up does.
{ echo "${requirements} test=0"; [[ "${TEST}" == 0 ]] || echo "${requirements} test=1"; } \
  > "${STAMP}"
