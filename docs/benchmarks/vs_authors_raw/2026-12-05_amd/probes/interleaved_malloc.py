import os, sys, time, resource, statistics
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[5]))
import bench.bench_vs_authors as B
torch.set_num_threads(2)
kind, size, batch, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
nsteps = int(sys.argv[5]) if len(sys.argv) > 5 else 7
if mode == "keep":
    from jobs.train import keep_freed_memory
    print("keep", keep_freed_memory())
tree = "/tmp/densenas_bench_authors/e479206f9d73808d4167c669bb1d045a73b6f470"
steps = {}
steps["ours"], _, _ = B.build_ours(kind, batch)
steps["theirs"], _, _ = B.build_theirs(tree, kind, batch)
x, y = B._batch(size, batch)
sides = ("ours", "theirs")
T = {s: [] for s in sides}; F = {s: [] for s in sides}
for n in range(2 + nsteps):
    for s in (sides if n % 2 == 0 else sides[::-1]):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter()
        steps[s](x, y)
        dt = time.perf_counter() - t; f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
        if n >= 2: T[s].append(dt); F[s].append(f)
mo, mt = statistics.median(T["ours"]), statistics.median(T["theirs"])
print(mode, kind, size, batch, "ours %.3f theirs %.3f ratio %.3f" % (mo, mt, mt / mo),
      "faults ours", statistics.median(F["ours"]), "theirs", statistics.median(F["theirs"]), flush=True)
