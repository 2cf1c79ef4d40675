#!/bin/bash
cd /work/main
OUT=docs/benchmarks/overhead_raw/2026-12-04_shm
env -u PYTHONPATH timeout 1500 .venv/bin/python bench/bench_overhead.py --retrain-epochs 10 --json $OUT/overhead_all_rows.json > $OUT/overhead_all_rows.log 2>&1
for rep in 1 2; do
  env -u PYTHONPATH timeout 900 .venv/bin/python bench/bench_overhead.py --stages retrain --workers 2 --retrain-epochs 10 --json $OUT/retrain2_rerun${rep}.json > $OUT/retrain2_rerun${rep}.log 2>&1
done
echo done
