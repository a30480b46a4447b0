#!/usr/bin/env bash
# Runs on every Cloud TPU VM worker of a slice: launch/tpu_pod.sh copies the repository there
# and calls `bash sre2l_jax/launch/tpu_worker.sh ACTION ...` on all workers at once (through
# `gcloud compute tpus tpu-vm ssh --worker=all`). Not meant to be run on your own machine.
#
# Actions:
#   install          a Python >= 3.11 virtual environment at VENV (uv, Python PYTHON_VERSION:
#                    the TPU runtime images ship Python 3.10, jax >= 0.7 needs 3.11), with this
#                    package (its `gcs` extra: gcsfs, for gs:// workdirs) and jax[tpu] in it
#   devices          prints the slice's device count (run on all workers at once: every
#                    worker must join, or the call waits for the missing ones)
#   mount            installs gcsfuse and mounts gs://BUCKET at MOUNT for the data (DATA_DIR:
#                    ArrayRecord's reader opens local paths only), metadata caches off, the
#                    file cache in CACHE_DIR with FILE_CACHE_GB > 0, then checks the mount.
#                    The workdir is a gs:// URL, written without the mount.
#   check-mount      fails unless MOUNT is a mounted, writable bucket
#   data             prepares ImageNet (TFDS imagenet2012, ArrayRecord) in DATA_DIR once, from
#                    the two ILSVRC2012 tars in MANUAL_DIR, as a detached job named `data`
#   train NAME ARGS  checks the data mount, then starts `python -m sre2l_jax.main ARGS` detached,
#                    as job NAME (survives the ssh session; a second start while it runs is
#                    refused). The job runs at most MAX_HOURS (hours; then SIGTERM, which
#                    saves the stage's checkpoint); when it ends it copies its log and exit
#                    code to RESULTS/worker-W.{log,exit} (a gs:// folder), and with
#                    DELETE_SLICE=1 worker 0 then waits for all NUM_WORKERS reports and deletes
#                    the slice (TPU_NAME, or QUEUED_RESOURCE, in PROJECT and ZONE): the VM's
#                    service account needs roles/tpu.admin for that
#   state NAME       prints one line `sre2l-job name=NAME worker=W state=S exit=N`, S one of
#                    running / done / failed / killed (ended without an exit code, as by a
#                    maintenance restart or reboot, or 143: stopped by SIGTERM after its
#                    save) / absent
#   status NAME      state, mount, disk and the last lines of the job's log
# A job's files are in JOBS_DIR/NAME: log (appended to by every start), pid, exit_code, lock (held
# by the job while it runs: the guard against a second copy, e.g. from a retried ssh command).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-${HOME}/sre2l_venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
JOBS_DIR="${JOBS_DIR:-${HOME}/sre2l_jobs}"
BUCKET="${BUCKET:-}"
MOUNT="${MOUNT:-}"
DATA_DIR="${DATA_DIR:-${MOUNT}/tensorflow_datasets}"
MANUAL_DIR="${MANUAL_DIR:-${DATA_DIR}/downloads/manual}"
FILE_CACHE_GB="${FILE_CACHE_GB:-0}"           # gcsfuse's file cache for the data (0: off)
CACHE_DIR="${CACHE_DIR:-${HOME}/gcsfuse_cache}"
ACTION="${1:?usage: tpu_worker.sh install|devices|mount|check-mount|data|train|state|status}"
shift

worker_id() {
  # The worker number Cloud TPU gives this VM (what JAX reads too), else the host name.
  if [[ -n "${WORKER_ID:-}" ]]; then
    echo "${WORKER_ID}"
  else
    curl -sf -H 'Metadata-Flavor: Google' \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
      2>/dev/null || hostname
  fi
}

