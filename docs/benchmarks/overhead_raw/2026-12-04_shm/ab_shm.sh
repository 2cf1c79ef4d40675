#!/bin/bash
# interleaved A/B of the retrain stage, 2 workers: A = gloo (DDP's own all-reduce), B = shared memory
cd /work/main
OUT=$1; mkdir -p $OUT
for rep in 1 2 3; do
  for m in gloo shm; do
    flag=$([ $m = gloo ] && echo --no-shared-memory-allreduce || echo --shared-memory-allreduce)
    env -u PYTHONPATH timeout 900 .venv/bin/python bench/bench_overhead.py --stages retrain --workers 2 --retrain-epochs 10 $flag --json $OUT/ab_${rep}_${m}.json > $OUT/ab_${rep}_${m}.log 2>&1
    echo "rep $rep $m: $(grep -E '^retrain ' $OUT/ab_${rep}_${m}.log | grep ratio | cut -c1-130)"
  done
done
