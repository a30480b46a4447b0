#!/usr/bin/env bash
# Runs an experiment on a Cloud TPU VM slice, from your machine (with gcloud authenticated):
# every worker runs the same `python -m sre2l_jax.main ... --distributed`, detached from the
# ssh session, and JAX finds the other workers by itself.
#
#   PROJECT=my-project BUCKET=my-bucket bash launch/tpu_pod.sh [STEP...]      (default: all)
#
# Steps (several may be given, run in order):
#   check    what `all` checks before creating anything (nothing bills while one fails): the
#            gcloud SSH key in your ssh-agent (gcloud needs it to reach all workers at once),
#            a git checkout whose CONFIG is tracked (only tracked files are shipped), the
#            accelerator offered in ZONE, the bucket writable, ImageNet in the bucket (prepared,
#            or the two ILSVRC2012 tars). Quota is not checked: a create without it fails at
#            once and leaves no slice.
#   create   creates the slice (QUEUED=1: a queued resource, waited for until ACTIVE; SPOT=1:
#            Spot VMs, about 60-90% cheaper, preemptible); the runtime image follows from
#            ACCELERATOR, named as gcloud names it (v4-N, v5litepod-N (v5e), v5p-N, v6e-N)
#   setup    copies the tracked files of this checkout to every worker, creates a Python 3.12
#            virtual environment there with the package and jax[tpu], mounts the bucket with
#            gcsfuse for the data (metadata caches off) and prints the device count
#   mount    mounts the bucket again (after a maintenance restart or a reboot)
#   data     prepares ImageNet in the bucket once, on worker 0 (hours; skipped when prepared)
#   run      checks the data mount on every worker, then starts training detached on every worker
#            (re-running resumes every stage; a run still alive is not started twice). When the
#            job ends (or after MAX_HOURS), every worker copies its log and exit code to
#            WORKDIR/launch/ and worker 0 deletes the slice itself (unless KEEP=1): no laptop
#            needs to stay on. That needs the TPU VMs' service account to hold roles/tpu.admin.
#   wait     waits for the run to end on every worker, then copies the logs back. A slice that
#            was preempted or restarted by maintenance is said so; with RESUME=1 it is
#            recreated (or remounted) and `run` starts again, every stage resuming from
#            WORKDIR, until the job finishes (at most MAX_RESUMES times)
#   resume   what RESUME=1 does once: recreate a preempted slice (or remount a restarted one),
#            set it up and run again
#   status   the slice's state and health, and per worker: job state, mount, last log lines
#   logs     copies every worker's log to LOG_DIR/worker-<i>.log
#   delete   deletes the slice (or the queued resource with its slice)
#   all      check, create, setup, data, run, wait, logs, delete (KEEP=1 keeps the slice)
# Workers are reached with `gcloud compute tpus tpu-vm ssh --worker=all`, which needs gcloud's
# key (SSH_KEY, ~/.ssh/google_compute_engine) in your ssh-agent:
#   ssh-add ~/.ssh/google_compute_engine
# Cost safety: while create, setup, data or run fail (or are interrupted with Ctrl-C) the slice
# is deleted again unless KEEP=1. Interrupting `wait` leaves the run going and the slice up
# (it says how to wait again or delete). DRY_RUN=1 prints every command instead of running it.
#
# Storage: all workers write one checkpoint together and read what worker 0 exported, so the
# workdir is in the bucket: gs://BUCKET/sre2l/EXPERIMENT, written straight to GCS (Orbax
# writes checkpoints there natively, the rest goes through etils.epath and gcsfs; no mount).
# ImageNet: TFDS ArrayRecord files under DATA_DIR, read through a gcsfuse mount of the bucket
# at MOUNT (ArrayRecord's C++ reader opens local paths only), prepared once from the tars in
# MANUAL_DIR (gs://BUCKET/tensorflow_datasets/downloads/manual/ILSVRC2012_img_{train,val}.tar
# by default).
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT="${PROJECT:?set PROJECT to your Google Cloud project}"
BUCKET="${BUCKET:?set BUCKET to a GCS bucket name (no gs://) in the region of the slice}"
ACCELERATOR="${ACCELERATOR:-v4-32}"           # v4-32: 16 chips on 4 workers
TPU_NAME="${TPU_NAME:-sre2l-pod}"
SPOT="${SPOT:-0}"                             # 1: Spot VMs (preemptible, much cheaper)
QUEUED="${QUEUED:-0}"                         # 1: request through a queued resource
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}-qr}"
VALID_FOR="${VALID_FOR:-}"                    # queued: give up after e.g. 6h if not provisioned
KEEP="${KEEP:-0}"                             # 1: never delete the slice automatically
DRY_RUN="${DRY_RUN:-0}"                       # 1: print the commands, run nothing
POLL_SECONDS="${POLL_SECONDS:-60}"
CONFIG="${CONFIG:-configs/in1k_ipc50.py}"
EXPERIMENT="${EXPERIMENT:-in1k_ipc50}"        # names the workdir, the job and the logs
MOUNT="${MOUNT:-/mnt/${BUCKET}}"              # gcsfuse mount of gs://BUCKET: the data only
FILE_CACHE_GB="${FILE_CACHE_GB:-0}"           # >0: gcsfuse file cache on each worker's disk
WORKDIR="${WORKDIR:-gs://${BUCKET}/sre2l/${EXPERIMENT}}"  # straight to the bucket, no mount
DATA_PATH="${DATA_PATH:-tensorflow_datasets}"  # in the bucket
MANUAL_PATH="${MANUAL_PATH:-${DATA_PATH}/downloads/manual}"
PREPARE_DATA="${PREPARE_DATA:-1}"             # 0: the config reads no ImageNet
TEACHER_DIR="${TEACHER_DIR:-}"                # an imported PyTorch teacher (skips squeeze)
STAGES="${STAGES:-}"                          # e.g. recover,relabel,evaluate ('' = config's)
EXTRA_ARGS="${EXTRA_ARGS:-}"                  # more main.py flags, e.g. --config.seed=1
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
REMOTE_DIR="${REMOTE_DIR:-sre2l_jax}"         # code location in each worker's home
LOG_DIR="${LOG_DIR:-runs/${TPU_NAME}/logs}"   # where `logs` copies the workers' logs to
RESULTS="${RESULTS:-${WORKDIR}/launch}"       # each worker's log and exit code, at the end
MAX_HOURS="${MAX_HOURS:-}"                    # stop the job after this many hours (worker-side)
RESUME="${RESUME:-0}"                         # 1: recreate a preempted slice and run again
MAX_RESUMES="${MAX_RESUMES:-20}"
SSH_KEY="${SSH_KEY:-${HOME}/.ssh/google_compute_engine}"  # the key gcloud uses for TPU VMs