install() {
  local uv="${HOME}/.local/bin/uv"
  if command -v uv >/dev/null 2>&1; then
    uv="$(command -v uv)"
  elif [[ ! -x "${uv}" ]]; then
    # Ubuntu 22.04's pip installs into ~/.local; newer images need the PEP 668 override.
    python3 -m pip install --user -q -U uv ||
      python3 -m pip install --user -q -U --break-system-packages uv
  fi
  if [[ ! -x "${VENV}/bin/python" ]]; then
    "${uv}" venv --python "${PYTHON_VERSION}" "${VENV}"  # downloads that Python if needed
  fi
  "${uv}" pip install --python "${VENV}/bin/python" -q -e '.[gcs,imagenet]' 'jax[tpu]'
  "${VENV}/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version
import sre2l_jax; print("worker", sys.argv[1], "python", sys.version.split()[0])' "$(worker_id)"
}

devices() {
  # Joins the slice's processes as main.py --distributed does (Cloud TPU: nothing to set).
  "${VENV}/bin/python" -c 'import jax; jax.distributed.initialize()
print("worker", jax.process_index(), "of", jax.process_count(), ":", jax.local_device_count(),
      "of", jax.device_count(), "devices")'
}

check_mount() {
  local worker
  worker="$(worker_id)"
  if ! mountpoint -q "${MOUNT}"; then
    echo "sre2l: ${MOUNT} is not mounted on worker ${worker} (after a maintenance restart the" \
         "mount is gone and outputs would land on the boot disk): run" \
         "'bash launch/tpu_pod.sh mount' first." >&2
    return 1
  fi
  local probe="${MOUNT}/.sre2l_mount_check_${worker}"
  if ! { echo ok > "${probe}" && rm -f "${probe}"; }; then
    echo "sre2l: ${MOUNT} is mounted on worker ${worker} but not writable: give the TPU VM's" \
         "service account write access to gs://${BUCKET} (roles/storage.objectUser)." >&2
    return 1
  fi
}

mount_bucket() {
  : "${BUCKET:?set BUCKET}" "${MOUNT:?set MOUNT}"
  if ! command -v gcsfuse >/dev/null 2>&1; then
    # Google's apt repository, as the Cloud Storage FUSE install guide sets it up.
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
      sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc]" \
         "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    # A fresh VM often runs unattended-upgrades at boot: wait for the dpkg lock.
    sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse
  fi
  if ! mountpoint -q "${MOUNT}"; then
    sudo mkdir -p "${MOUNT}"
    sudo chown "$(id -u):$(id -g)" "${MOUNT}"
    # Only the data is read through the mount (the workdir is written to gs:// directly).
    # Metadata caches off: worker 0 prepares the data while the others may look, and
    # gcsfuse's stat/type caches could hide it from them. TFDS renames its finished
    # folder, which gcsfuse allows up to --rename-dir-limit descendants.
    # FILE_CACHE_GB > 0: gcsfuse's file cache in CACHE_DIR, filled also by random reads, so
    # that every epoch after the first reads local disk, not GCS (ImageNet's ArrayRecord
    # files are ~155 GB: give the VM a disk that holds them, or leave the cache off).
    local cache=()
    if (( ${FILE_CACHE_GB:-0} > 0 )); then
      mkdir -p "${CACHE_DIR}"
      cache=(--cache-dir="${CACHE_DIR}" --file-cache-max-size-mb=$((FILE_CACHE_GB * 1024))
             --file-cache-cache-file-for-range-read=true)
    fi
    gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 \
      --metadata-cache-negative-ttl-secs=0 "${cache[@]}" "${BUCKET}" "${MOUNT}"
  fi
  check_mount
}

job_state() {
  # Prints running / done / failed / absent for job $1.
  local dir="${JOBS_DIR}/$1"
  if [[ ! -e "${dir}/lock" ]]; then
    echo absent
  elif ! flock -n "${dir}/lock" true; then
    echo running
  elif [[ ! -e "${dir}/exit_code" ]]; then
    echo killed  # gone without writing its exit code: a VM restart, or a kill -9
  elif [[ "$(cat "${dir}/exit_code")" == 143 ]]; then
    echo killed  # SIGTERM (e.g. before maintenance): main.py saved its stage, then exited
  elif [[ "$(cat "${dir}/exit_code")" == 0 ]]; then
    echo done
  else
    echo failed
  fi
}

