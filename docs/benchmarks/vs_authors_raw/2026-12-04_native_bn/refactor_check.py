# The reduction loops before (git show 9f24b20:densenas/native/bn_act.cpp > /tmp/old_bn.cpp) and after they
# shared block_sums: forward + backward interleaved, median of 30 each. Run 12:27 UTC on a noisy machine.
import time, torch, sys
sys.path.insert(0, "/work/main")
torch.set_num_threads(2)
from torch.utils.cpp_extension import load
from densenas import native
new = native.bn_act()
old = load("bn_act_old_cmp", ["/tmp/old_bn.cpp"], extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
def once(mod, x, g):
    t = time.perf_counter()
    out, mean, invstd, aff = mod.forward(x, None, None, None, None, 0.1, 1e-5, True)
    mod.backward(g, x, aff, mean, invstd, None, True, True, False, False)
    return time.perf_counter() - t
for shape in [(8, 576, 14, 14), (8, 144, 56, 56), (8, 240, 28, 28), (32, 144, 8, 8)]:
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last); g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    a, b = [], []
    for i in range(60):
        for m, l in ((old, a), (new, b)) if i % 2 else ((new, b), (old, a)):
            l.append(once(m, x, g))
    a.sort(); b.sort()
    print(shape, "old %.3f ms new %.3f ms ratio old/new %.3f" % (a[30]*1e3, b[30]*1e3, a[30]/b[30]), flush=True)
