import sys, time, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
from bench.bench_vs_authors import build_ours, _batch
step, build, counts = build_ours("arch", 8)
x, y = _batch(224, 8)
for _ in range(2): step(x, y)
ts=[]
for _ in range(3):
    t0=time.perf_counter(); step(x,y); ts.append(time.perf_counter()-t0)
print("times", [round(t,3) for t in ts])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(2): step(x, y)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