start_job() {
  # start_job NAME COMMAND...: COMMAND runs detached (setsid + nohup), its output appended to
  # JOBS_DIR/NAME/log; the lock file stays locked for as long as it runs.
  local name="$1" dir="${JOBS_DIR}/$1"
  shift
  mkdir -p "${dir}"
  exec 9>>"${dir}/lock"
  if ! flock -n 9; then
    echo "sre2l: job ${name} is already running on worker $(worker_id)" \
         "(pid $(cat "${dir}/pid" 2>/dev/null)): not starting a second copy."
    return 0
  fi
  rm -f "${dir}/exit_code" "${dir}/pid"
  echo "=== $(date -u '+%F %T') worker $(worker_id) starts: $*" >> "${dir}/log"
  # The child inherits fd 9 and with it the lock; this shell closes its copy below.
  nohup setsid bash -c 'echo $$ > "$0/pid"; "$@" >> "$0/log" 2>&1; echo $? > "$0/exit_code"' \
    "${dir}" "$@" > /dev/null 2>&1 < /dev/null &
  exec 9>&-
  local _
  for _ in $(seq 100); do [[ -s "${dir}/pid" ]] && break; sleep 0.1; done
  echo "sre2l: started job ${name} on worker $(worker_id) (pid $(cat "${dir}/pid" 2>/dev/null))," \
       "log ${dir}/log"
}

run_job() {
  # run_job NAME ARGS: job NAME itself (started detached by `train`): main.py, for at most
  # MAX_HOURS; then its end reported to RESULTS and, on worker 0, the slice deleted.
  local name="$1" id rc=0 limit=()
  shift
  id="$(worker_id)"
  if [[ -n "${RESULTS:-}" ]]; then  # a report from an earlier start is not this one's
    gcloud storage rm "${RESULTS}/worker-${id}.exit" "${RESULTS}/worker-${id}.log" \
      >/dev/null 2>&1 || true
  fi
  # TERM first: under jax.distributed it is a preemption notice, and the stage saves.
  if [[ -n "${MAX_HOURS:-}" ]]; then limit=(timeout --kill-after=10m "${MAX_HOURS}h"); fi
  "${limit[@]}" "${VENV}/bin/python" -m sre2l_jax.main "$@" || rc=$?
  if [[ -n "${MAX_HOURS:-}" ]] && (( rc == 124 )); then
    echo "sre2l: stopped after MAX_HOURS=${MAX_HOURS} h; running it again resumes every stage."
  fi
  if [[ -n "${RESULTS:-}" ]]; then
    gcloud storage cp "${JOBS_DIR}/${name}/log" "${RESULTS}/worker-${id}.log" >/dev/null ||
      echo "sre2l: could not copy the log to ${RESULTS}" >&2
    echo "${rc}" | gcloud storage cp - "${RESULTS}/worker-${id}.exit" >/dev/null ||
      echo "sre2l: could not write ${RESULTS}/worker-${id}.exit" >&2
  fi
  if [[ "${DELETE_SLICE:-0}" == 1 && "${id}" == 0 ]]; then delete_slice; fi
  return "${rc}"
}

