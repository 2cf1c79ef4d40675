"""Per-call time of tiny convolutions (2x144x8x8): what aten + oneDNN cost per call when the work is nothing."""
import time

import torch

torch.set_num_threads(2)
F = torch.nn.functional


def bench(f, n=2000):
    for _ in range(50):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


for cl in (True, False):
    x = torch.randn(2, 144, 8, 8); w = torch.randn(24, 144, 1, 1); wd = torch.randn(144, 1, 3, 3)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    print("channels_last" if cl else "nchw",
          "1x1 fwd %.1f us" % bench(lambda: F.conv2d(x, w)),
          "dw fwd %.1f us" % bench(lambda: F.conv2d(x, wd, None, 1, 1, 1, 144)),
          "add %.1f us" % bench(lambda: x + x))
    g = torch.randn(2, 24, 8, 8)
    if cl:
        g = g.contiguous(memory_format=torch.channels_last)
    print("   bwd-data 1x1 %.1f us" % bench(lambda: torch.ops.aten.convolution_backward(
        g, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])))
