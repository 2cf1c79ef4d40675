"""Our weight step with and without densenas.native's depthwise weight-gradient kernel, alternated in one
process (order alternating): ``python ab_dw_kernel.py SIZE BATCH PAIRS``. Without it, DepthwiseConv2d does
what it did before the kernel: the grouped-conv form for 5x5 / 7x7 on maps up to 32x32, oneDNN elsewhere."""
import statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from bench.bench_vs_authors import _batch, build_ours  # noqa: E402
from densenas import native  # noqa: E402
from jobs.train import keep_freed_memory  # noqa: E402

keep_freed_memory()
torch.set_num_threads(2)
size, batch, pairs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
step, _, _ = build_ours("weight", batch)
x, y = _batch(size, batch)
real = native.dw_conv


def run(with_kernel: bool) -> float:
    native.dw_conv = real if with_kernel else (lambda: None)
    t = time.perf_counter()
    step(x, y)
    return time.perf_counter() - t


for _ in range(2):
    run(True), run(False)
times = {True: [], False: []}
for i in range(pairs):
    for k in ((True, False) if i % 2 == 0 else (False, True)):
        times[k].append(run(k))
on, off = statistics.median(times[True]), statistics.median(times[False])
print(f"weight {size}x{size} b{batch}: with kernel median {on:.3f} s {[round(t, 3) for t in times[True]]}; "
      f"without {off:.3f} s {[round(t, 3) for t in times[False]]}; without / with {off / on:.2f}x")