delete_slice() {
  # Worker 0, once the job ended: wait (at most END_WAIT_SECONDS) until every worker reported,
  # so that no log is lost, then delete the slice this runs on.
  : "${TPU_NAME:?}" "${PROJECT:?}" "${ZONE:?}" "${RESULTS:?}"
  local deadline=$((SECONDS + ${END_WAIT_SECONDS:-900})) reported
  while true; do
    reported="$(gcloud storage ls "${RESULTS}/worker-*.exit" 2>/dev/null | grep -c . || true)"
    if (( reported >= ${NUM_WORKERS:-1} )); then break; fi
    if (( SECONDS >= deadline )); then
      echo "sre2l: ${reported} of ${NUM_WORKERS:-1} workers reported; deleting the slice anyway."
      break
    fi
    sleep "${POLL_SECONDS:-10}"
  done
  echo "sre2l: the job ended: worker 0 deletes ${QUEUED_RESOURCE:-${TPU_NAME}}."
  local target=(tpu-vm delete "${TPU_NAME}")
  if [[ -n "${QUEUED_RESOURCE:-}" ]]; then
    target=(queued-resources delete "${QUEUED_RESOURCE}" --force)
  fi
  if ! gcloud compute tpus "${target[@]}" --quiet --async --project="${PROJECT}" \
      --zone="${ZONE}"; then
    echo "sre2l: worker 0 could not delete ${TPU_NAME}, which is still BILLING: give the TPU" \
         "VMs' service account roles/tpu.admin, and delete it: bash launch/tpu_pod.sh delete." >&2
  fi
}

prepare_data() {
  # The same builder and file format the package reads (sre2l_jax.data.datasets).
  "${VENV}/bin/python" - "${DATA_DIR}" "${MANUAL_DIR}" <<'EOF'
import sys
import tensorflow_datasets as tfds
data_dir, manual_dir = sys.argv[1:]
builder = tfds.builder('imagenet2012', data_dir=data_dir, file_format='array_record')
if not builder.is_prepared():
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
print('imagenet2012 prepared in', builder.data_dir)
EOF
}

case "${ACTION}" in
  install) install ;;
  devices) devices ;;
  mount) mount_bucket ;;
  check-mount) check_mount ;;
  data)
    check_mount
    if compgen -G "${DATA_DIR}/imagenet2012/*/dataset_info.json" >/dev/null; then
      echo "sre2l: ImageNet is already prepared in ${DATA_DIR}/imagenet2012."
      mkdir -p "${JOBS_DIR}/data" && touch "${JOBS_DIR}/data/lock" &&
        echo 0 > "${JOBS_DIR}/data/exit_code"
    else
      for tar in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar; do
        if [[ ! -f "${MANUAL_DIR}/${tar}" ]]; then
          echo "sre2l: ${MANUAL_DIR}/${tar} is missing: upload the two ILSVRC2012 tars there" \
               "(see the README's TPU section)." >&2
          exit 1
        fi
      done
      start_job data bash launch/tpu_worker.sh prepare-data
    fi
    ;;
  prepare-data) prepare_data ;;
  train)
    name="${1:?usage: tpu_worker.sh train NAME MAIN_ARGS...}"
    shift
    check_mount
    start_job "${name}" bash launch/tpu_worker.sh job "${name}" "$@"
    ;;
  job) run_job "$@" ;;
  state) echo "sre2l-job name=$1 worker=$(worker_id) state=$(job_state "$1")" \
              "exit=$(cat "${JOBS_DIR}/$1/exit_code" 2>/dev/null || echo -)" ;;
  status)
    echo "sre2l-job name=$1 worker=$(worker_id) state=$(job_state "$1")" \
         "exit=$(cat "${JOBS_DIR}/$1/exit_code" 2>/dev/null || echo -)"
    if mountpoint -q "${MOUNT}"; then echo "  ${MOUNT}: mounted"; else
      echo "  ${MOUNT}: NOT MOUNTED"; fi
    df -h --output=avail,target "${HOME}" | tail -n 1 | sed 's/^/  free on boot disk: /'
    tail -n 3 "${JOBS_DIR}/$1/log" 2>/dev/null | sed 's/^/  | /' || true
    ;;
  *) echo "tpu_worker.sh: unknown action ${ACTION}" >&2; exit 2 ;;
esac
