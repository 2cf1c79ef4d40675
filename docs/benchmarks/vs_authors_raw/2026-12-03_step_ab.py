"""Interleaved A/B of search-step variants in one process; --rss VARIANT: one variant alone, VmHWM.
Variants: ops 'old' (nn.ReLU6(inplace=True)) or 'new' (densenas.ops.ReLU6); searcher 'old' (main's
search.py) or 'new' (this worktree's). Spelled OPS+SEARCH, e.g. old+old, new+old, old+new, new+new."""
import sys, os, time, json, statistics, importlib.util
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch
from torch import nn
torch.set_num_threads(int(os.environ.get("AB_THREADS", "2")))
import bench_vs_authors as B
from densenas.supernet import SuperNet
from densenas import search as new_search
from densenas.ops import ReLU6
try:
    from densenas.ops import DepthwiseConv2d
except ImportError:
    DepthwiseConv2d = None
spec = importlib.util.spec_from_file_location("old_search", "/tmp/s23/old_search.py")
old_search = importlib.util.module_from_spec(spec); sys.modules["old_search"] = old_search; spec.loader.exec_module(old_search)
H = B.HYPER
import types
spec2 = importlib.util.spec_from_file_location("old_supernet", "/tmp/s23/old_supernet.py")
old_supernet = importlib.util.module_from_spec(spec2); sys.modules["old_supernet"] = old_supernet; spec2.loader.exec_module(old_supernet)

def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM:"): return int(l.split()[1]) / 2**20

def build(variant, kind, batch):
    ops, srch, *net_v = variant.split("+")
    mod = new_search if srch == "new" else old_search
    cfg = mod.SearchConfig.model_validate({
        "epochs": 10, "warmup_epochs": 0, "batch_size": batch, "lambda": H["lambda"], "tau": H["tau"],
        "weights": {"lr": H["lr"], "momentum": H["momentum"], "weight_decay": H["weight_decay"]},
        "arch": {"lr": H["arch_lr"], "betas": list(H["arch_betas"]), "weight_decay": H["arch_weight_decay"]}})
    torch.manual_seed(0)
    net = SuperNet("imagenet_mbconv", B.CLASSES)
    if ops in ("old", "relu"):
        for m in list(net.modules()):
            for name, c in list(m.named_children()):
                if ops == "old" and isinstance(c, ReLU6):
                    setattr(m, name, nn.ReLU6(inplace=True))
                if DepthwiseConv2d is not None and isinstance(c, DepthwiseConv2d):
                    d = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                  groups=c.groups, bias=False)
                    d.weight = c.weight
                    setattr(m, name, d)
    if net_v and net_v[0] == "oldnet":
        net.forward = types.MethodType(old_supernet.SuperNet.forward, net)
        for m in net.mixed_ops:
            m.forward = types.MethodType(old_supernet.MixedOp.forward, m)
    s = mod.Searcher(net, cfg, steps_per_epoch=100, log=None)
    fn = s.weight_step if kind == "weight" else s.arch_step
    return lambda x, y: fn((x, y))

args = sys.argv[1:]
if args[0] == "--rss":
    variant, kind, size, batch, steps = args[1], args[2], int(args[3]), int(args[4]), int(args[5])
    st = build(variant, kind, batch); x, y = B._batch(size, batch); ts = []
    for n in range(steps):
        t = time.perf_counter(); st(x, y); ts.append(time.perf_counter() - t)
    print(json.dumps({"variant": variant, "kind": kind, "size": size, "batch": batch, "hwm_gib": round(hwm(), 3),
                      "solo_median_s": round(statistics.median(ts[2:] or ts), 3)}))
    sys.exit()
A, Bv, kind, size, batch, warm, steps = args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5]), int(args[6])
sides = {A: build(A, kind, batch), Bv: build(Bv, kind, batch)}
x, y = B._batch(size, batch)
times = {A: [], Bv: []}
order = [A, Bv]
for n in range(warm + steps):
    for v in (order if n % 2 == 0 else order[::-1]):
        t = time.perf_counter(); sides[v](x, y); dt = time.perf_counter() - t
        if n >= warm: times[v].append(dt)
ma, mb = statistics.median(times[A]), statistics.median(times[Bv])
print(json.dumps({"A": A, "B": Bv, "kind": kind, "size": size, "batch": batch, "steps": steps,
                  "A_median_s": round(ma, 3), "B_median_s": round(mb, 3), "A/B": round(ma / mb, 3),
                  "A_times": [round(t, 3) for t in times[A]], "B_times": [round(t, 3) for t in times[Bv]],
                  "load": os.getloadavg()[0]}))
