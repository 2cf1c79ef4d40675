import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[5]))
from bench.bench_vs_authors import _batch, build_ours
torch.set_num_threads(2)
kind, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
step, _, _ = build_ours(kind, batch)
x, y = _batch(size, batch)
for _ in range(3): step(x, y)
print("=====STEP", flush=True)
torch.backends.mkldnn.verbose(1)
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    step(x, y)
print("=====END", flush=True)
