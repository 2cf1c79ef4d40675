#!/bin/bash
# interleaved A/B/C of the retrain stage, 2 workers: A = HEAD (DDP), B = spin flat sync, C = B + mallopt
cd "$(git rev-parse --show-toplevel)"
OUT=docs/benchmarks/overhead_raw/2026-12-04_spin
git diff HEAD > /tmp/change.patch
for rep in 1 2; do
  git stash -q && env -u PYTHONPATH timeout 600 .venv/bin/python bench/bench_overhead.py --stages retrain --workers 2 --retrain-epochs 8 --json $OUT/ab_${rep}_A_ddp.json > $OUT/ab_${rep}_A_ddp.log 2>&1; git stash pop -q
  grep "ratio" $OUT/ab_${rep}_A_ddp.log | cut -c1-150
  env -u PYTHONPATH timeout 600 .venv/bin/python bench/bench_overhead.py --stages retrain --workers 2 --retrain-epochs 8 --json $OUT/ab_${rep}_B_spin.json > $OUT/ab_${rep}_B_spin.log 2>&1
  grep "ratio" $OUT/ab_${rep}_B_spin.log | cut -c1-150
  DENSENAS_EXPERIMENT_MALLOPT=1 env -u PYTHONPATH timeout 600 .venv/bin/python bench/bench_overhead.py --stages retrain --workers 2 --retrain-epochs 8 --json $OUT/ab_${rep}_C_spin_mallopt.json > $OUT/ab_${rep}_C_spin_mallopt.log 2>&1
  grep "ratio" $OUT/ab_${rep}_C_spin_mallopt.log | cut -c1-150
done
