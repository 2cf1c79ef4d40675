import time, torch, sys
sys.path.insert(0, "/work/main")
torch.set_num_threads(2)
from densenas import fused_bn
from torch import nn
bns = []
cl = torch.channels_last
xs = []
for c in range(8, 8 + 40):
    bn = nn.BatchNorm2d(c, affine=False); bns.append(bn)
    xs.append(torch.randn(4, c, 4, 4).contiguous(memory_format=cl).requires_grad_())
t = time.time()
for bn, x in zip(bns, xs): fused_bn.batch_norm_act(bn, x, True).sum().backward()
print("compile 40 shapes %.1f s" % (time.time() - t))
for k in (0, 39):
    bn, x = bns[k], xs[k]
    for _ in range(3): fused_bn.batch_norm_act(bn, x, True)
    t = time.perf_counter()
    for _ in range(200): y = fused_bn.batch_norm_act(bn, x, True)
    tf = (time.perf_counter() - t) / 200
    t = time.perf_counter()
    for _ in range(200): y = torch.nn.functional.relu6(bn(x))
    ta = (time.perf_counter() - t) / 200
    print(k, "fused fwd call %.1f us, aten %.1f us" % (tf * 1e6, ta * 1e6))
