#!/bin/bash
# Interleaved A/B of the Train stages with 2 workers: A = the commit before the prefetch (git stash of the
# working tree), B = the working tree with jobs.data.prefetched. Order A B B A for retrain, then A B for search.
cd "$(git rev-parse --show-toplevel)"
OUT=docs/benchmarks/overhead_raw/2026-12-04_prefetch
run() {  # $1 = A|B, $2 = tag, rest = bench args
  local side=$1 tag=$2; shift 2
  if [ "$side" = A ]; then git stash -q; fi
  env -u PYTHONPATH timeout 900 .venv/bin/python bench/bench_overhead.py "$@" --json $OUT/$tag.json > $OUT/$tag.log 2>&1
  if [ "$side" = A ]; then git stash pop -q; fi
  echo "$tag: $(grep -h 'ratio' $OUT/$tag.log | cut -c1-170)"
}
run A retrain_1_A --stages retrain --workers 2 --retrain-epochs 8
run B retrain_1_B --stages retrain --workers 2 --retrain-epochs 8
run B retrain_2_B --stages retrain --workers 2 --retrain-epochs 8
run A retrain_2_A --stages retrain --workers 2 --retrain-epochs 8
run A search_1_A --stages search --workers 2
run B search_1_B --stages search --workers 2
