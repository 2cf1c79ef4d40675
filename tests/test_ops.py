"""Op registry: names and aliases, output shapes, the residual rule, parameter structure."""
import pytest
import torch
from torch import nn

from densenas.ops import OP_NAMES, OpSpec, build_op, canonical_op_name


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("alias,canon", [
    ("mbconv_k3_t6", "mbconv_k3_e6"), ("mbconv_k7_t1", "mbconv_k7_e1"), ("mbconv_k5_e3", "mbconv_k5_e3"),
    ("skip_connect", "skip"), ("conv1_1", "conv1x1"), ("conv3_3", "conv3x3"), ("basic_block", "basic_block"),
])
def test_aliases(alias, canon):
    assert canonical_op_name(alias) == canon


def test_unknown_op_lists_valid_ones():
    with pytest.raises(ValueError, match="mbconv_k3_e3") as e:
        build_op("sep_conv_3x3", 8, 8, 1)
    assert "sep_conv_3x3" in str(e.value)
    with pytest.raises(ValueError):
        canonical_op_name("mbconv_k9_e3")


@pytest.mark.parametrize("name", [n for n in OP_NAMES if n != "skip"])
@pytest.mark.parametrize("c_in,c_out,stride", [(8, 8, 1), (8, 12, 2), (8, 12, 1)])
def test_shapes(name, c_in, c_out, stride):
    op = build_op(name, c_in, c_out, stride)
    y = op(torch.randn(2, c_in, 8, 8))
    assert y.shape == (2, c_out, 8 // stride, 8 // stride)
    assert op.spec == OpSpec(name, c_in, c_out, stride)


def test_mbconv_structure_and_residual():
    # e1: no expand conv; depthwise 3x3 on 16 + project 16->16, BN affine adds 2*16 + 2*16.
    op = build_op("mbconv_k3_t1", 16, 16, 1)
    assert op.use_residual
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(c.bias is None for c in convs)
    assert n_params(op) == 16 * 9 + 16 * 16 + 4 * 16
    # e6, k5: 8 -> 48 expand, dw 5x5, project 48 -> 8; no affine BN -> conv weights only.
    op = build_op("mbconv_k5_e6", 8, 8, 1, bn_affine=False)
    assert n_params(op) == 8 * 48 + 48 * 25 + 48 * 8
    # residual exactly when stride 1 and same width: zeroing the body leaves the identity.
    for (ci, co, s, res) in [(8, 8, 1, True), (8, 8, 2, False), (8, 16, 1, False)]:
        op = build_op("mbconv_k3_e3", ci, co, s).eval()
        assert op.use_residual is res
        for m in op.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.zeros_(m.weight)
        x = torch.randn(1, ci, 8, 8)
        y = op(x)
        assert torch.allclose(y, x) if res else torch.count_nonzero(y) == 0


def test_skip_rule():
    op = build_op("skip_connect", 8, 8, 1)
    x = torch.randn(1, 8, 4, 4)
    assert op(x) is x and n_params(op) == 0
    with pytest.raises(ValueError, match="stride 1 and c_in == c_out"):
        build_op("skip", 8, 16, 1)
    with pytest.raises(ValueError, match="stride 1"):
        build_op("skip", 8, 8, 2)


def test_basic_block_shortcut():
    same = build_op("basic_block", 16, 16, 1)
    assert isinstance(same.shortcut, nn.Identity)
    assert n_params(same) == 2 * 16 * 16 * 9 + 4 * 16
    down = build_op("basic_block", 16, 32, 2)
    assert n_params(down) == 16 * 32 * 9 + 32 * 32 * 9 + 16 * 32 + 6 * 32
    assert build_op("basic_block", 16, 16, 2).shortcut is not None


def test_conv_ops():
    stem = build_op("conv3x3", 3, 16, 2, bn_affine=False)
    assert n_params(stem) == 3 * 16 * 9
    with torch.no_grad():
        y = stem(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 16, 16, 16) and float(y.max()) <= 6.0 and float(y.min()) >= 0.0
    assert n_params(build_op("conv1_1", 384, 1984, 1, bn_affine=False)) == 384 * 1984