# Names that end up in remote paths and shell commands: refused early rather than quoted into
# something else.
if [[ ! "${TPU_NAME}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
  echo "tpu_pod.sh: TPU_NAME=${TPU_NAME} is not a valid TPU name (lower-case letters, digits" \
       "and '-', starting with a letter)." >&2
  exit 2
fi
if [[ ! "${EXPERIMENT}" =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "tpu_pod.sh: EXPERIMENT=${EXPERIMENT} may hold letters, digits, '.', '_' and '-' only" \
       "(it names the job, its log and the workdir)." >&2
  exit 2
fi

runtime_for() {
  # The software version the Cloud TPU docs name for JAX on each generation.
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    v5e-*|v6litepod-*)
      echo "tpu_pod.sh: gcloud does not know ACCELERATOR=${1}: v5e slices are called" \
           "v5litepod-N, v6e slices v6e-N (gcloud compute tpus accelerator-types list)." >&2
      return 1 ;;
    *) echo "tpu_pod.sh: unknown accelerator type ${1}; set RUNTIME." >&2; return 1 ;;
  esac
}
RUNTIME="${RUNTIME:-$(runtime_for "${ACCELERATOR}")}"
case "${ACCELERATOR}" in
  v4-*) ZONE="${ZONE:-us-central2-b}" ;;
  *) ZONE="${ZONE:?set ZONE to a zone that offers ${ACCELERATOR}, see Cloud TPU regions and zones}" ;;
