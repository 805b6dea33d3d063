#!/usr/bin/env bash
# The GPU check: what in cxr only a CUDA GPU exercises, in one run of about 8 minutes, so
# that it fits the 15 minutes of device time a GPU session gets (start-up included):
#   setup  the carried wheels installed into /tmp/site (the GPU machine has no network);
#   info   nvidia-smi; torch, CUDA and the GPU's name;
#   env    every module of cxr imported, the compressed DICOM decoded (the carried wheels);
#   tests  pytest -m gpu (tests/test_gpu.py): fp16 + GradScaler, bf16, channels_last,
#          torchrun + NCCL, evaluate / predict / explain on CUDA against the CPU, and last
#          torch.compile (its first compilation is the longest test);
#   demo   cxr demo --device cuda: test AUROC and pointing game on the GPU settings, with
#          per-epoch times (demo.json) to size the GPU demo from measurements;
#   bench  benchmarks/gpu.py: training images/s, batch 128 and 256, fp32 / AMP, NCHW / NHWC,
#          in memory and through the cache pipeline.
# The demo runs before the benchmark: its result only exists once it ends, while the
# benchmark prints each row as it is measured, so when time runs short the benchmark is the
# one cut. Each step is time-boxed (timeout) and a failing one does not stop the others;
# summary.txt records each step's status. Everything goes to $OUT (default ./gpu-check-out),
# at most 8 files, as the device tool returns no more.
#
#   bash benchmarks/gpu_check.sh            on the GPU machine, with .whl/ and .gpu-data/
#                                           carried (made by benchmarks/gpu_prepare.sh)
#   bash benchmarks/gpu_check.sh --dry-run  anywhere: the same steps on the CPU with tiny
#                                           sizes and the current Python environment (CI
#                                           runs it, so that this script cannot rot)
#
# Exit status 0 when every step passed or was skipped for a stated reason, else 1.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2
    exit 2
    ;;
esac

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Run folders, the demo's data and pytest's temporary files stay out of $OUT, which returns
# 8 files at most.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
SUMMARY=$OUT/summary.txt
# Unbuffered, so that a step stopped by its time limit has written all it printed; Agg, as
# there is no display; CXR_OFFLINE: nothing may be downloaded; wide lines for rich's tables.
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg CXR_OFFLINE=1 COLUMNS=160
export TMPDIR=$WORK

if ((DRY)); then
  # Generous: it passes in 1-2 minutes on 2 cores, but CI's machine may be busy.
  BUDGET=${GPU_CHECK_BUDGET_S:-480}
  DEVICE=cpu
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  SHARED=../shared/data
  [ -d "$SHARED/nih/images" ] || SHARED=.gpu-data
else
  # The device call's timeout_s is 540: 30 s are left for the last step's kill and the report.
  BUDGET=${GPU_CHECK_BUDGET_S:-510}
  DEVICE=cuda
  SHARED=.gpu-data
