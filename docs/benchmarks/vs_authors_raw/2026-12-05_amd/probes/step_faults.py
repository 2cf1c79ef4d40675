import os, sys, time, resource, statistics
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[5]))
from bench.bench_vs_authors import _batch, build_ours
torch.set_num_threads(2)
kind, size, batch, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "keep":
    from jobs.train import keep_freed_memory
    print("keep", keep_freed_memory())
step, _, _ = build_ours(kind, batch)
x, y = _batch(size, batch)
for _ in range(2): step(x, y)
ts, pfs = [], []
for _ in range(7):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter()
    step(x, y)
    ts.append(time.perf_counter() - t); pfs.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(mode, kind, size, batch, "median %.3f" % statistics.median(ts), "min %.3f" % min(ts), "faults/step", pfs)
