import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
cl = torch.channels_last
def med(f, n=15):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3
tot_f = tot_b = tot_t = 0
for (c, hw, k, s) in [(96,112,3,2),(144,56,3,1),(144,56,5,2),(144,56,7,2),(72,56,5,1),(240,28,5,1),(144,28,7,1),(480,14,3,1),(480,14,7,1),(1152,7,5,1),(576,14,5,2)]:
    x = torch.randn(8, c, hw, hw).contiguous(memory_format=cl)
    w = torch.randn(c, 1, k, k).contiguous(memory_format=cl)
    y = F.conv2d(x, w, None, s, k // 2, 1, c)
    g = torch.randn_like(y)
    tf = med(lambda: F.conv2d(x, w, None, s, k // 2, 1, c))
    tb = med(lambda: torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [k//2, k//2], [1, 1], False, [0, 0], c, [True, False, False]))
    # transposed-conv form of the input gradient
    op = (x.shape[-1] + 2 * (k // 2) - k) % s
    tt = med(lambda: F.conv_transpose2d(g, w, None, s, k // 2, op, c))
    gi = torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [k//2, k//2], [1, 1], False, [0, 0], c, [True, False, False])[0]
    gt = F.conv_transpose2d(g, w, None, s, k // 2, op, c)
    print(f"c{c} {hw}x{hw} k{k} s{s}: fwd {tf:6.2f} ms  bwd-input {tb:6.2f} ms  conv_transpose {tt:6.2f} ms  same shape {gt.shape == gi.shape} maxdiff {(gt - gi).abs().max():.1e}", flush=True)
