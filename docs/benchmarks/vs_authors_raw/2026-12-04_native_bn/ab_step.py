"""One searcher, steps alternated between aten's BatchNorm (DENSENAS_NATIVE=0) and the native kernel.

    env -u PYTHONPATH .venv/bin/python docs/benchmarks/vs_authors_raw/2026-12-04_native_bn/ab_step.py arch 224 8 7
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from bench.bench_vs_authors import _batch, build_ours  # noqa: E402

torch.set_num_threads(2)
kind, size, batch, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
step, _, _ = build_ours(kind, batch)
x, y = _batch(size, batch)


def run(flag):
    os.environ["DENSENAS_NATIVE"] = flag
    t = time.perf_counter()
    step(x, y)
    return time.perf_counter() - t


for f in "0101":
    run(f)
ta, tb = [], []
for i in range(n):
    for f in (("0", "1") if i % 2 == 0 else ("1", "0")):
        (ta if f == "0" else tb).append(run(f))
ta.sort()
tb.sort()
print(f"{kind} {size}x{size} b{batch}: aten median {ta[n // 2]:.3f} s, native median {tb[n // 2]:.3f} s, "
      f"ratio {ta[n // 2] / tb[n // 2]:.3f} ({n} steps each, alternated)", flush=True)
