import sys, time, resource, torch
sys.path.insert(0, "/work/main")
mode = sys.argv[1]; kind = sys.argv[2]; size = int(sys.argv[3]); batch = int(sys.argv[4]); n = int(sys.argv[5])
torch.set_num_threads(2)
if mode == "steady":
    from densenas.profiling import steady_allocator
    steady_allocator()
from bench.bench_vs_authors import build_ours, _batch
step, build, counts = build_ours(kind, batch)
x, y = _batch(size, batch)
for _ in range(2): step(x, y)
ts, fl = [], []
for _ in range(n):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0 = time.perf_counter(); c0 = time.process_time()
    step(x, y)
    ts.append(time.perf_counter() - t0); fl.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
if len(sys.argv) > 6 and sys.argv[6] == "steps":  # per-step times, in the order run
    print(mode, kind, size, batch, "steps", [round(t, 3) for t in ts], "median %.3f" % sorted(ts)[n // 2], "minflt/step", sorted(fl)[n // 2], flush=True)
    sys.exit(0)
ts.sort()
print(mode, kind, size, batch, "median %.3f s" % ts[len(ts)//2], "min %.3f" % ts[0], "minflt/step", sorted(fl)[len(fl)//2], flush=True)
