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
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
    for _ in range(3): step(x, y)
ka = p.key_averages(group_by_input_shape=True)
rows = [e for e in ka if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward")]
rows.sort(key=lambda e: -e.self_cpu_time_total)
tot = sum(e.self_cpu_time_total for e in ka)
print("total self us", tot)
for e in rows[:45]:
    print(f"{e.key[6:18]:12s} {e.self_cpu_time_total/3/1000:8.1f}ms/step n={e.count//3:4d} {str(e.input_shapes)[:150]}")
