import time, torch, torch.nn.functional as F, sys
torch.set_num_threads(2)
cl = torch.channels_last
def bnrelu(x, w, b):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + 1e-5)
    if w is not None:
        y = y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    return y.clamp(0, 6), mean, var
def aten(x, w, b):
    return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5).clamp(0, 6)
dyn = sys.argv[1] == "dyn"
cbn = torch.compile(bnrelu, dynamic=dyn)
def bench(fn, x, n=15, first=False):
    g = torch.randn_like(x)
    ts = []
    for i in range(n + 3):
        xx = x.detach().requires_grad_()
        t = time.perf_counter(); y = fn(xx, None, None); y = y[0] if isinstance(y, tuple) else y; y.backward(g); ts.append(time.perf_counter() - t)
    return ts[0], sorted(ts[3:])[n // 2] * 1e3
for shp in [(8,144,56,56),(8,96,112,112),(8,384,14,14),(8,1152,7,7),(32,144,8,8),(32,48,4,4)]:
    x = torch.randn(*shp).contiguous(memory_format=cl)
    tc, tm = bench(cbn, x)
    _, ta = bench(aten, x)
    xx = x.detach().requires_grad_(); y1 = aten(xx, None, None); y2 = cbn(xx, None, None)[0]
    print(shp, "aten %.2f ms" % ta, "compiled %.2f ms" % tm, "(first call %.1f s)" % tc, "maxdiff %.1e" % (y1 - y2).abs().max().item(), "cl out", y2.is_contiguous(memory_format=cl), flush=True)