fi
NIH=$SHARED/nih
DICOM=$(ls "$SHARED"/misc/*.dcm 2>/dev/null | head -n 1 || true)

FAILED=0
printf '%-8s %-12s %6s  %s\n' step status seconds note >"$SUMMARY"

record() { # record STEP STATUS SECONDS NOTE
  printf '%-8s %-12s %6s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
  case "$2" in ok | skipped) ;; *) FAILED=1 ;; esac
}

# step NAME CAP LOG COMMAND...: COMMAND for at most CAP seconds (less when the whole check's
# BUDGET is nearly spent), its output appended to $OUT/LOG and shown; its status recorded.
step() {
  local name=$1 cap=$2 log=$OUT/$3
  shift 3
  local left=$((BUDGET - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    record "$name" skipped 0 "the check's ${BUDGET}s budget is spent"
    return 0
  fi
  local started=$SECONDS rc=0
  echo "=== $name (at most ${limit}s): $*" | tee -a "$log"
  # timeout signals the whole process group (DataLoader workers, torchrun's children too).
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
  local status=ok
  case $rc in
    0) ;;
    124 | 137) status=timeout ;;
    *) status="failed($rc)" ;;
  esac
  record "$name" "$status" $((SECONDS - started)) "$(basename "$log")"
}

# ---------------------------------------------------------------------------- setup
if ((DRY)); then
  record setup skipped 0 "dry run: the current environment has every package"
elif compgen -G ".whl/*.whl" >/dev/null; then
  # The documented install (no index, no dependency resolution: .whl/ holds each needed
  # wheel once); if it fails as a whole, wheel by wheel, so that one bad wheel costs only
  # what needs it.
  started=$SECONDS
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$OUT/setup.log" 2>&1; then
    bad=""
    for wheel in .whl/*.whl; do
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheel" >>"$OUT/setup.log" 2>&1 || bad="$bad $(basename "$wheel")"
    done
    record setup failed $((SECONDS - started)) "not installed:$bad"
  else
    record setup ok $((SECONDS - started)) "$(ls .whl/*.whl | wc -l) wheels into /tmp/site"
  fi
  export PYTHONPATH=/tmp/site:$PWD/src
else
  record setup failed 0 "no .whl/: run benchmarks/gpu_prepare.sh here and carry .whl"
  export PYTHONPATH=$PWD/src
fi

# ---------------------------------------------------------------------------- info
if command -v nvidia-smi >/dev/null 2>&1; then
  step info 30 setup.log nvidia-smi
else
  record info skipped 0 "no nvidia-smi on this machine"
fi
step versions 30 setup.log "$PY" -c "import torch; print('torch', torch.__version__, \
'CUDA', torch.version.cuda, 'device', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'none (CPU only)')"
env_args=(--site /tmp/site)
[ -n "$DICOM" ] && env_args+=(--dicom "$DICOM")
((DRY)) || env_args+=(--require-cuda)
step env 60 setup.log "$PY" benchmarks/gpu_check.py env "${env_args[@]}"

# ---------------------------------------------------------------------------- tests
# CXR_TEST_DEVICE=cuda makes a machine without CUDA an error, not a skip.
step tests 200 tests.log env CXR_TEST_DEVICE=$DEVICE CXR_GPU_FACTS="$OUT/facts.json" \
  "$PY" -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider --durations=0 \
  --basetemp="$WORK/pytest"

# ---------------------------------------------------------------------------- demo
if ((DRY)); then
  step demo 150 demo.log "$PY" -m cxr demo --quick --device cpu --out "$WORK/demo"
else
  # The rest of the budget but what the summary and a short benchmark need.
  step demo $((BUDGET - SECONDS - 40)) demo.log \
    "$PY" -m cxr demo --device cuda --out "$WORK/demo"
fi
# Whatever the demo got to (a stopped one still logged its epochs).
step results 30 demo.log "$PY" benchmarks/gpu_check.py demo-summary "$WORK/demo" \
  "$OUT/demo.json"

# ---------------------------------------------------------------------------- bench
if [ ! -f "$NIH/images.csv" ]; then
  record bench failed 0 "no $NIH/images.csv: run benchmarks/gpu_prepare.sh, carry .gpu-data"
elif ((DRY)); then
  step bench 150 bench.log "$PY" benchmarks/gpu.py --device cpu --nih "$NIH" --batches 4 \
    --steps 1 --image-size 64 --images 4 --workers 0 --no-compile --json "$OUT/bench.json"
else
  # torch.compile rows are left out: each compiles DenseNet121 anew (about a minute each);
  # tests/test_gpu.py compiles it once and records its step time.
  step bench 130 bench.log "$PY" benchmarks/gpu.py --nih "$NIH" --batches 128 256 \
    --steps 10 --workers 8 --no-compile --json "$OUT/bench.json"
fi

# ---------------------------------------------------------------------------- report
# The device tool returns the output's last 12,000 characters: the essentials come last.
echo
echo "=== GPU check $( ((DRY)) && echo "(DRY RUN on the CPU)") in ${SECONDS}s; files in $OUT:"
ls "$OUT"
echo "--- results"
grep -hE "mean test AUROC|pointing game" "$OUT/demo.log" 2>/dev/null || true
grep -hE "^\|" "$OUT/bench.log" 2>/dev/null || true
grep -hE "^(PASSED|FAILED|ERROR|SKIPPED)|^tests/test_gpu.py::.* (PASSED|FAILED|ERROR|SKIPPED)| passed| failed" \
  "$OUT/tests.log" 2>/dev/null | tail -n 15 || true
echo "--- summary ($SUMMARY)"
cat "$SUMMARY"
exit "$FAILED"
