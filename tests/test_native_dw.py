"""densenas.native's depthwise weight-gradient kernel and DepthwiseConv2d's use of it: the same gradients
as aten's convolution, for every kernel size, stride, channel count and map size the spaces use."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from densenas import native
from densenas.ops import DepthwiseConv2d

CL = torch.channels_last
pytestmark = pytest.mark.skipif(native.dw_conv() is None, reason="the native kernel could not be built here")


def _aten_weight_grad(x, g, k, s, p):
    w = torch.zeros(x.shape[1], 1, k, k)
    return torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], x.shape[1],
                                               [False, True, False])[1]


@pytest.mark.parametrize("n,c,hw,k,s", [
    (2, 8, 9, 3, 1), (3, 13, 7, 5, 2), (2, 48, 16, 7, 1), (4, 40, 8, 5, 2), (2, 72, 5, 7, 2),
    (1, 33, 2, 5, 1), (2, 144, 3, 7, 1), (1, 8, 1, 3, 1), (2, 24, 11, 7, 2)])
def test_weight_grad_matches_aten(n, c, hw, k, s):
    torch.manual_seed(0)
    p = k // 2
    x = torch.randn(n, c, hw, hw).contiguous(memory_format=CL)
    ho = (hw + 2 * p - k) // s + 1
    g = torch.randn(n, c, ho, ho).contiguous(memory_format=CL)
    got = native.dw_conv().weight_grad(x, g, k, s, p)
    assert got.shape == (c, 1, k, k)
    torch.testing.assert_close(got, _aten_weight_grad(x.contiguous(), g.contiguous(), k, s, p), rtol=1e-4, atol=1e-4)


def test_weight_grad_does_not_depend_on_threads():
    x = torch.randn(4, 40, 12, 12).contiguous(memory_format=CL)
    g = torch.randn(4, 40, 12, 12).contiguous(memory_format=CL)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.dw_conv().weight_grad(x, g, 5, 1, 2)
        torch.set_num_threads(2)
        two = native.dw_conv().weight_grad(x, g, 5, 1, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_weight_grad_rejects_bad_input_clearly():
    mod = native.dw_conv()
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="channels_last"):
        mod.weight_grad(torch.randn(2, 8, 6, 6), x, 3, 1, 1)
    with pytest.raises(RuntimeError, match="float32"):
        mod.weight_grad(x.double(), x.double(), 3, 1, 1)
    with pytest.raises(RuntimeError, match="does not match"):
        mod.weight_grad(x, torch.randn(2, 8, 5, 5).contiguous(memory_format=CL), 3, 1, 1)


@pytest.mark.parametrize("flag", ["1", "0"])
@pytest.mark.parametrize("hw,k,s", [(40, 7, 1), (40, 5, 2), (12, 7, 1), (12, 3, 2)])
def test_depthwise_conv_gradients_match_nn_conv2d(monkeypatch, flag, hw, k, s):
    """Native kernel (flag 1), grouped conv or oneDNN (flag 0): the module's gradients are nn.Conv2d's."""
    monkeypatch.setenv("DENSENAS_NATIVE", flag)
    torch.manual_seed(1)
    dw = DepthwiseConv2d(24, k, s)
    ref = nn.Conv2d(24, 24, k, s, k // 2, groups=24, bias=False)
    ref.weight.data.copy_(dw.weight.data)
    x = torch.randn(2, 24, hw, hw).contiguous(memory_format=CL)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = dw(xa), ref(xb)
    torch.testing.assert_close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(dw.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    assert dw.fast_weight_grad(x) == (k >= 5 and (flag == "1" or hw <= 32))
