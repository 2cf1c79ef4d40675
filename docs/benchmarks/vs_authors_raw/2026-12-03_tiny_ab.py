import time, statistics, torch, sys
sys.path.insert(0, "/work/main")
from densenas.supernet import SuperNet
from densenas.search import Searcher, SearchConfig
from densenas import ops
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = SearchConfig.model_validate({"epochs": 6, "warmup_epochs": 0, "batch_size": 32, "cost": "macs"})
net = SuperNet("tiny_mbconv", num_classes=10)
s = Searcher(net, cfg, steps_per_epoch=100, log=None)
x = torch.randn(32, 1, 32, 32); y = torch.randint(0, 10, (32,))
orig = ops.DepthwiseConv2d.fast_weight_grad
def run(fast, kind):
    ops.DepthwiseConv2d.fast_weight_grad = orig if fast else (lambda self, x: False)
    t = time.perf_counter()
    (s.weight_step if kind == "w" else s.arch_step)((x, y))
    return time.perf_counter() - t
for kind in ("w", "a"):
    for _ in range(3): run(True, kind); run(False, kind)
    a, b = [], []
    for i in range(30):
        if i % 2: a.append(run(True, kind)); b.append(run(False, kind))
        else: b.append(run(False, kind)); a.append(run(True, kind))
    print(kind, "fast median %.4f s, plain median %.4f s, plain/fast %.3f" % (statistics.median(a), statistics.median(b), statistics.median(b)/statistics.median(a)))
