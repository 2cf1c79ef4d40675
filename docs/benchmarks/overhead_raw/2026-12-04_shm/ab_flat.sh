#!/bin/bash
cd /work/main
OUT=$1; mkdir -p $OUT
for rep in 1 2 3; do
  for m in "" 1; do
    XP_FLAT=$m XP_MALLOPT=1 env -u PYTHONPATH timeout 900 .venv/bin/python bench/bench_overhead.py --stages retrain --workers 2 --retrain-epochs 10 --no-ddp-baseline --json $OUT/ab_${rep}_flat${m}.json > $OUT/ab_${rep}_flat${m}.log 2>&1
    echo "rep $rep flat=$m: $(grep -E '^retrain ' $OUT/ab_${rep}_flat${m}.log | grep ratio | cut -c1-100)"
    grep "train loop" $OUT/ab_${rep}_flat${m}.log
  done
done
