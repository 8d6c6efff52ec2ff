#!/usr/bin/env bash
# One lent-GPU session in one command: install fastblip (--no-deps) into /tmp/site with the carried wheels,
# run the gpu-marked tests, then the benchmark suites at the given sizes, copying results to $OUT.
#   usage: bash benchmarks/gpu_session.sh "tests|kernels:base|pretrain:base|pretrain:large|capfilt:base|data:large|..."
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# `python -m` puts the repo root first on sys.path, where fastblip/ has no kernels/: link it for this copy
[ -e fastblip/kernels ] || ln -s ../kernels fastblip/kernels
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/log.txt"
IFS='|' read -ra STEPS <<< "${1:-tests}"
for step in "${STEPS[@]}"; do
  case "$step" in
    tests)  python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee -a "$OUT/log.txt" | tail -40 ;;
    tests:*) python3 -m pytest -q -x -p no:cacheprovider ${step#tests:} 2>&1 | tee -a "$OUT/log.txt" | tail -30 ;;
    *:*)   suite=${step%%:*}; size=${step##*:}
           python3 -m benchmarks "$suite" --device cuda --size "$size" 2>&1 | tee -a "$OUT/log.txt" | tail -25 ;;
  esac
done
tar czf "$OUT/results.tgz" benchmarks/results
ls -la "$OUT"
