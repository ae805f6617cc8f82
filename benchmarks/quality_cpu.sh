#!/usr/bin/env bash
# usage: run.sh PRESET...   (each preset x 4 guides, 10 BSDS500 val images, scale 0.25, 100 iterations)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for p in "$@"; do for g in none kmeans felzenszwalb slic; do
  dynaguide eval bsds500 /work/shared/data/bsds500/val --preset $p --guidance $g --scale 0.25 \
    --max-iter 100 --limit 10 --seed 0 --out /tmp/quality/$p-$g --no-progress --plot >> /tmp/quality/log.txt 2>&1
  echo "done $p $g $(date +%T)" >> /tmp/quality/progress.txt
done; done
