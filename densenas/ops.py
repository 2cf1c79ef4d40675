"""Op registry of DenseNAS: the candidate layers of the search spaces and the fixed layers around them.

Canonical names (``OP_NAMES``):

- ``mbconv_k{3,5,7}_e{1,3,6}``: MobileNetV2 inverted residual. 1x1 expand + BN + ReLU6 (omitted for
  e1), kxk depthwise (padding k//2, the op's stride) + BN + ReLU6, 1x1 project + BN; identity residual
  exactly when stride is 1 and c_in == c_out. No SE, no dropout, all convs bias=False.
- ``skip``: identity; only valid when stride is 1 and c_in == c_out (a skip stacking layer).
- ``conv3x3``: 3x3 conv + BN + ReLU6 (the stem).
- ``conv1x1``: 1x1 conv + BN + ReLU6 (the last conv before pooling).
- ``basic_block``: ResNet BasicBlock, 3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut (identity, or
  1x1 conv + BN when stride or width change), ReLU.

The authors' release spells expansion ``t`` (``mbconv_k3_t6``), the skip ``skip_connect`` and the last
conv ``conv1_1``; those aliases are accepted everywhere and mapped by ``canonical_op_name``.

Every op module carries ``op_name``, ``c_in``, ``c_out``, ``stride`` (and ``.spec``), so a built network
can be written back to a config without keeping a side table.
"""
from __future__ import annotations

import re
from types import ModuleType
from typing import NamedTuple

import torch
from torch import nn

from densenas import native as _native

__all__ = [
    "OP_NAMES",
    "MBCONV_NAMES",
    "OpSpec",
    "canonical_op_name",
    "parse_mbconv",
    "build_op",
    "MBConv",
    "Skip",
    "ConvBNReLU6",
    "BasicBlock",
    "ReLU6",
    "DepthwiseConv2d",
    "batch_norm_act",
]

MBCONV_NAMES: tuple[str, ...] = tuple(
    f"mbconv_k{k}_e{e}" for k in (3, 5, 7) for e in (1, 3, 6)
)
OP_NAMES: tuple[str, ...] = MBCONV_NAMES + ("skip", "conv3x3", "conv1x1", "basic_block")

# Authors' spellings and other common ones -> canonical name (the mbconv ``_t`` form is a regex).
_ALIASES: dict[str, str] = {
    "skip_connect": "skip",
    "identity": "skip",
    "conv1_1": "conv1x1",
    "conv3_3": "conv3x3",
    "basic": "basic_block",
    "basicblock": "basic_block",
}
_MBCONV_RE = re.compile(r"^mbconv_k(\d+)_[et](\d+)$")


class OpSpec(NamedTuple):
    """What an op module is, enough to rebuild it: ``build_op(*spec)``."""

    op: str
    c_in: int
    c_out: int
    stride: int


def canonical_op_name(name: str) -> str:
    """Map an op name or one of the authors' aliases to its canonical name; ValueError if unknown."""
    if not isinstance(name, str):
        raise ValueError(f"op name must be a string, got {name!r} ({type(name).__name__})")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    m = _MBCONV_RE.match(key)
    if m:
        key = f"mbconv_k{m.group(1)}_e{m.group(2)}"
    if key not in OP_NAMES:
        raise ValueError(
            f"unknown op {name!r}; valid ops are {', '.join(OP_NAMES)} "
            f"(aliases: mbconv_kK_tT for mbconv_kK_eT, {', '.join(sorted(_ALIASES))})"
        )
    return key


def parse_mbconv(name: str) -> tuple[int, int]:
    """(kernel, expansion) of an MBConv op name (any accepted spelling)."""
    canon = canonical_op_name(name)
    m = _MBCONV_RE.match(canon)
    if not m:
        raise ValueError(f"{name!r} is not an MBConv op (expected mbconv_k<k>_e<e>)")
    return int(m.group(1)), int(m.group(2))


class _OpBase(nn.Module):
    """Records (op_name, c_in, c_out, stride) so a module can round-trip through a config."""

    op_name: str
    c_in: int
    c_out: int
    stride: int

    def _record(self, op_name: str, c_in: int, c_out: int, stride: int) -> None:
        self.op_name, self.c_in, self.c_out, self.stride = op_name, int(c_in), int(c_out), int(stride)

    @property
    def spec(self) -> OpSpec:
        return OpSpec(self.op_name, self.c_in, self.c_out, self.stride)

    def extra_repr(self) -> str:
        return f"op={self.op_name}, c_in={self.c_in}, c_out={self.c_out}, stride={self.stride}"


