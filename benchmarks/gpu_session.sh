#!/usr/bin/env bash
# One lent-GPU session in one command, in priority order, each stage under its own timeout, results written
# after every stage (a loan is short: whatever finished is kept even if a later stage runs out of time).
#
#   bash benchmarks/gpu_session.sh                 # the default plan on one GPU (<= 6 min on an H100)
#   bash benchmarks/gpu_session.sh "tests:120|pretrain:base:240"
#   bash benchmarks/gpu_session.sh --dry-run       # the same plan at tiny size on the CPU (CI runs this)
#
# A stage is NAME[:SIZE]:SECONDS. NAME is `tests` (the gpu-marked tests), `kstat` (static kernel report) or a
# benchmark suite (kernels, attention, pretrain, capfilt, data); `data` runs only when DALI imports.
# On the GPU machine (torch, triton, timm, tokenizers, transformers; no network) fastblip is installed with
# --no-deps into /tmp/site, plus any wheels carried in .whl/ (`bash benchmarks/gpu_wheels.sh fetch` prepares them
# here and prints which files each call carries; DALI's parts are joined and checked first).
# Everything lands in $OUT: log.txt, results/<suite>_<size>_<device>_<date>.{json,md}, tests.xml, summary.md.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
# ~6 minutes of stages (+ ~20 s of install): leaves a rerun's worth of a 15-minute loan
PLAN=${1:-"tests:60|kernels:base:45|pretrain:base:150|capfilt:large:60|data:large:25|attention:base:15"}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
T0=$(date +%s)
log() { echo "[gpu_session +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; export TRITON_INTERPRET=1  # the project is installed (make install); Triton rows interpret
else
  DEVICE=cuda
  # wheels over one call's carry limit arrive in parts (benchmarks/gpu_wheels.sh): join those complete and intact
  bash benchmarks/gpu_wheels.sh join 2>&1 | tee -a "$OUT/log.txt"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  # `python -m` puts the repo root first on sys.path, where fastblip/ has no kernels/: link it for this copy
  [ -e fastblip/kernels ] || ln -s ../kernels fastblip/kernels
  python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/log.txt"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/log.txt"

echo "| stage | exit | seconds |" > "$OUT/summary.md"; echo "|---|---|---|" >> "$OUT/summary.md"
IFS='|' read -ra STAGES <<< "$PLAN"
for stage in "${STAGES[@]}"; do
  IFS=':' read -ra f <<< "$stage"
  name=${f[0]}
  if [ "${#f[@]}" -ge 3 ]; then size=${f[1]}; secs=${f[2]}; else size=""; secs=${f[1]:-120}; fi
  [ "$DRY" = 1 ] && size=tiny && secs=$(( secs * 3 ))  # CPU timings of the tiny plan, under a CI's load
  s0=$(date +%s); log "stage $stage (size ${size:-n/a}, timeout ${secs}s)"
  case "$name" in
    tests)
      # a test module needing a package the GPU machine lacks (selenium, av, ...) must not stop the others
      timeout -k 5 "$secs" python3 -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors \
        --junitxml="$OUT/tests.xml" 2>&1 | tee -a "$OUT/log.txt" | tail -15
      rc=${PIPESTATUS[0]} ;;
    data)
      if ! python3 -c "import nvidia.dali" 2>/dev/null; then log "data: DALI not importable, stage skipped"; rc=0
      else
        timeout -k 5 "$secs" python3 -m benchmarks data --device "$DEVICE" --size "$size" --out "$OUT/results" \
          2>&1 | tee -a "$OUT/log.txt" | tail -12
        rc=${PIPESTATUS[0]}
      fi ;;
    *)
      timeout -k 5 "$secs" python3 -m benchmarks "$name" --device "$DEVICE" --size "$size" --out "$OUT/results" \
        2>&1 | tee -a "$OUT/log.txt" | tail -12
      rc=${PIPESTATUS[0]} ;;
  esac
  [ "$rc" = 124 ] && log "stage $stage ran out of time (${secs}s); the next stage runs"
  echo "| $stage | $rc | $(( $(date +%s) - s0 )) |" >> "$OUT/summary.md"
  [ "$rc" = 0 ] || FAILED="${FAILED:-}$stage "
done
log "done in $(( $(date +%s) - T0 ))s"
cat "$OUT/summary.md"
if [ "$DRY" = 1 ] && [ -n "${FAILED:-}" ]; then  # the dry run keeps the plan from rotting: a failed stage fails CI
  echo "gpu_session --dry-run: failed stages: $FAILED" >&2; exit 1
fi
exit 0
