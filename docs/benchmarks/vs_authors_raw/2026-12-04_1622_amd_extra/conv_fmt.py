import time, torch
torch.set_num_threads(2)
def bench(c_in, c_out, k, groups, hw, stride=1, fmt=torch.contiguous_format, reps=15):
    conv = torch.nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False).to(memory_format=fmt)
    for p in conv.parameters(): p.requires_grad_(False)
    x = torch.randn(8, c_in, hw, hw).to(memory_format=fmt).requires_grad_(True)
    ts = []
    for i in range(reps + 3):
        t = time.perf_counter(); y = conv(x); y.backward(torch.ones_like(y)); ts.append(time.perf_counter() - t)
    ts = sorted(ts[3:]); return ts[len(ts) // 2] * 1e3
for (ci, co, k, g, hw, s) in [(32, 32, 3, 32, 112, 1), (96, 96, 3, 96, 112, 2), (144, 144, 5, 144, 56, 1), (240, 240, 5, 240, 28, 1),
                              (32, 96, 1, 1, 112, 1), (96, 24, 1, 1, 56, 1), (144, 40, 1, 1, 28, 1), (480, 80, 1, 1, 14, 1), (1152, 192, 1, 1, 7, 1)]:
    a = bench(ci, co, k, g, hw, s); b = bench(ci, co, k, g, hw, s, torch.channels_last)
    print(f"{'dw' if g > 1 else 'pw'} {ci}->{co} k{k} s{s} {hw}x{hw}: NCHW {a:7.2f} ms  NHWC {b:7.2f} ms  NCHW/NHWC {a / b:5.2f}", flush=True)
