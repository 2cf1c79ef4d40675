"""The native training BatchNorm(+ReLU6) kernel against aten's ops, alone and inside the networks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densenas import native
from densenas.ops import MBConv, batch_norm_act, build_op
from densenas.supernet import SuperNet

pytestmark = pytest.mark.skipif(native.bn_act() is None, reason="the native kernel could not be built here")

CL = torch.channels_last


def _reference(x, bn, relu6):
    out = bn(x)
    return out.clamp(0, 6) if relu6 else out


@pytest.mark.parametrize("relu6", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(8, 40, 14, 14), (3, 17, 5, 7), (32, 24, 1, 1)])
def test_matches_aten_forward_backward_and_running_stats(relu6, affine, shape):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(shape[1], affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    ref_bn = copy.deepcopy(bn)
    x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=CL).requires_grad_()
    xr = x.detach().clone().contiguous().requires_grad_()   # aten on NCHW, the plain path
    g = torch.randn(shape)

    out = batch_norm_act(x, bn, relu6)
    assert out is not None and out.is_contiguous(memory_format=CL)
    ref = _reference(xr, ref_bn, relu6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The ReLU6 mask comes from each side's own output; compare gradients where both agree on it.
    out.backward(g)
    mask = ((out > 0) & (out < 6)) if relu6 else torch.ones_like(out, dtype=torch.bool)
    (ref * mask).backward(g) if relu6 else ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1


def test_large_offset_keeps_variance_accurate():
    # Values around 1e3 with unit spread: a naive sum of squares in float would lose the variance.
    x = (torch.randn(4, 8, 16, 16) + 1000.0).contiguous(memory_format=CL)
    bn, ref_bn = nn.BatchNorm2d(8, affine=False), nn.BatchNorm2d(8, affine=False)
    torch.testing.assert_close(batch_norm_act(x, bn, False), ref_bn(x.contiguous()), rtol=1e-3, atol=1e-3)


def test_only_where_it_applies():
    bn = nn.BatchNorm2d(8)
    x = torch.randn(2, 8, 4, 4)
    assert batch_norm_act(x, bn, True) is None                       # NCHW: aten
    assert batch_norm_act(x.double().contiguous(memory_format=CL), bn.double(), True) is None  # float64
    bn.float().eval()
    assert batch_norm_act(x.contiguous(memory_format=CL), bn, True) is None  # running statistics: aten
    bn.train()
    bn.momentum = None                                                # cumulative average: aten
    assert batch_norm_act(x.contiguous(memory_format=CL), bn, True) is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DENSENAS_NATIVE", "0")
    assert native.bn_act() is None
    assert batch_norm_act(torch.randn(2, 8, 4, 4).contiguous(memory_format=CL), nn.BatchNorm2d(8), True) is None


def test_kernel_rejects_bad_input_clearly():
    mod = native.bn_act()
    with pytest.raises(RuntimeError, match="channels_last"):
        mod.forward(torch.randn(2, 8, 4, 4), None, None, None, None, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="8 channels"):
        mod.forward(torch.randn(2, 8, 4, 4).contiguous(memory_format=CL), torch.ones(3), None, None, None,
                    0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="more than one value"):
        mod.forward(torch.randn(1, 8, 1, 1).contiguous(memory_format=CL), None, None, None, None, 0.1, 1e-5, True)


def _mbconv_grads(monkeypatch, flag, op, x):
    monkeypatch.setenv("DENSENAS_NATIVE", flag)
    op = copy.deepcopy(op)
    x = x.clone().requires_grad_()
    out = op(x)
    out.square().sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in op.named_parameters()}, copy.deepcopy(op.state_dict())


def test_mbconv_same_as_aten(monkeypatch):
    torch.manual_seed(1)
    op = MBConv(16, 16, 1, 5, 6, bn_affine=True).to(memory_format=CL)
    x = torch.randn(4, 16, 12, 12).contiguous(memory_format=CL)
    a = _mbconv_grads(monkeypatch, "0", op, x)
    b = _mbconv_grads(monkeypatch, "1", op, x)
    def close(u, v, msg=""):  # float rounding, relative to the tensor's scale (the loss is a sum of squares)
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * (1 + float(v.abs().max())), msg=msg)

    close(b[0], a[0])
    close(b[1], a[1])
    for n in a[2]:
        close(b[2][n], a[2][n], msg=n)
    for n in a[3]:
        torch.testing.assert_close(b[3][n], a[3][n], rtol=1e-4, atol=1e-5, msg=n)


def test_conv_bn_relu6_and_state_dict_names_unchanged():
    op = build_op("conv3x3", 3, 8, 2).to(memory_format=CL)
    keys = set(op.state_dict())
    y = op(torch.randn(2, 3, 8, 8).contiguous(memory_format=CL))
    assert y.min() >= 0 and y.max() <= 6
    assert set(op.state_dict()) == keys and int(op.bn.num_batches_tracked) == 1


def test_supernet_architecture_gradients_same_as_aten(monkeypatch):
    torch.manual_seed(2)
    net = SuperNet("tiny_mbconv", 10)
    x = torch.randn(8, net.space.in_channels, 32, 32)
    choices = net.sample_choices("alpha2", torch.Generator().manual_seed(0))
    grads = {}
    for flag, dtype in (("0", torch.float64), ("1", torch.float32)):
        monkeypatch.setenv("DENSENAS_NATIVE", flag)
        n = copy.deepcopy(net).to(dtype)
        for p in n.weight_parameters():
            p.requires_grad_(False)
        loss = F.cross_entropy(n(x.to(dtype), choices), torch.arange(8) % 10)
        grads[flag] = torch.autograd.grad(loss, n.arch_parameters(), allow_unused=True)
    # The reference is aten in float64: each alpha's gradient is a sum over whole feature maps with cancelling
    # terms, and aten's own float32 BatchNorm moved it by 2e-3 (relative) on an AMD EPYC, the kernel by 1e-6.
    scale = max(float(g.abs().max()) for g in grads["0"] if g is not None)
    for ga, gb in zip(grads["0"], grads["1"]):
        if ga is None:
            assert gb is None
        else:
            torch.testing.assert_close(gb.double(), ga, rtol=1e-4, atol=1e-4 * scale)
