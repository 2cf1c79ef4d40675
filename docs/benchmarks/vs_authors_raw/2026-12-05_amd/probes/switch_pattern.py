import os, sys, time, resource, statistics
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[5]))
import bench.bench_vs_authors as B
torch.set_num_threads(2)
kind, size, batch, mode, pattern = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if mode == "keep":
    from jobs.train import keep_freed_memory
    keep_freed_memory()
tree = "/tmp/densenas_bench_authors/e479206f9d73808d4167c669bb1d045a73b6f470"
steps = {}
steps["O"], _, _ = B.build_ours(kind, batch)
steps["T"], _, _ = B.build_theirs(tree, kind, batch)
x, y = B._batch(size, batch)
steps["O"](x, y); steps["T"](x, y)
prev = "T"
out = []
for s in pattern:
    r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
    steps[s](x, y)
    dt = time.perf_counter() - t; r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.append(f"{s}(after {prev}) {dt:.3f}s flt {r1.ru_minflt - r0.ru_minflt} ctx {r1.ru_nivcsw - r0.ru_nivcsw}")
    prev = s
print("\n".join(out))
