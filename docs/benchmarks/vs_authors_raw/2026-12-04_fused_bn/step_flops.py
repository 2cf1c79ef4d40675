import sys, time, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(2)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from bench.bench_vs_authors import build_ours, _batch
class Count(TorchDispatchMode):
    def __init__(self): super().__init__(); self.f = {}
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        pk = func._overloadpacket
        if pk in flop_registry:
            try:
                outs = out
                n = flop_registry[pk](*args, **(kwargs or {}), out_val=outs)
            except TypeError:
                n = flop_registry[pk](*[a.shape if isinstance(a, torch.Tensor) else a for a in args], **(kwargs or {}), out_shape=(out.shape if isinstance(out, torch.Tensor) else [o.shape if isinstance(o, torch.Tensor) else None for o in out]))
            self.f[pk.__name__] = self.f.get(pk.__name__, 0) + n
        return out
for kind in ("arch", "weight"):
    step, build, counts = build_ours(kind, 8)
    x, y = _batch(224, 8)
    step(x, y)
    c = Count()
    with c:
        step(x, y)
    tot = sum(c.f.values())
    ts = []
    for _ in range(3):
        t = time.perf_counter(); step(x, y); ts.append(time.perf_counter() - t)
    m = sorted(ts)[1]
    print(kind, "GFLOP per step %.1f" % (tot / 1e9), {k: round(v / 1e9, 1) for k, v in c.f.items()}, "median step %.3f s -> %.1f GFLOP/s" % (m, tot / 1e9 / m))