def _bn(c: int, affine: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, affine=affine)


def _eager() -> bool:
    """Plain eager mode: the custom kernels below apply. Tracing, scripting, compiling and ONNX export
    see the stock ops instead."""
    return (not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
            and not torch.onnx.is_in_onnx_export())


def _eager_autograd() -> bool:
    """Recording a graph in plain eager mode: the custom autograd functions below apply."""
    return torch.is_grad_enabled() and _eager()


class _BatchNormActFn(torch.autograd.Function):
    """Training BatchNorm2d (+ ReLU6) by ``densenas.native``'s kernel. The backward recomputes the ReLU6
    mask from the input and the per-channel affine (bit for bit the forward's pre-activation), so it
    reads neither the output nor a saved mask."""

    @staticmethod
    def forward(ctx, kernel, x, weight, bias, running_mean, running_var, momentum, eps,  # type: ignore[override]
                relu6):
        out, mean, invstd, affine = kernel.forward(x, weight, bias, running_mean, running_var, momentum, eps, relu6)
        ctx.kernel, ctx.relu6 = kernel, relu6
        ctx.save_for_backward(x, affine if relu6 else None, mean, invstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, affine, mean, invstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gi, gw, gb = ctx.kernel.backward(grad, x, affine, mean, invstd, weight, ctx.relu6, need[1], need[2], need[3])
        return None, gi, gw, gb, None, None, None, None, None


def batch_norm_act(x: torch.Tensor, bn: nn.BatchNorm2d, relu6: bool,
                   scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """``bn(x)`` (then an in-place ReLU6 when ``relu6``; or ``scale * bn(x)`` with a scalar tensor ``scale``,
    which then is part of the graph) by the fused native kernel, or None where it does not apply; the
    caller then runs the modules as usual.

    Applies to batch statistics (training, or no running statistics) of a 4-d float32 CPU tensor in
    channels_last, in eager mode, with the native kernel available. Why: aten runs BatchNorm and the
    ReLU6 after it as four memory passes forward and three backward, each its own op; the kernel makes
    them two each way (measured 1.6-3.8x faster on the super network's shapes, 2 threads, including the
    ReLU6: docs/benchmarks/vs_authors_raw/2026-12-04_native_bn/). Same results up to float rounding.
    """
    if not (bn.training or not bn.track_running_stats) or bn.momentum is None:
        return None
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or x.shape[0] * x.shape[2] * x.shape[3] < 2:
        return None
    if not x.is_contiguous(memory_format=torch.channels_last) or not _eager():
        return None
    kernel = _native.bn_act()
    if kernel is None:
        return None
    track = bn.track_running_stats and bn.running_mean is not None
    if track and bn.training:
        bn.num_batches_tracked.add_(1)
    rm, rv = (bn.running_mean, bn.running_var) if track and bn.training else (None, None)
    w, b = bn.weight, bn.bias
    if scale is not None:
        if relu6:
            raise ValueError("batch_norm_act: a scale folds into BatchNorm only without the ReLU6 after it")
        # scale * (w * xhat + b) = (scale * w) * xhat + scale * b: the per-channel weight carries it.
        w = scale.expand(x.shape[1]).contiguous() if w is None else w * scale
        b = None if b is None else b * scale
    if torch.is_grad_enabled() and (x.requires_grad or (w is not None and w.requires_grad)
                                    or (b is not None and b.requires_grad)):
        return _BatchNormActFn.apply(kernel, x, w, b, rm, rv, float(bn.momentum), float(bn.eps), relu6)
    return kernel.forward(x, w, b, rm, rv, float(bn.momentum), float(bn.eps), relu6)[0]


def _run_layers(layers: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    """Run ``layers`` in order, each BatchNorm2d (+ the ReLU6 right after it) by ``batch_norm_act``
    where it applies."""
    i, n = 0, len(layers)
    while i < n:
        m = layers[i]
        if isinstance(m, nn.BatchNorm2d):
            relu6 = i + 1 < n and isinstance(layers[i + 1], ReLU6)
            y = batch_norm_act(x, m, relu6)
            if y is not None:
                x = y
                i += 2 if relu6 else 1
                continue
        x = m(x)
        i += 1
    return x


class _ReLU6InplaceFn(torch.autograd.Function):
    """In-place ReLU6 whose backward reads the output: ``0 < out < 6`` exactly when ``0 < x < 6``
    (NaN stays NaN and gets a zero gradient either way), so the gradient is aten's bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x.clamp_(0.0, 6.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, out, 0.0, 6.0)


class ReLU6(nn.ReLU6):
    """``nn.ReLU6(inplace=True)`` without autograd's copy of the input.

    Autograd's ``hardtanh_`` saves the pre-activation, so under autograd the in-place op clones every
    activation before clamping it: one extra tensor kept per ReLU6 until backward, plus a copy pass
    (about 6% of a 224x224 architecture step's time, measured). Its backward only needs the output,
    which the next conv saves anyway; this one saves that. Without autograd (no grad, an input that
    needs none) and while tracing / exporting / compiling it is the plain in-place ``hardtanh_``.
    """

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and _eager_autograd():
            return _ReLU6InplaceFn.apply(x)
        return super().forward(x)


def _dw_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """A depthwise conv's weight gradient as one grouped forward conv over (sample, channel) pairs:
    ``gw[c] = sum_n corr(pad(x[n, c]), grad[n, c])``, the output gradient as the kernel (dilated by
    the stride), cropped to ``kernel x kernel``, summed over the batch."""
    n, c, h, w = x.shape
    xs = x.contiguous().view(1, n * c, h, w)
    gs = grad.contiguous().view(n * c, 1, grad.shape[2], grad.shape[3])
    out = torch.nn.functional.conv2d(xs, gs, None, 1, padding, stride, n * c)[:, :, :kernel, :kernel]
    return out.reshape(n, c, kernel, kernel).sum(0).unsqueeze(1)


class _DepthwiseConvFn(torch.autograd.Function):
    """A depthwise conv whose weight gradient comes from ``kernel`` (``densenas.native.dw_conv()``) or, when
    it is None, from the grouped-conv form; the input gradient is oneDNN's."""

    @staticmethod
    def forward(ctx, kernel, x, weight, stride, padding):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.kernel, ctx.stride, ctx.padding = kernel, stride, padding
        return torch.nn.functional.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        s, p, k = ctx.stride, ctx.padding, weight.shape[-1]
        gi = gw = None
        if ctx.needs_input_grad[1]:
            gi = torch.ops.aten.convolution_backward(grad, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0],
                                                     weight.shape[0], [True, False, False])[0]
        if ctx.needs_input_grad[2]:
            if ctx.kernel is not None:
                gw = ctx.kernel.weight_grad(x, grad.contiguous(memory_format=torch.channels_last), k, s, p)
            else:
                gw = _dw_weight_grad(x, grad, k, s, p).to(weight.dtype)
        return None, gi, gw, None, None


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)`` (same parameters, same forward) whose
    weight gradient, for k >= 5 on CPU, comes from ``densenas.native``'s kernel (channels_last float32
    input) or else, on maps up to 32x32, from a grouped forward conv.

    oneDNN's depthwise weight-gradient kernel is 10-15x slower than its input-gradient kernel of the
    same FLOPs for 5x5 and 7x7 kernels on CPU (measured, torch 2.14: 8x768x14x14, 7x7: 54 ms vs 3.9 ms;
    32x1152x2x2, 5x5: 12.9 ms). The native kernel, row dot products per kernel tap with the sums in
    registers, ran 3.3-81x faster than it on 5x5 / 7x7 and 1.4-42x faster than the grouped-conv form
    (docs/benchmarks/vs_authors_raw/2026-12-05_native_dw/); for 3x3 kernels oneDNN's is about as fast,
    so it keeps them. Without the kernel, the grouped-conv form (1.5-8x faster than oneDNN for 5x5 /
    7x7 on maps up to 32x32, slower elsewhere) serves those maps. Same gradient up to float rounding.
    """

    def __init__(self, channels: int, kernel: int, stride: int):
        super().__init__(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)

    def _weight_grad_route(self, x: torch.Tensor) -> tuple[bool, ModuleType | None]:
        """(whether the weight gradient avoids oneDNN's, the native kernel that computes it or None)."""
        # CPU only: the measurements behind it are oneDNN's kernels; cuDNN's depthwise kernels are its own.
        if x.device.type != "cpu" or self.kernel_size[0] < 5 or x.dim() != 4:
            return False, None
        kernel = (_native.dw_conv() if x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
                  else None)
        return kernel is not None or max(x.shape[-2:]) <= 32, kernel

    def fast_weight_grad(self, x: torch.Tensor) -> bool:
        return self._weight_grad_route(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad and _eager_autograd():
            fast, kernel = self._weight_grad_route(x)
            if fast:
                return _DepthwiseConvFn.apply(kernel, x, self.weight, self.stride[0], self.padding[0])
        return super().forward(x)


class MBConv(_OpBase):
    """Inverted residual (MobileNetV2): [1x1 expand-BN-ReLU6] -> kxk dw-BN-ReLU6 -> 1x1 project-BN."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, expansion: int,
                 bn_affine: bool = True):
        super().__init__()
        self._record(f"mbconv_k{kernel}_e{expansion}", c_in, c_out, stride)
        self.kernel, self.expansion = kernel, expansion
        mid = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, mid, 1, bias=False), _bn(mid, bn_affine), ReLU6()]
        layers += [
            DepthwiseConv2d(mid, kernel, stride),
            _bn(mid, bn_affine),
            ReLU6(),
            nn.Conv2d(mid, c_out, 1, bias=False),
            _bn(c_out, bn_affine),
        ]
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, residual: bool = True) -> torch.Tensor:
        """``body(x) (+ x)``; with a scalar tensor ``scale``, ``scale * body(x) (+ x unscaled)``, the scale
        folded into the last BatchNorm's weight: a super network's mixed op weights each op's output,
        and folded that costs no pass over the feature map forward or backward (its gradient comes from
        BatchNorm's). ``residual=False`` leaves the residual to the caller (``MixedOp`` adds it once)."""
        layers = tuple(self.body)
        if scale is None:
            out = _run_layers(layers, x)
        else:
            y = _run_layers(layers[:-1], x)
            out = batch_norm_act(y, layers[-1], False, scale)
            out = layers[-1](y) * scale if out is None else out
        return out + x if residual and self.use_residual else out


class Skip(_OpBase):
    """Identity layer: a stacking layer that is skipped."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if stride != 1 or c_in != c_out:
            raise ValueError(
                f"skip is only valid with stride 1 and c_in == c_out, got c_in={c_in}, c_out={c_out}, "
                f"stride={stride}; use it only in stacking layers (heads change width/stride)"
            )
        self._record("skip", c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ConvBNReLU6(_OpBase):
    """kxk conv + BN + ReLU6: ``conv3x3`` (stem) and ``conv1x1`` (last conv)."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, bn_affine: bool = True):
        super().__init__()
        self._record(f"conv{kernel}x{kernel}", c_in, c_out, stride)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = _bn(c_out, bn_affine)
        self.act = ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = batch_norm_act(y, self.bn, True)
        return self.act(self.bn(y)) if out is None else out


class BasicBlock(_OpBase):
    """ResNet BasicBlock: conv3x3-BN-ReLU, conv3x3-BN, + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn_affine: bool = True):
        super().__init__()
        self._record("basic_block", c_in, c_out, stride)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _bn(c_out, bn_affine)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _bn(c_out, bn_affine)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _bn(c_out, bn_affine)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def build_op(name: str, c_in: int, c_out: int, stride: int, bn_affine: bool = True) -> nn.Module:
    """Build the op ``name`` (canonical or alias) mapping c_in channels to c_out at the given stride.

    ``bn_affine=False`` gives BatchNorm without scale/shift, as in the super network.
    """
    op = canonical_op_name(name)
    if stride not in (1, 2):
        raise ValueError(f"op {op!r}: stride must be 1 or 2, got {stride}")
    if c_in < 1 or c_out < 1:
        raise ValueError(f"op {op!r}: channel counts must be positive, got c_in={c_in}, c_out={c_out}")
    if op.startswith("mbconv_"):
        k, e = parse_mbconv(op)
        return MBConv(c_in, c_out, stride, k, e, bn_affine)
    if op == "skip":
        return Skip(c_in, c_out, stride)
    if op == "conv3x3":
        return ConvBNReLU6(c_in, c_out, stride, 3, bn_affine)
    if op == "conv1x1":
        return ConvBNReLU6(c_in, c_out, stride, 1, bn_affine)
    if op == "basic_block":
        return BasicBlock(c_in, c_out, stride, bn_affine)
    raise AssertionError(f"op {op!r} is registered but has no builder")  # pragma: no cover
