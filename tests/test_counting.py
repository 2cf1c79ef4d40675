"""densenas.counting: parameter and multiply-add counts against hand counts and torchvision's MobileNetV2."""
import pytest
import torch
import torchvision
from torch import nn

from densenas.counting import count_macs, count_macs_hooks, count_params


@pytest.fixture(scope="module")
def mobilenet_v2():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2()  # 1000 classes, width 1.0


def test_mobilenet_v2_counts_match_the_published_figures(mobilenet_v2):
    # torchvision's model card: 3.50M parameters, 300.8M multiply-adds at 224x224.
    assert count_params(mobilenet_v2) == 3_504_872
    macs = count_macs(mobilenet_v2, 224)
    assert abs(macs / 1e6 - 300.8) < 0.1, macs


def test_flop_counter_agrees_with_conv_linear_hooks(mobilenet_v2):
    # The meta-device FlopCounterMode count equals a real forward's Conv2d/Linear hook count.
    assert count_macs(mobilenet_v2, 64) == count_macs_hooks(mobilenet_v2, 64)
    assert count_macs(mobilenet_v2, (48, 64), method="hooks") == count_macs(mobilenet_v2, (48, 64))


class _ConvBNAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) + x


def test_depthwise_linear_and_excluded_ops_by_hand():
    dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)  # 8 x 8 x 8 out, 9 MACs each
    assert count_macs(dw, 16, in_channels=8) == 8 * 8 * 8 * 9
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), 2, in_channels=3) == 12 * 5  # bias excluded
    # BN, ReLU, the residual add and the conv bias are not multiply-adds of a Conv2d/Linear.
    assert count_macs(_ConvBNAdd(), 4, in_channels=8) == 4 * 4 * 8 * 8 * 9
    assert count_macs(nn.Conv2d(3, 4, 1), 5, batch_size=2) == 2 * 5 * 5 * 4 * 3


def test_count_params_dedupes_shared_and_skips_buffers():
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, nn.BatchNorm2d(3), lin)
    assert count_params(shared) == 20 + 6  # Linear once, BN affine only (running stats are buffers)
    shared[1].weight.requires_grad_(False)
    assert count_params(shared, trainable_only=True) == 23


def test_counting_leaves_the_module_alone_and_works_on_meta():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    count_macs(model, 8)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.device("meta"):
        meta_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert count_macs(meta_model, 8) == 6 * 6 * 4 * 27
    assert count_params(meta_model) == 4 * 27 + 4 + 8


@pytest.mark.parametrize("bad", [0, -3, (8,), (8, 0), 2.5, True])
def test_bad_input_size_is_named(bad):
    with pytest.raises(ValueError, match="input_size"):
        count_macs(nn.Conv2d(3, 4, 1), bad)
