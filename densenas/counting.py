"""Parameters and multiply-adds (MACs) of any module.

- ``count_params(module)``: distinct parameters (shared tensors counted once; buffers such as BN
  running statistics are not parameters and are not counted).
- ``count_macs(module, input_size, in_channels=3)``: multiply-adds of one forward pass at batch 1,
  counting convolutions and matrix products (Conv2d, Linear) only -- the papers' "FLOPs". BN, ReLU,
  pooling, residual adds and Linear biases are not counted.

How MACs are counted: ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 x MACs), run on the
*meta* device so no arithmetic is done and a 224x224 count costs a few milliseconds of tracing.
It was checked against a Conv2d/Linear forward-hook count (``method="hooks"``, kept here as the
reference and the fallback): identical on torchvision's MobileNetV2 (300,774,272) and on depthwise
convs (its conv formula uses the weight's ``c_in / groups``), and it ignores BN/ReLU/adds. Note it
counts every matmul/conv ATen op, so attention or functional matmuls inside a forward count too.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

__all__ = ["count_params", "count_macs", "count_macs_hooks"]


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters of ``module`` (works on the meta device too)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _input_shape(input_size: int | Sequence[int], in_channels: int, batch_size: int) -> tuple[int, ...]:
    if isinstance(input_size, bool) or not isinstance(input_size, (int, Sequence)):
        raise ValueError(f"input_size must be an int or (height, width), got {input_size!r}")
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(hw) != 2 or any((not isinstance(v, int)) or v < 1 for v in hw):
        raise ValueError(f"input_size must be a positive int or (height, width), got {input_size!r}")
    if in_channels < 1 or batch_size < 1:
        raise ValueError(f"in_channels and batch_size must be >= 1, got {in_channels}, {batch_size}")
    return (batch_size, in_channels, *hw)


class _EvalMode:
    """Temporarily put a module in eval mode (batch-1 BN in train mode refuses 1x1 inputs), then restore."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.modes = {m: m.training for m in module.modules()}

    def __enter__(self) -> nn.Module:
        self.module.eval()
        return self.module

    def __exit__(self, *exc) -> None:
        for m, training in self.modes.items():
            m.training = training


def _flop_counter_macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    # Meta copies of every parameter and buffer: shapes only, the module's own tensors are untouched.
    tensors = {name: torch.empty_like(t, device="meta") for name, t in module.named_parameters()}
    tensors.update({name: torch.empty_like(t, device="meta") for name, t in module.named_buffers()})
    x = torch.zeros(shape, device="meta")
    with _EvalMode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        functional_call(module, tensors, (x,), strict=False)
    flops = counter.get_total_flops()
    return int(flops) // 2


def count_macs_hooks(module: nn.Module, input_size: int | Sequence[int], in_channels: int = 3,
                     batch_size: int = 1) -> int:
    """MACs of Conv2d and Linear layers by forward hooks (a real forward on zeros on the module's device).

    MACs per conv = output elements x (c_in / groups) x kh x kw; per Linear = output elements x in_features.
    """
    shape = _input_shape(input_size, in_channels, batch_size)
    total = 0

    def hook(mod: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        with _EvalMode(module), torch.no_grad():
            module(torch.zeros(shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return total


def count_macs(module: nn.Module, input_size: int | Sequence[int], in_channels: int = 3, batch_size: int = 1,
               method: Literal["flop_counter", "hooks"] = "flop_counter") -> int:
    """Multiply-adds of one forward pass of ``module`` on a ``batch_size x in_channels x H x W`` input.

    ``method="flop_counter"`` (default) traces on the meta device (no compute, works for modules that
    live on the meta device); if the module's forward cannot run on meta tensors it falls back to
    ``"hooks"`` (a real forward on zeros).
    """
    shape = _input_shape(input_size, in_channels, batch_size)
    if method == "hooks":
        return count_macs_hooks(module, input_size, in_channels, batch_size)
    if method != "flop_counter":
        raise ValueError(f"method must be 'flop_counter' or 'hooks', got {method!r}")
    try:
        return _flop_counter_macs(module, shape)
    except (NotImplementedError, RuntimeError):
        # A forward with data-dependent Python (e.g. .item()) cannot run on meta tensors.
        on_meta = any(p.is_meta for p in module.parameters())
        if on_meta:
            raise
        return count_macs_hooks(module, input_size, in_channels, batch_size)
