"""The native BatchNorm+ReLU6 kernel against aten's BatchNorm + in-place clamp, alone, forward and backward.

    env -u PYTHONPATH .venv/bin/python docs/benchmarks/vs_authors_raw/2026-12-04_native_bn/micro.py
"""
import time

import torch

from densenas import native

torch.set_num_threads(2)
mod = native.bn_act()
assert mod is not None, "densenas.native did not build"


def median_ms(f, n=40):
    for _ in range(5):
        f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[n // 2] * 1e3


for shape in [(8, 576, 14, 14), (8, 1152, 7, 7), (8, 144, 56, 56), (8, 240, 28, 28), (8, 96, 112, 112), (32, 144, 8, 8)]:
    C = shape[1]
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(C), torch.ones(C)
    rm2, rv2 = rm.clone(), rv.clone()
    out, mean, invstd, affine = mod.forward(x, None, None, rm2, rv2, 0.1, 1e-5, True)
    ref, sm, si = torch.native_batch_norm(x, None, None, rm, rv, True, 0.1, 1e-5)
    ref.clamp_(0, 6)

    def aten_fwd():
        o = torch.native_batch_norm(x, None, None, rm, rv, True, 0.1, 1e-5)[0]
        o.clamp_(0, 6)

    def aten_bwd():
        gg = torch.ops.aten.hardtanh_backward(g, ref, 0.0, 6.0)
        torch.ops.aten.native_batch_norm_backward(gg, x, None, rm, rv, sm, si, True, 1e-5, [True, False, False])

    fa, ba = median_ms(aten_fwd), median_ms(aten_bwd)
    fm = median_ms(lambda: mod.forward(x, None, None, rm2, rv2, 0.1, 1e-5, True))
    bm = median_ms(lambda: mod.backward(g, x, affine, mean, invstd, None, True, True, False, False))
    print(f"{shape} aten fwd {fa:.3f} bwd {ba:.3f} ms | native fwd {fm:.3f} bwd {bm:.3f} ms | "
          f"{(fa + ba) / (fm + bm):.2f}x | max |out diff| {(out - ref).abs().max().item():.1e}", flush=True)
