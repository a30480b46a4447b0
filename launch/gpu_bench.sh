#!/usr/bin/env bash
# Recover, squeeze and student-training throughput of ResNet-18 at 224x224 on one NVIDIA GPU:
# JAX in fp32 and bf16 beside the PyTorch reference of each step (benchmarks/torch_reference.py)
# on the same card, models and batch, then one full-size round of the real recover stage.
# Writes one JSON per run and summary.json to $OUT (default runs/gpu_bench), the runs' output
# to $OUT/gpu_bench.log, and prints a table with every JAX / PyTorch ratio and the projected
# ImageNet-1K IPC50 recover time (50,000 images x 4,000 iterations / throughput).
#
# Run from the repository root on the GPU machine:   bash launch/gpu_bench.sh
# What it needs there: python3 with CUDA JAX (jax and its CUDA plugin, e.g.
# `pip install "jax[cuda12]"`) and CUDA PyTorch, plus this package's pure-Python
# dependencies (flax, optax, orbax-checkpoint, ml_collections, ...; `pip install -e .` gives
# them). TensorFlow and tensorflow_datasets are not needed: where they are missing, import-only
# stand-ins are put first on the path (the benchmark reads no dataset and writes no summary).
# What it installs: nothing from the network. On a machine without network, bring missing
# pure-Python packages as wheels in .whl/ (made on a machine with network by
#   bash launch/gpu_bench.sh --fetch-wheels        # -> .whl/ml_collections-*.whl
# the usual missing one); wheels found in .whl/ are installed into /tmp/site for this run.
# recover_round (benchmarks/recover_round.py: planned vs measured peak memory, throughput)
# runs one round of the stage; BENCH_ROUND=0 skips it, ROUND_ITERATIONS=20.
# Settings (environment): BENCH_GROUPS (4 groups of 100 images), BENCH_STEPS (10),
# BENCH_REPEATS (5), BENCH_BUDGET_S (540, the whole script), SQUEEZE_BATCH (256),
# STUDENT_BATCH (256); BENCH_ARGS replaces the model/size flags and BENCH_ALLOW_CPU=1 skips the
# GPU check (a dry run of this script on a CPU with tiny settings).
set -u

PY=${PYTHON:-python3}
if [[ ${1:-} == --fetch-wheels ]]; then
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
fi

START=$SECONDS
BUDGET_S=${BENCH_BUDGET_S:-540}
GROUPS_N=${BENCH_GROUPS:-4}
STEPS=${BENCH_STEPS:-10}
REPEATS=${BENCH_REPEATS:-5}
SQUEEZE_BATCH=${SQUEEZE_BATCH:-256}
STUDENT_BATCH=${STUDENT_BATCH:-256}
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
LOG=$OUT/gpu_bench.log
: >"$LOG"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

