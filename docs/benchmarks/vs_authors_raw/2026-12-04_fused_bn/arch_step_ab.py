import sys, time, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(2)
from bench.bench_vs_authors import build_ours, _batch
from densenas.ops import use_fused_bn
kind, size, batch, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sa, _, _ = build_ours(kind, batch)
sb, _, _ = build_ours(kind, batch)
import gc
netb = [o for o in gc.get_objects() if type(o).__name__ == "SuperNet"]
# the second built net is the last SuperNet; set fused on it
from densenas.supernet import SuperNet
nets = [o for o in gc.get_objects() if isinstance(o, SuperNet)]
print("nets", len(nets))
x, y = _batch(size, batch)
# identify which net belongs to sb via closure
fn = sb.__closure__[0].cell_contents
net_b = fn.__self__.net
print("fused ops", use_fused_bn(net_b))
t0 = time.time(); sb(x, y); sb(x, y); print("fused warm-up (compile) %.1f s" % (time.time() - t0), flush=True)
sa(x, y); sa(x, y)
ta, tb = [], []
for i in range(n):
    for name, s, t in (("a", sa, ta), ("b", sb, tb)) if i % 2 == 0 else (("b", sb, tb), ("a", sa, ta)):
        t1 = time.perf_counter(); s(x, y); t.append(time.perf_counter() - t1)
ta.sort(); tb.sort()
print(kind, size, batch, "default median %.3f  fused median %.3f  ratio %.2f" % (ta[n//2], tb[n//2], ta[n//2]/tb[n//2]))
