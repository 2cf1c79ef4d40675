import time, torch, sys
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
shapes = [(8, 16, 112, 112, 96), (8, 96, 112, 112, 24), (8, 24, 56, 56, 144), (8, 144, 56, 56, 24), (8, 40, 28, 28, 240), (8, 240, 28, 28, 40), (8, 80, 14, 14, 480), (8, 480, 14, 14, 96), (8, 192, 7, 7, 1152), (8, 1152, 7, 7, 320)]
def t(fn, n=9):
    ts = []
    for _ in range(n):
        s = time.perf_counter(); fn(); ts.append(time.perf_counter() - s)
    ts.sort(); return ts[len(ts)//2] * 1e3
tot = [0, 0]
for n, c, h, w, o in shapes:
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    wt = torch.randn(o, c, 1, 1)
    g = torch.randn(n, o, h, w).contiguous(memory_format=torch.channels_last)
    def conv():
        y = F.conv2d(x, wt); gi, = torch.autograd.grad(y, x, g); return gi
    def mm():
        x2 = x.permute(0, 2, 3, 1).reshape(-1, c)
        y = (x2 @ wt.view(o, c).t()).view(n, h, w, o).permute(0, 3, 1, 2)
        gi, = torch.autograd.grad(y, x, g); return gi
    a = t(conv); b = t(mm)
    tot[0] += a; tot[1] += b
    print((n, c, h, w, o), f"conv {a:.2f} ms  mm {b:.2f} ms")
print("total conv %.1f mm %.1f" % tuple(tot))
