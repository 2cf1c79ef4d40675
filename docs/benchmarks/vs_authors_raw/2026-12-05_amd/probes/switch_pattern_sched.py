import os, sys, time, resource
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[5]))
import bench.bench_vs_authors as B
torch.set_num_threads(2)
from jobs.train import keep_freed_memory
keep_freed_memory()
def vm():
    return {l.split()[0]: int(l.split()[1]) for l in open("/proc/vmstat")}
def sched():
    d = {}
    for t in os.listdir("/proc/self/task"):
        try:
            a = open(f"/proc/self/task/{t}/schedstat").read().split()
            d[t] = (int(a[0]), int(a[1]))
        except OSError: pass
    return d
tree = "/tmp/densenas_bench_authors/e479206f9d73808d4167c669bb1d045a73b6f470"
steps = {}
steps["O"], _, _ = B.build_ours("arch", 8)
steps["T"], _, _ = B.build_theirs(tree, "arch", 8)
x, y = B._batch(224, 8)
steps["O"](x, y); steps["T"](x, y)
prev = "T"
for s in sys.argv[1]:
    v0 = vm(); s0 = sched(); t = time.perf_counter()
    steps[s](x, y)
    dt = time.perf_counter() - t; v1 = vm(); s1 = sched()
    run = sum(s1[k][0] - s0.get(k, (0, 0))[0] for k in s1) / 1e9
    wait = sum(s1[k][1] - s0.get(k, (0, 0))[1] for k in s1) / 1e9
    diff = {k: v1[k] - v0[k] for k in v1 if v1[k] - v0[k] > 50}
    print(f"{s}(after {prev}) {dt:.3f}s run {run:.3f} runqueue-wait {wait:.3f}", diff)
    prev = s