# 1. Wheels brought in .whl/ (see the header).
if compgen -G '.whl/*.whl' >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/*.whl failed"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. CUDA JAX and CUDA torch.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! "$PY" -c "import jax; print('jax', jax.__version__, jax.devices()); \
assert jax.default_backend() == 'gpu' or '${BENCH_ALLOW_CPU:-0}' == '1', 'no GPU backend'"
then
  cat <<'EOF'
CUDA JAX is missing or sees no GPU. Install it (pip install "jax[cuda12]", or the CUDA 13
plugin for a CUDA 13 driver); without network, download matching wheels elsewhere into .whl/
(pip download --no-deps --only-binary=:all: --python-version <this python> --platform
manylinux_2_27_x86_64 -d .whl jax==V jaxlib==V jax-cuda12-plugin==V jax-cuda12-pjrt==V) and
run again.
EOF
  exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# 3. The package must import. clu's metric_writers imports TensorFlow and the data builders
# import tensorflow_datasets; a GPU machine often has neither, and the benchmark uses neither
# (no summaries, no datasets). Where they fail to import, import-only stand-ins go first on
# the path; any use of them raises.
SHIM=/tmp/sre2l_bench_shim
rm -rf "$SHIM"
if ! "$PY" -c "import clu.metric_writers, clu.periodic_actions" 2>/dev/null; then
  mkdir -p "$SHIM/clu"
  echo '"""Import-only stand-in for clu (launch/gpu_bench.sh)."""' >"$SHIM/clu/__init__.py"
  cat >"$SHIM/clu/metric_writers.py" <<'EOF'
"""Import-only stand-in (launch/gpu_bench.sh): the benchmark writes no summaries."""


class MetricWriter:
  def __init__(self, *args, **kwargs):
    raise RuntimeError('clu is a stand-in in launch/gpu_bench.sh: no summaries here.')


def create_default_writer(*args, **kwargs):
  raise RuntimeError('clu is a stand-in in launch/gpu_bench.sh: no summaries here.')
EOF
  cat >"$SHIM/clu/periodic_actions.py" <<'EOF'
"""Import-only stand-in (launch/gpu_bench.sh): the benchmark reports no progress."""


class ReportProgress:
  def __init__(self, *args, **kwargs):
    raise RuntimeError('clu is a stand-in in launch/gpu_bench.sh: no progress reports here.')
EOF
  echo "stand-in: clu (no TensorFlow here)"
fi
if ! "$PY" -c "import tensorflow_datasets" 2>/dev/null; then
  mkdir -p "$SHIM/tensorflow_datasets"
  cat >"$SHIM/tensorflow_datasets/__init__.py" <<'EOF'
"""Import-only stand-in (launch/gpu_bench.sh): names resolve, using them raises."""
import types


class _Absent:
  """Any tfds class or call: may be subclassed, called, named; its attributes raise."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __getattr__(self, name):
    raise AttributeError(f'tensorflow_datasets is a stand-in in launch/gpu_bench.sh ({name}).')


class _Namespace(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _Absent


def __getattr__(name):
  if name.startswith('__'):
    raise AttributeError(name)
  return _Namespace(f'tensorflow_datasets.{name}')
EOF
  echo "stand-in: tensorflow_datasets"
fi
[[ -d $SHIM ]] && export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import benchmarks.bench, benchmarks.torch_reference"; then
  cat <<'EOF'
sre2l_jax does not import (traceback above). Install the missing package (pip install -e .
installs them all); without network, a pure-Python one (ml_collections is the usual one) can
come as a wheel in .whl/: `bash launch/gpu_bench.sh --fetch-wheels` on a machine with network
(or pip download the named package the same way), copy .whl/ over, and run again.
EOF
  exit 3
fi

# 4. Peak dense TFLOP/s of the card (datasheet): bf16, and TF32 for fp32 runs (XLA and cuDNN
# run fp32 convolutions in TF32 by default on Hopper). Unknown cards: no compute floor.
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
case "$NAME" in
  *H200*|*"H100 80GB HBM3"*|*H100*SXM*) PEAK_BF16=989.4; PEAK_TF32=494.7 ;;
  *"H100 NVL"*) PEAK_BF16=835.5; PEAK_TF32=417.8 ;;
  *"H100 PCIe"*|*H100*) PEAK_BF16=756.5; PEAK_TF32=378.0 ;;
  *) PEAK_BF16=0; PEAK_TF32=0 ;;
esac
echo "card: ${NAME:-unknown}; peak bf16 ${PEAK_BF16} TFLOP/s, tf32 ${PEAK_TF32} TFLOP/s"

COMMON=(--model=resnet18 --width=64 --stem=imagenet --image_size=224 --channels=3
        --num_classes=1000 --group_size=100 "--groups=$GROUPS_N" "--steps=$STEPS"
        "--repeats=$REPEATS" --warmup=2)
if [[ -n ${BENCH_ARGS:-} ]]; then
  read -ra COMMON <<<"$BENCH_ARGS"
fi
DONE=()

# run NAME CAP_S [VAR=VALUE...] -- ARGS...: one measurement in its own process, under
# `timeout`, capped by what is left of the budget.
run() {
  local name=$1 cap=$2; shift 2
  local env=()
  while [[ $1 != -- ]]; do env+=("$1"); shift; done
  shift
  local left=$((BUDGET_S - (SECONDS - START) - 15))
  ((cap > left)) && cap=$left
  if ((cap < 30)); then
    echo "== $name: skipped, $left s left of the ${BUDGET_S} s budget"
    return
  fi
  echo "== $name (limit ${cap} s)"
  local t0=$SECONDS
  echo "===== $name: ${env[*]} $* " >>"$LOG"
  rm -f "$OUT/$name.json"
  env ${env[@]+"${env[@]}"} timeout -k 10 "$cap" "$PY" -m benchmarks.bench "${COMMON[@]}" "$@" \
    --label="$name" --json="$OUT/$name.json" >"$OUT/.run.log" 2>&1
  local rc=$?
  cat "$OUT/.run.log" >>"$LOG"
  # The JSON is written once every measurement is done: it counts even if the exit hung.
  if [[ -f $OUT/$name.json ]]; then
    grep -E "^$name|recover_jax" "$OUT/.run.log"
    echo "   done in $((SECONDS - t0)) s$( ((rc)) && echo ", but the exit returned rc=$rc")"
    DONE+=("$OUT/$name.json")
  else
    echo "   failed: rc=$rc (124: timed out) after $((SECONDS - t0)) s; last lines:"
    tail -n 15 "$OUT/.run.log" | sed 's/^/   | /'
  fi
  rm -f "$OUT/.run.log"
}

# Most important first: a run that does not fit the budget is skipped.
run jax_fp32 150 -- --what=recover --dtype=float32 "--peak_tflops=$PEAK_TF32"
run torch_fp32 90 JAX_PLATFORMS=cpu -- --what=recover --reference=torch --skip_jax \
  --torch_amp=none
run jax_bf16 130 -- --what=recover --dtype=bfloat16 "--peak_tflops=$PEAK_BF16"

# One full-size round of the real recover stage (configs/in1k_ipc50.py, a random teacher):
# the dry-run plan for this card's memory (groups per round, XLA's predicted peak) beside the
# measured peak memory and throughput. JAX may use 90% of the card here (75% by default).
LEFT=$((BUDGET_S - (SECONDS - START) - 15)); CAP=$((LEFT < 240 ? LEFT : 240))
if [[ ${BENCH_ROUND:-1} == 1 ]] && ((CAP >= 60)); then
  echo "== recover_round (limit ${CAP} s)"
  echo "===== recover_round" >>"$LOG"
  XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9} timeout -k 10 "$CAP" \
    "$PY" -m benchmarks.recover_round --workdir=/tmp/recover_round \
    "--iterations=${ROUND_ITERATIONS:-20}" "--json=$OUT/recover_round.json" >>"$LOG" 2>&1 \
    && grep '^recover round on' "$LOG" | tail -n 1 \
    || { echo "   failed (rc $?); last lines:"; tail -n 15 "$LOG" | sed 's/^/   | /'; }
fi
run torch_amp 90 JAX_PLATFORMS=cpu -- --what=recover --reference=torch --skip_jax \
  --torch_amp=bf16
run squeeze_fp32 130 -- --what=squeeze --dtype=float32 "--batch_size=$SQUEEZE_BATCH" \
  "--peak_tflops=$PEAK_TF32"
# Squeeze and student training beside their PyTorch twins (the student step: views, the
# teacher's forward, KL, AdamW; the same teacher weights on both sides).
run torch_squeeze 90 JAX_PLATFORMS=cpu -- --what=squeeze --reference=torch --skip_jax \
  "--batch_size=$SQUEEZE_BATCH"
run student_fp32 120 -- --what=student --dtype=float32 "--batch_size=$STUDENT_BATCH" \
  "--peak_tflops=$PEAK_TF32"
run torch_student 90 JAX_PLATFORMS=cpu -- --what=student --reference=torch --skip_jax \
  "--batch_size=$STUDENT_BATCH"
run torch_fp32_wgrad 70 JAX_PLATFORMS=cpu -- --what=recover --reference=torch --skip_jax \
  --torch_amp=none --torch_weight_grads

echo
echo "== summary ($((SECONDS - START)) s so far)"
if ((${#DONE[@]})); then
  JAX_PLATFORMS=cpu "$PY" -m benchmarks.bench \
    "--summarize=$(IFS=,; echo "${DONE[*]}")" "--summary_json=$OUT/summary.json"
else
  echo "no run finished; see $LOG"
fi
echo "total $((SECONDS - START)) s"
