#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, made to travel: that machine has torch, triton, timm, tokenizers and
# transformers on Python 3.12 and no network, and one call carries at most 64 MiB (working tree included, ~1.5 MB).
#
#   bash benchmarks/gpu_wheels.sh fetch [--no-dali]   # here: fill .whl/ (git-ignored), print the carry plan
#   bash benchmarks/gpu_wheels.sh split FILE          # here: cut FILE into .whl/NAME.part-aa, -ab, ... + manifest
#   bash benchmarks/gpu_wheels.sh join                # there (gpu_session.sh calls it): rebuild every split wheel
#                                                     # whose parts all arrived and match the manifest's sha256
#
# Small wheels (webdataset, braceexpand, pytest and its two deps: ~0.5 MB) ride along with the first part of
# DALI's 199 MB wheel; the other parts follow, one per call to the same warm machine (carried files stay there
# between calls). A wheel whose parts are incomplete or corrupt is left out with one line, never installed half.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL_DIR:-.whl}
PART_MB=${PART_MB:-56}  # 4 parts for DALI; 56 MiB + the tree + the small wheels stays under one call's 64 MiB
SMALL="webdataset braceexpand pytest pluggy iniconfig"

split_one() {  # FILE -> $WHL/NAME.part-* and $WHL/NAME.parts ("<count> <sha256>")
  local f=$1 name; name=$(basename "$f")
  mkdir -p "$WHL"
  rm -f "$WHL/$name".part-*
  split -b "${PART_MB}m" "$f" "$WHL/$name.part-"
  echo "$(ls "$WHL/$name".part-* | wc -l) $(sha256sum "$f" | cut -d' ' -f1)" > "$WHL/$name.parts"
}

case "${1:-}" in
  fetch)
    mkdir -p "$WHL"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$WHL" $SMALL
    if [ "${2:-}" != "--no-dali" ]; then
      tmp=$(mktemp -d)
      python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" nvidia-dali-cuda130
      for f in "$tmp"/*.whl; do split_one "$f"; done
      rm -rf "$tmp"
    fi
    echo "carry plan (run() calls to the same warm machine; paths relative to the repo root):"
    small=$(cd "$WHL" && ls *.whl 2>/dev/null | sed "s|^|$WHL/|" | tr '\n' ' ')
    n=1
    for m in "$WHL"/*.parts; do
      [ -e "$m" ] || continue
      first=1
      for p in "${m%.parts}".part-*; do
        if [ $first = 1 ]; then echo "  call $n: $small$m $p"; first=0; else echo "  call $n: $p"; fi
        n=$((n + 1))
      done
    done
    [ $n = 1 ] && echo "  call 1: $small"
    echo "the last call runs: bash benchmarks/gpu_session.sh (it joins the parts first)" ;;
  split)
    split_one "$2" ;;
  join)
    for m in "$WHL"/*.parts; do
      [ -e "$m" ] || continue
      out=${m%.parts}; read -r count sum < "$m"
      have=$(ls "$out".part-* 2>/dev/null | wc -l)
      if [ "$have" != "$count" ]; then
        echo "gpu_wheels: $(basename "$out"): $have of $count parts arrived, not installed"; continue
      fi
      cat "$out".part-* > "$out.tmp"
      if [ "$(sha256sum "$out.tmp" | cut -d' ' -f1)" != "$sum" ]; then
        echo "gpu_wheels: $(basename "$out"): joined parts do not match the sha256, not installed"; rm -f "$out.tmp"
        continue
      fi
      mv "$out.tmp" "$out"; echo "gpu_wheels: $(basename "$out") joined from $count parts"
    done ;;
  *)
    echo "usage: bash benchmarks/gpu_wheels.sh fetch [--no-dali] | split FILE | join" >&2; exit 2 ;;
esac
