"""Train-mode BatchNorm2d, optionally followed by ReLU6, as one compiled kernel (opt-in).

aten runs a training BatchNorm and the ReLU6 after it as separate passes over the activation, forward
and backward: BN's backward alone reads its input and its gradient twice, and ReLU6's backward writes a
masked copy of the gradient for BN's backward to read. Inductor (``torch.compile``) fuses them into one
forward and one backward kernel per shape. On the 2-core CPU (channels_last, 2 threads) that made
BN+ReLU6 forward+backward 2.4-3.3x faster than aten's from 8x1152x7x7 to 8x96x112x112
(docs/benchmarks/vs_authors.md has the measurement and the effect on whole search steps).

The cost: a C++ compiler at run time, and a compile per input shape and process (about 2-3 s each;
Inductor caches the kernels on disk, so a later process loads them). Hence opt-in: ``use_fused_bn``
on a module (``SearchConfig.fused_bn``). Results equal aten's up to float rounding (the reduction
order differs); running statistics are updated as ``nn.BatchNorm2d`` updates them.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["batch_norm_act", "fusable", "compiler_available"]

_COMPILED = None
_SHAPE_LIMIT = 1024


def _bn_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
            relu6: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    y = (x - mean[None, :, None, None]) * torch.rsqrt(var + eps)[None, :, None, None]
    if weight is not None:
        y = y * weight[None, :, None, None] + bias[None, :, None, None]
    if relu6:
        y = y.clamp(0.0, 6.0)
    return y, mean, var


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo.config

        # Static shapes: Inductor's kernels for symbolic sizes measured 1.7-2.6x faster than aten's
        # instead of 2.4-3.3x. A super network has a few dozen distinct shapes (times two for the ReLU6
        # flag and the affine variants), and each is one entry of this function's cache, whose default
        # limit is 8.
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, _SHAPE_LIMIT)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, _SHAPE_LIMIT)
        _COMPILED = torch.compile(_bn_act, dynamic=False, fullgraph=True)
    return _COMPILED


def compiler_available() -> bool:
    """Whether Inductor can build CPU kernels here (it needs a C++ compiler)."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def fusable(bn: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    """Whether ``batch_norm_act`` computes what ``bn(x)`` would: training mode with batch statistics,
    a 4-d CPU input with more than one value per channel, in plain eager mode."""
    return (bn.training and x.dim() == 4 and x.device.type == "cpu" and x.numel() > x.shape[1]
            and bn.momentum is not None and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def batch_norm_act(bn: nn.BatchNorm2d, x: torch.Tensor, relu6: bool) -> torch.Tensor:
    """``relu6(bn(x))`` (or ``bn(x)``) in training mode through one compiled kernel; updates ``bn``'s
    running statistics as ``nn.BatchNorm2d`` does (momentum average, unbiased variance)."""
    y, mean, var = _compiled()(x, bn.weight, bn.bias, float(bn.eps), bool(relu6))
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            bn.num_batches_tracked.add_(1)
            m = float(bn.momentum)
            bn.running_mean.mul_(1.0 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1.0 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
    return y