esac

x() {
  # Runs a command, or prints it (shell-quoted) with DRY_RUN=1.
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

tpu() { x gcloud compute tpus tpu-vm "$@" --project="${PROJECT}" --zone="${ZONE}"; }
queued() { x gcloud compute tpus queued-resources "$@" --project="${PROJECT}" --zone="${ZONE}"; }

JOB_ENV=()  # more VAR=value settings for the workers (set by `run`)
worker() {
  # worker WORKERS ACTION ARGS...: launch/tpu_worker.sh ACTION on WORKERS ('all' or an index).
  local workers="$1"
  shift
  local command
  command="$(printf 'cd %q && BUCKET=%q MOUNT=%q DATA_DIR=%q MANUAL_DIR=%q PYTHON_VERSION=%q' \
    "${REMOTE_DIR}" "${BUCKET}" "${MOUNT}" "${MOUNT}/${DATA_PATH}" "${MOUNT}/${MANUAL_PATH}" \
    "${PYTHON_VERSION}")"
  command+="$(printf ' FILE_CACHE_GB=%q' "${FILE_CACHE_GB}")"
  if (( ${#JOB_ENV[@]} )); then command+="$(printf ' %q' "${JOB_ENV[@]}")"; fi
  command+="$(printf ' %q' bash launch/tpu_worker.sh "$@")"
  tpu ssh "${TPU_NAME}" --worker="${workers}" --command="${command}"
}

# ------------------------------------------------------------------------- cost safety
ARMED=0  # 1 while a failure or Ctrl-C should delete the slice (create, setup, data, run)
STARTED=0  # 1 once a job (data or training) was started: its logs are worth copying back
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if (( rc != 0 && ARMED )); then
    if [[ "${KEEP}" == 1 ]]; then
      echo "tpu_pod.sh: failed (exit ${rc}); KEEP=1, so ${TPU_NAME} is kept and still BILLING." \
           "Delete it with: PROJECT=${PROJECT} BUCKET=${BUCKET} ZONE=${ZONE} QUEUED=${QUEUED}" \
           "bash launch/tpu_pod.sh delete" >&2
    else
      echo "tpu_pod.sh: failed (exit ${rc}): copying the logs back and deleting ${TPU_NAME}" \
           "so that it stops billing (KEEP=1 keeps it)." >&2
      if (( STARTED )); then copy_logs || true; fi
      delete || echo "tpu_pod.sh: DELETING ${TPU_NAME} FAILED: delete it by hand" \
                     "(gcloud compute tpus tpu-vm list --zone=${ZONE})." >&2
    fi
  fi
  exit "${rc}"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------- steps
quiet() {
  # Runs a command for its exit status only (DRY_RUN=1 prints it).
  if [[ "${DRY_RUN}" == 1 ]]; then x "$@"; else "$@" >/dev/null 2>&1; fi
}

check() {
  # Everything that would fail only after the slice is up, checked before anything bills.
  check_code
  check_ssh_key
  check_zone
  check_bucket
  check_data
}

check_code() {
  # setup ships the files git tracks (with their working-tree contents): nothing else.
  local config="${CONFIG%%:*}"
  if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "tpu_pod.sh: $(pwd) is not a git checkout: setup ships the files git tracks, so" \
         "clone the repository (git clone) rather than downloading it. Nothing was created." >&2
    return 1
  fi
  if ! git ls-files --error-unmatch -- "${config}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: CONFIG ${config} is not tracked by git, so it would not reach the" \
         "workers: git add ${config} (a commit is not needed). Nothing was created." >&2
    return 1
  fi
}

check_ssh_key() {
  # gcloud's --worker=all needs its key in ssh-agent (without it: SSHKeyNotInAgent, or a stall).
  local fix="eval \"\$(ssh-agent -s)\" && ssh-add ${SSH_KEY}"
  if [[ "${DRY_RUN}" == 1 ]]; then x ssh-add -L; return 0; fi
  if [[ ! -f "${SSH_KEY}.pub" ]]; then
    echo "tpu_pod.sh: no gcloud SSH key at ${SSH_KEY}: make it (ssh-keygen -t rsa -f" \
         "${SSH_KEY}, or any 'gcloud compute ssh'), then add it to your ssh-agent: ${fix}." \
         "Nothing was created." >&2
    return 1
  fi
  local key agent
  key="$(cut -d' ' -f2 "${SSH_KEY}.pub")"
  agent="$(ssh-add -L 2>/dev/null || true)"
  if [[ -z "${key}" ]] || ! grep -qF -- "${key}" <<< "${agent}"; then
    echo "tpu_pod.sh: gcloud's SSH key ${SSH_KEY} is not in your ssh-agent; gcloud needs it" \
         "there to reach all workers at once. Run: ${fix} (then this again). Nothing was" \
         "created." >&2
    return 1
  fi
}

check_zone() {
  if ! quiet gcloud compute tpus accelerator-types describe "${ACCELERATOR}" \
      --project="${PROJECT}" --zone="${ZONE}"; then
    echo "tpu_pod.sh: ${ACCELERATOR} is not offered in ${ZONE} (or project ${PROJECT} cannot" \
         "use Cloud TPU): see gcloud compute tpus accelerator-types list --zone=${ZONE}." \
         "Nothing was created." >&2
    return 1
  fi
}

check_bucket() {
  # The workdir, the logs and the data live there: written now, not after hours of training.
  local probe="${RESULTS}/.write_check"
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "+ echo ok | gcloud storage cp - ${probe}"
  elif ! echo ok | gcloud storage cp - "${probe}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: cannot write to ${probe}: create the bucket (gcloud storage buckets" \
         "create gs://${BUCKET} --location=<the region of ${ZONE}>) or give yourself" \
         "roles/storage.objectUser on it. Nothing was created." >&2
    return 1
  fi
  quiet gcloud storage rm "${probe}" || true
}

check_data() {
  # ImageNet in the bucket: prepared ArrayRecord files, or the two tars to prepare them from.
  if [[ "${PREPARE_DATA}" != 1 ]]; then return 0; fi
  if quiet gcloud storage ls "gs://${BUCKET}/${DATA_PATH}/imagenet2012/*/dataset_info.json"; then
    echo "tpu_pod.sh: ImageNet is prepared in gs://${BUCKET}/${DATA_PATH}."
  elif quiet gcloud storage ls "gs://${BUCKET}/${MANUAL_PATH}/ILSVRC2012_img_train.tar" \
      "gs://${BUCKET}/${MANUAL_PATH}/ILSVRC2012_img_val.tar"; then
    echo "tpu_pod.sh: the ILSVRC2012 tars are in gs://${BUCKET}/${MANUAL_PATH};" \
         "the data step prepares them (hours, once)."
  else
    echo "tpu_pod.sh: no ImageNet in gs://${BUCKET}: upload ILSVRC2012_img_train.tar and" \
         "ILSVRC2012_img_val.tar to gs://${BUCKET}/${MANUAL_PATH}/ (or set PREPARE_DATA=0 for" \
         "a config that reads no ImageNet). Nothing was created." >&2
    return 1
  fi
}

exists() {
  # Whether the slice (queued: or its request) exists; never in a dry run.
  if [[ "${DRY_RUN}" == 1 ]]; then
    x gcloud compute tpus tpu-vm describe "${TPU_NAME}" --format='value(name)' \
      --project="${PROJECT}" --zone="${ZONE}"
    return 1
  fi
  gcloud compute tpus tpu-vm describe "${TPU_NAME}" --format='value(name)' \
    --project="${PROJECT}" --zone="${ZONE}" >/dev/null 2>&1 ||
    { [[ "${QUEUED}" == 1 ]] && gcloud compute tpus queued-resources describe \
        "${QUEUED_RESOURCE}" --format='value(name)' --project="${PROJECT}" --zone="${ZONE}" \
        >/dev/null 2>&1; }
}

create() {
  # A slice of the same name may run someone's job: never create over it (and so never
  # delete it when the create fails).
  if exists; then
    echo "tpu_pod.sh: ${TPU_NAME} exists already in ${ZONE}: not creating it (continue with" \
         "'setup' or 'run', or 'delete' it first)." >&2
    return 1
  fi
  ARMED=1  # a slice half-created (e.g. a queued request that failed) is deleted again
  local spot=()
  if [[ "${SPOT}" == 1 ]]; then spot=(--spot); fi
  if [[ "${QUEUED}" == 1 ]]; then
    local valid=()
    if [[ -n "${VALID_FOR}" ]]; then valid=(--valid-until-duration="${VALID_FOR}"); fi
    queued create "${QUEUED_RESOURCE}" --node-id="${TPU_NAME}" \
      --accelerator-type="${ACCELERATOR}" --runtime-version="${RUNTIME}" "${spot[@]}" \
      "${valid[@]}"
    # Waiting in the queue costs nothing; the slice bills from ACTIVE on.
    local state=""
    while [[ "${DRY_RUN}" != 1 ]]; do
      state="$(queued describe "${QUEUED_RESOURCE}" --format='value(state.state)')"
      echo "tpu_pod.sh: queued resource ${QUEUED_RESOURCE}: ${state}"
      case "${state}" in
        ACTIVE) break ;;
        FAILED|SUSPENDING|SUSPENDED) return 1 ;;
      esac
      sleep "${POLL_SECONDS}"
    done
  else
    tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}" \
      "${spot[@]}"
  fi
}

setup() {
  ARMED=1
  # The tracked files of this checkout (with their working-tree contents), to every worker.
  local tmp archive
  tmp="$(mktemp -d)"
  archive="${tmp}/sre2l_code.tar.gz"
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "+ git ls-files -z | tar --null -czf ${archive} -T -"
  else
    git ls-files -z | tar --null -czf "${archive}" -T -
  fi
  tpu scp "${archive}" "${TPU_NAME}:sre2l_code.tar.gz" --worker=all
  rm -rf "${tmp}"
  local dir
  dir="$(printf '%q' "${REMOTE_DIR}")"  # one word for the remote shell, whatever it holds
  tpu ssh "${TPU_NAME}" --worker=all \
    --command="rm -rf ${dir} && mkdir -p ${dir} && tar -xzf sre2l_code.tar.gz -C ${dir}"
  worker all install
  worker all mount
  worker all devices  # every worker at once: JAX joins them into one slice
}

mount_bucket() { worker all mount; }

data() {
  if [[ "${PREPARE_DATA}" != 1 ]]; then return 0; fi
  echo "tpu_pod.sh: preparing ImageNet on worker 0 if needed (single process, hours; the" \
       "whole slice bills meanwhile: a v4-8 slice or any VM with the bucket mounted is cheaper)."
  STARTED=1
  worker 0 data
  wait_or_keep data 0
}

run() {
  local args=(--config="${CONFIG}" --workdir="${WORKDIR}" --distributed
              --config.dataset.data_dir="${MOUNT}/${DATA_PATH}"
              --config.dataset.manual_dir="${MOUNT}/${MANUAL_PATH}")
  if [[ -n "${TEACHER_DIR}" ]]; then args+=(--config.squeeze.teacher_dir="${TEACHER_DIR}"); fi
  if [[ -n "${STAGES}" ]]; then args+=(--stages="${STAGES}"); fi
  if [[ -n "${EXTRA_ARGS}" ]]; then read -r -a extra <<< "${EXTRA_ARGS}"; args+=("${extra[@]}"); fi
  # What the workers do when the job ends: their logs and exit codes to RESULTS, and worker 0
  # deletes the slice once every worker reported (so no laptop has to stay on to do it).
  local delete_slice=1 queued_resource="" count
  if [[ "${KEEP}" == 1 ]]; then delete_slice=0; fi
  if [[ "${QUEUED}" == 1 ]]; then queued_resource="${QUEUED_RESOURCE}"; fi
  count="$(num_workers)"
  JOB_ENV=("RESULTS=${RESULTS}" "NUM_WORKERS=${count}" "MAX_HOURS=${MAX_HOURS}"
           "DELETE_SLICE=${delete_slice}" "TPU_NAME=${TPU_NAME}" "PROJECT=${PROJECT}"
           "ZONE=${ZONE}" "QUEUED_RESOURCE=${queued_resource}")
  # One command per worker: the data mount check, then the detached start (tpu_worker.sh).
  # The workdir is a gs:// URL: every worker writes the bucket directly.
  STARTED=1
  worker all train "${EXPERIMENT}" "${args[@]}"
  JOB_ENV=()
}

num_workers() {
  # The slice's worker count (NUM_WORKERS, else from gcloud; 1 in a dry run).
  local count="${NUM_WORKERS:-}"
  if [[ -z "${count}" && "${DRY_RUN}" == 1 ]]; then
    tpu describe "${TPU_NAME}" --format='value(networkEndpoints.len())' >&2
    count=1
  elif [[ -z "${count}" ]]; then
    count="$(tpu describe "${TPU_NAME}" --format='value(networkEndpoints.len())' || true)"
    if [[ ! "${count}" =~ ^[0-9]+$ ]]; then count=1; fi
  fi
  echo "${count}"
}

slice_state() {
  # READY, PREEMPTED, ... of the slice; empty when there is none.
  tpu describe "${TPU_NAME}" --format='value(state)' 2>/dev/null || true
}

wait_job() {
  # wait_job NAME WORKERS: polls until job NAME runs on none of WORKERS. Returns 0 when it
  # ended well everywhere, 1 when it failed on a worker, 2 when the workers stopped answering,
  # 3 when the slice was preempted or restarted (the job was killed, not failed).
  local name="$1" workers="$2" out running misses=0 state
  while true; do
    if ! out="$(worker "${workers}" state "${name}")"; then
      state="$(slice_state)"
      if [[ -z "${state}" ]]; then
        local ended=0
        ended_in_bucket || ended=$?
        if (( ended == 2 )); then
          echo "tpu_pod.sh: ${TPU_NAME} is gone and no worker reported an end in ${RESULTS}" \
               "(a preempted Spot or queued slice is deleted)." >&2
          return 3
        fi
        return "${ended}"
      fi
      if [[ "${state}" =~ ^(PREEMPTED|TERMINATED|STOPPED)$ ]]; then
        echo "tpu_pod.sh: ${TPU_NAME} is ${state}." >&2
        return 3
      fi
      misses=$((misses + 1))
      if (( misses >= 10 )); then return 2; fi
      echo "tpu_pod.sh: no answer from the workers (${misses}/10); asking again." >&2
      sleep "${POLL_SECONDS}"
      continue
    fi
    if [[ "${DRY_RUN}" == 1 ]]; then echo "${out}"; return 0; fi
    if ! grep -q 'state=' <<< "${out}"; then  # answered, but not what tpu_worker.sh prints
      misses=$((misses + 1))
      if (( misses >= 10 )); then return 2; fi
      sleep "${POLL_SECONDS}"
      continue
    fi
    misses=0
    if grep -q 'state=killed' <<< "${out}"; then
      grep '^sre2l-job' <<< "${out}" || true
      echo "tpu_pod.sh: ${name} was killed on a worker without exiting (a maintenance" \
           "restart or a reboot)." >&2
      return 3
    fi
    running="$(grep -c 'state=running' <<< "${out}" || true)"
    if (( running == 0 )); then break; fi
    echo "tpu_pod.sh: $(date -u '+%H:%M') ${name}: running on ${running} worker(s)"
    sleep "${POLL_SECONDS}"
  done
  grep '^sre2l-job' <<< "${out}" || true
  if grep -q 'state=\(failed\|absent\)' <<< "${out}" || ! grep -q 'state=done' <<< "${out}"; then
    echo "tpu_pod.sh: ${name} failed on a worker (its log: bash launch/tpu_pod.sh logs)." >&2
    return 1
  fi
}

ended_in_bucket() {
  # The slice is gone: did the job end (worker 0 deleted it) or was the slice taken away?
  # Returns 0 when every worker reported exit 0 in RESULTS, 1 when one failed, 2 when none
  # reported (preempted, or deleted by hand).
  local codes
  codes="$(gcloud storage cat "${RESULTS}/worker-*.exit" 2>/dev/null || true)"
  if [[ -z "${codes}" ]]; then return 2; fi
  echo "tpu_pod.sh: ${TPU_NAME} deleted itself after the job; exit codes per worker:" \
       ${codes}
  if grep -qv '^0$' <<< "${codes}"; then
    echo "tpu_pod.sh: ${EXPERIMENT} failed on a worker (its log: bash launch/tpu_pod.sh logs)." >&2
    return 1
  fi
}

wait_or_keep() {
  # wait_job, except that unreachable workers stop the script without deleting anything.
  local rc=0
  wait_job "$@" || rc=$?
  if (( rc == 2 )); then
    ARMED=0
    echo "tpu_pod.sh: the workers of ${TPU_NAME} do not answer; nothing was deleted and it may" \
         "still be BILLING. Look: bash launch/tpu_pod.sh status. Stop: bash launch/tpu_pod.sh" \
         "delete." >&2
    exit 1
  fi
  return "${rc}"
}

wait_run() {
  ARMED=0  # Ctrl-C here leaves the run going
  trap 'echo; echo "tpu_pod.sh: stopped waiting; ${EXPERIMENT} keeps running on ${TPU_NAME}," \
"which keeps BILLING. Wait again: bash launch/tpu_pod.sh wait. Stop: bash launch/tpu_pod.sh" \
"delete." >&2; exit 130' INT
  local rc resumes=0
  while true; do
    rc=0
    wait_or_keep "${EXPERIMENT}" all || rc=$?
    if (( rc != 3 )); then break; fi
    if [[ "${RESUME}" != 1 ]]; then
      echo "tpu_pod.sh: every stage resumes from ${WORKDIR}: RESUME=1 bash launch/tpu_pod.sh" \
           "resume wait (recreates or remounts the slice and runs again), or delete it:" \
           "bash launch/tpu_pod.sh delete (a restarted slice is up and BILLING)." >&2
      exit 1
    fi
    if (( resumes >= MAX_RESUMES )); then
      echo "tpu_pod.sh: ${MAX_RESUMES} resumes done (MAX_RESUMES): giving up." >&2
      exit 1
    fi
    resumes=$((resumes + 1))
    echo "tpu_pod.sh: resuming ${EXPERIMENT} (${resumes}/${MAX_RESUMES})." >&2
    resume
  done
  if (( rc != 0 )); then
    ARMED=1  # a failed run: logs back, then the slice goes (unless KEEP=1)
    return 1
  fi
  trap 'exit 130' INT
  copy_logs
}

resume() {
  # A restarted slice (READY, its job killed) is remounted; a preempted or vanished one is
  # recreated and set up. Then `run`: every stage resumes from its checkpoint in WORKDIR.
  local state
  state="$(slice_state)"
  if [[ "${state}" == READY ]]; then
    worker all mount
  else
    if [[ -n "${state}" ]] || exists; then delete; fi
    create
    setup
  fi
  run
  ARMED=0
}

status() {
  # What can be known: the request, the slice, then each worker (a missing one is said so).
  if [[ "${QUEUED}" == 1 ]]; then
    queued describe "${QUEUED_RESOURCE}" --format='value(state.state)' ||
      echo "tpu_pod.sh: no queued resource ${QUEUED_RESOURCE}"
  fi
  tpu describe "${TPU_NAME}" --format='value(state,health,acceleratorType)' ||
    { echo "tpu_pod.sh: no slice ${TPU_NAME} in ${ZONE}"; return 0; }
  worker all status "${EXPERIMENT}" || echo "tpu_pod.sh: not every worker answered"
}

copy_logs() {
  # Every worker's job log to LOG_DIR/worker-<i>.log: from RESULTS, where each worker copies
  # it when the job ends (a slice that deleted itself left them there), else from the workers
  # (a job still running). Never fails: a missing log must not stop the delete that follows.
  local count i
  x mkdir -p "${LOG_DIR}"
  if [[ "${DRY_RUN}" != 1 ]] &&
      gcloud storage cp "${RESULTS}/worker-*.log" "${LOG_DIR}/" >/dev/null 2>&1; then
    echo "tpu_pod.sh: logs in ${LOG_DIR}/ (from ${RESULTS})"
    return 0
  fi
  count="$(num_workers)"
  for ((i = 0; i < count; i++)); do
    tpu scp "${TPU_NAME}:sre2l_jobs/${EXPERIMENT}/log" "${LOG_DIR}/worker-${i}.log" \
      --worker="${i}" || echo "tpu_pod.sh: no log from worker ${i}" >&2
  done
  echo "tpu_pod.sh: logs in ${LOG_DIR}/"
}

delete() {
  if [[ "${DRY_RUN}" != 1 ]] && ! exists; then
    ARMED=0
    echo "tpu_pod.sh: ${TPU_NAME} is deleted already."
    return 0
  fi
  if [[ "${QUEUED}" == 1 ]]; then
    queued delete "${QUEUED_RESOURCE}" --force --quiet  # --force: its slice first
  else
    tpu delete "${TPU_NAME}" --quiet
  fi
  ARMED=0
  echo "tpu_pod.sh: deleted ${TPU_NAME}."
}

all() {
  check
  create
  setup
  data
  run
  wait_run
  if [[ "${KEEP}" == 1 ]]; then
    echo "tpu_pod.sh: KEEP=1: ${TPU_NAME} is kept and still BILLING; delete it with" \
         "bash launch/tpu_pod.sh delete."
  else
    delete
  fi
}

STEPS=("$@")
if (( ${#STEPS[@]} == 0 )); then STEPS=(all); fi
for step in "${STEPS[@]}"; do
  case "${step}" in
    check|create|setup|data|run|resume|status|delete|all) ;;
    mount|wait|logs) ;;
    *) echo "usage: $0 [check|create|setup|mount|data|run|resume|wait|status|logs|delete|all]..." \
         >&2
       exit 2 ;;
  esac
done
for step in "${STEPS[@]}"; do
  case "${step}" in
    mount) mount_bucket ;;
    wait) wait_run ;;
    logs) copy_logs ;;
    *) "${step}" ;;
  esac
  # A started run is not torn down by later steps.
  if [[ "${step}" == run || "${step}" == resume ]]; then ARMED=0; fi
done
