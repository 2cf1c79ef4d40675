import os, sys, time
import torch
sys.path.insert(0, "/work/main")
from bench.bench_vs_authors import _batch, build_ours
torch.set_num_threads(2)
kind, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
step, _, _ = build_ours(kind, batch)
x, y = _batch(size, batch)
for _ in range(3): step(x, y)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(3): step(x, y)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
