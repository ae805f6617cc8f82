#!/usr/bin/env bash
# The README's CPU quality protocol: each PRESET x 4 weight-free guides on the first 10 BSDS500
# val images, scale 0.25, at most 100 iterations, seed 0, one thread per process.
# usage: bash benchmarks/quality_cpu.sh PRESET...   (RUNS=/tmp/quality by default)
# then:  python benchmarks/quality_table.py "$RUNS"
set -u
here=$(cd "$(dirname "$0")" && pwd)
data=${DATA:-$here/../../shared/data/bsds500/val}
runs=${RUNS:-/tmp/quality}
mkdir -p "$runs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for p in "$@"; do for g in none kmeans felzenszwalb slic; do
  dynaguide eval bsds500 "$data" --preset "$p" --guidance "$g" --scale 0.25 \
    --max-iter 100 --limit 10 --seed 0 --out "$runs/$p-$g" --no-progress --plot >> "$runs/log.txt" 2>&1
  echo "done $p $g $(date +%T)" >> "$runs/progress.txt"
done; done
