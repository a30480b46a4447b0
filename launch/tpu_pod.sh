#!/usr/bin/env bash
# Runs an experiment on a Cloud TPU VM pod slice: every worker runs the same
# `python -m sre2l_jax.main ... --distributed`; JAX finds the other workers by itself.
#
# Usage (from the repository root, with gcloud authenticated and a GCS bucket you own):
#   PROJECT=my-project BUCKET=my-bucket bash launch/tpu_pod.sh [create|setup|mount|run|delete|all]
# Every variable below can be overridden from the environment. `all` (the default) creates
# the slice, copies the code, installs it, mounts the bucket and runs the experiment;
# re-running `run` resumes every stage from its last checkpoint.
#
# Storage: all workers write one checkpoint together and read what worker 0 exported, so
# the workdir must be one filesystem they all see. The stages write with POSIX file calls,
# so the bucket is mounted with gcsfuse at MOUNT on every worker and WORKDIR lives there
# (a gs:// URL as --workdir is not supported). ImageNet: the TFDS ArrayRecord files under
# DATA_DIR, or the two ILSVRC2012 tars under MANUAL_DIR, from which worker 0 prepares them
# once (hours; better done once on a large CPU VM with the same DATA_DIR).
set -euo pipefail

PROJECT="${PROJECT:?set PROJECT to your Google Cloud project}"
BUCKET="${BUCKET:?set BUCKET to a GCS bucket name (no gs://)}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-sre2l-pod}"
ACCELERATOR="${ACCELERATOR:-v4-32}"           # 16 chips on 4 workers
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/in1k_ipc50.py}"
EXPERIMENT="${EXPERIMENT:-in1k_ipc50}"
MOUNT="${MOUNT:-/mnt/${BUCKET}}"              # gcsfuse mount point of gs://BUCKET on every worker
WORKDIR="${WORKDIR:-${MOUNT}/sre2l/${EXPERIMENT}}"
DATA_DIR="${DATA_DIR:-${MOUNT}/tensorflow_datasets}"
MANUAL_DIR="${MANUAL_DIR:-}"                  # folder with the ILSVRC2012 tars, if not prepared
TEACHER_DIR="${TEACHER_DIR:-}"                # an imported PyTorch teacher (skips squeeze)
STAGES="${STAGES:-}"                          # e.g. recover,relabel,evaluate ('' = config's)
REMOTE_DIR="${REMOTE_DIR:-sre2l_jax}"         # code location in each worker's home
STEP="${1:-all}"

tpu() {
  gcloud compute tpus tpu-vm "$@" --project="${PROJECT}" --zone="${ZONE}"
}

on_all_workers() {
  tpu ssh "${TPU_NAME}" --worker=all --command="$1"
}

create() {
  tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}"
}

setup() {
  # Copy the tracked files of the working tree to every worker, then install them there.
  local archive
  archive="$(mktemp -t sre2l_code.XXXXXX).tar.gz"
  git ls-files -z | tar --null -czf "${archive}" -T -
  tpu scp "${archive}" "${TPU_NAME}:sre2l_code.tar.gz" --worker=all
  rm -f "${archive}"
  on_all_workers "mkdir -p ${REMOTE_DIR} && tar -xzf sre2l_code.tar.gz -C ${REMOTE_DIR} && \
    cd ${REMOTE_DIR} && pip install -q -U pip && pip install -q -e . && \
    pip install -q -U 'jax[tpu]' && python -c 'import jax; print(jax.device_count())'"
  mount_bucket
}

mount_bucket() {
  # gcsfuse from Google's apt repository; directory renames are what Orbax commits with.
  on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then \
    echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | \
      sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
    curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && \
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi; \
    sudo mkdir -p ${MOUNT} && sudo chown \$(id -u):\$(id -g) ${MOUNT}; \
    mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs --rename-dir-limit=1000000 \
      ${BUCKET} ${MOUNT}"
}

run() {
  local args="--config=${CONFIG} --workdir=${WORKDIR} --distributed \
    --config.dataset.data_dir=${DATA_DIR}"
  if [[ -n "${MANUAL_DIR}" ]]; then args+=" --config.dataset.manual_dir=${MANUAL_DIR}"; fi
  if [[ -n "${TEACHER_DIR}" ]]; then args+=" --config.squeeze.teacher_dir=${TEACHER_DIR}"; fi
  if [[ -n "${STAGES}" ]]; then args+=" --stages=${STAGES}"; fi
  # Re-running the same command resumes every stage from its last checkpoint.
  on_all_workers "set -o pipefail; cd ${REMOTE_DIR} && python -m sre2l_jax.main ${args} 2>&1 | \
    tee -a ~/sre2l_${EXPERIMENT}.log"
}

delete() {
  tpu delete "${TPU_NAME}" --quiet
}

case "${STEP}" in
  create) create ;;
  setup) setup ;;
  mount) mount_bucket ;;
  run) run ;;
  delete) delete ;;
  all) create; setup; run ;;
  *) echo "usage: $0 [create|setup|mount|run|delete|all]" >&2; exit 2 ;;
esac
