import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
cl = torch.channels_last
def bnrelu(x):
    y = F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    return y.clamp(0, 6)
cbn = torch.compile(bnrelu, dynamic=False)
def bench(fn, x, n=20):
    g = torch.randn_like(x)
    for _ in range(3):
        xx = x.detach().requires_grad_(); y = fn(xx); y.backward(g)
    ts = []
    for _ in range(n):
        xx = x.detach().requires_grad_()
        t = time.perf_counter(); y = fn(xx); y.backward(g); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[n // 2] * 1e3
for shp in [(8,144,56,56),(8,96,112,112),(8,384,14,14),(8,1152,7,7)]:
    x = torch.randn(*shp).contiguous(memory_format=cl)
    t0 = time.time(); bench(cbn, x, 1); tc = time.time() - t0
    print(shp, "aten %.2f ms" % bench(bnrelu, x), "inductor %.2f ms" % bench(cbn, x), "(compile %.1f s)" % tc, flush=True)
