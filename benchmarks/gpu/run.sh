#!/usr/bin/env bash
# qframe on an NVIDIA GPU in one call: build the extensions for the GPU, check every kernel backend
# against the reference there, time the GEMMs, run the desktop QAT pipeline with its measure stage
# (CUDA-event latency, NVML energy net of idle power) and profile the converted models.
#
#   OUT=/tmp/gpu benchmarks/gpu/run.sh          # run from the repository root; results under $OUT
#
# Uses the python3 that holds a CUDA torch (installs qframe into it with
# `pip install --no-build-isolation --no-deps -e .`). Python packages that environment lacks may be
# put as wheels into .whl/ beside the checkout (`make gpu-wheels`: Hydra and OmegaConf at the lock's
# versions): they are installed into /tmp/site first. Every step
# has its own time limit, so one that overruns costs its own result only; the summary comes last.
# Files under $OUT: summary.md, gemm_<gpu>.md/.json, report.md of the pipeline run,
# convert_profile.md, logs.tgz (every step's log, the run's metrics.json and report.json) and
# ext.tgz (the built extensions: unpacked into .gpu-ext/, a later call on the same image skips the
# build). STEPS="gemm pipeline" runs only those steps (the build always runs or is reused).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/qframe-gpu}
PY=${PYTHON:-python3}
LOGS=/tmp/qframe-gpu-logs
RUN_DIR=/tmp/qframe-gpu-run
mkdir -p "$OUT" "$LOGS"
rm -rf "$RUN_DIR"
export PYTHONUNBUFFERED=1
: >"$LOGS/steps.txt"

STEPS=${STEPS:-environment build dispatch tests-gpu gemm pipeline convert-profile}
DEADLINE=$(($(date +%s) + ${BUDGET_S:-560}))  # the whole run's time; each step gets at most what is left

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, record the outcome
  local name=$1 limit=$2 start rc left
  shift 2
  case " $STEPS wheels build " in *" $name "*) ;; *) return 0 ;; esac
  left=$((DEADLINE - $(date +%s) - 10))
  if [ "$left" -lt 20 ]; then
    printf '| %s | skipped (out of time) | 0s |\n' "$name" | tee -a "$LOGS/steps.txt"
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  start=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  printf '| %s | %s | %ss |\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))")" \
    "$(($(date +%s) - start))" | tee -a "$LOGS/steps.txt"
  summarize
  return $rc
}

summarize() {  # after every step, so that a run stopped from outside still leaves its results
  {
    echo "# qframe GPU run"
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    cat "$LOGS/steps.txt"
    echo
    echo '```'
    cat "$LOGS/dispatch.log" 2>/dev/null
    grep -E "passed|failed|error|skipped" "$LOGS/tests-gpu.log" 2>/dev/null | tail -3
    echo '```'
    echo
    sed -n '/## Acceptance/,$p' "$OUT"/gemm_*.md 2>/dev/null
    echo
    sed -n '/^| method/,/^$/p' "$RUN_DIR/report.md" 2>/dev/null | cut -c1-400
    grep -E "^Energy:" "$RUN_DIR/report.md" 2>/dev/null
  } >"$OUT/summary.md"
  cp "$RUN_DIR/report.md" "$OUT/" 2>/dev/null
  cp -r "$RUN_DIR"/*.log "$RUN_DIR"/*.json "$RUN_DIR"/*.md "$RUN_DIR"/.hydra "$LOGS/" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
}

if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step environment 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; nvcc --version | tail -2"

# the extensions: CPU kernels and the CUDA kernels for this GPU (sm_90 on an H100 / H200); setup.py
# finds the toolkit the nvcc on PATH runs from (a wrapper at /usr/local/bin/nvcc included)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# extensions built earlier (an earlier call, or elsewhere for the same python, torch and CUDA) are used
# where both import here; otherwise they are built
prebuilt=no
if compgen -G ".gpu-ext/_C*.so" >/dev/null; then
  cp .gpu-ext/_C*.so qframe/
  if "$PY" -c "import torch, qframe._C, qframe._C_cuda" >"$LOGS/prebuilt.log" 2>&1; then
    prebuilt=yes
  else
    (cd .gpu-ext && for f in _C*.so; do rm -f "../qframe/$f"; done)
  fi
fi
if [ $prebuilt = yes ]; then
  QFRAME_NO_EXTENSIONS=1 step build 200 "$PY" -m pip install -v --no-build-isolation --no-deps -e .
else
  step build 200 "$PY" -m pip install -v --no-build-isolation --no-deps -e .
fi
tar czf "$OUT/ext.tgz" -C qframe $(cd qframe && ls _C*.so 2>/dev/null) 2>/dev/null || rm -f "$OUT/ext.tgz"
step dispatch 60 "$PY" -c "
import torch, qframe.kernels as qk
for dev in ('cuda', 'cpu'):
    for backend, (ok, why) in qk.dispatch.table(dev).items():
        print(f'{dev:5s} {backend:10s} {\"yes\" if ok else \"no \"} {why}')
"

# every backend against the reference on the GPU (CUDA extension, Triton autotuned and fixed tiles,
# the dispatch rules, CUDA-event timing)
step tests-gpu 140 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/measure -rs

step gemm 200 "$PY" benchmarks/gemm.py --device cuda --out "$OUT"

# the pipeline on the GPU: FP32 training, PTQ, QAT, export, and the measure stage at batch 1 and 64
step pipeline 170 "$PY" -m qframe +experiment=qat_desktop "measure.batch_sizes=[1,64]" hydra.run.dir="$RUN_DIR"
step convert-profile 120 "$PY" benchmarks/gpu/convert_profile.py --out "$OUT"

cat "$OUT/summary.md"
