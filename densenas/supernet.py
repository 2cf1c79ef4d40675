"""The DenseNAS super network: every head and stacking layer a mixed op, every block edge weighted.

Structure (parameter names are stable; checkpoints depend on them)::

    stem                      fixed conv3x3 (BN affine, as in the authors' super net)
    first_layer               fixed first layer (nn.Identity when the space has none)
    blocks.<j>.heads.from_<i> MixedOp over head_ops for edge i->j (stride and width change of the edge)
    blocks.<j>.stack.<l>      MixedOp over stacking_ops (incl. skip) for stacking layer l of block j
    final_convs.block_<b>     one 1x1 conv branch per final block b (-> last_conv_channels)
    classifier                Linear(last_conv_channels, classes); without a last conv one
    classifiers.block_<b>     Linear(width_b, classes) per final block instead
    betas.<i>                 block i's logits over ``space.out_edges(i)`` (final blocks: the last
                              entry is the edge to the final conv)

Forward: block j's input is ``sum over in-edges (i, j) of p(i->j) * head_ij(x_i)`` with
``p(i->j) = softmax(betas[i])[position of (i, j) in out_edges(i)]``; then its stacking layers;
the final blocks' branches are summed the same way (weighted by p(b->end)) before pooling.
A mixed op runs only the ops in its choice; with several chosen ops their outputs are mixed by
softmax over those ops' alphas (with one op, the op's output as is). The weights (and a head's
p(i->j)) are folded into each op's last BatchNorm rather than multiplied onto its output
(``MixedOp.forward``): the same function, without a pass over the feature map per weight.

``channels_last=True`` (default) keeps weights and activations in NHWC: oneDNN's depthwise convs
are several times faster that way on CPU. Parameter names and values are unaffected.

``arch_grad=False`` (the weight step) computes every probability without autograd, so no graph is
built through alpha/beta and backward does no work for them.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densenas.ops import MBConv, Skip, build_op
from densenas.space import SearchSpace, load_space

__all__ = ["MixedOp", "SuperBlock", "SuperNet", "Choices", "SAMPLE_MODES"]

SAMPLE_MODES = ("uniform1", "alpha1", "alpha2", "all")


class Choices(tuple):
    """One tuple of op indices per mixed op, in ``SuperNet.mixed_ops`` order."""

    def __new__(cls, per_op: Sequence[Sequence[int]]):
        return super().__new__(cls, (tuple(int(i) for i in c) for c in per_op))

    def count(self) -> int:  # type: ignore[override]
        """Total number of ops that a forward with these choices runs."""
        return sum(len(c) for c in self)


class MixedOp(nn.Module):
    """A layer choosing among candidate ops; ``alpha`` holds one logit per op."""

    def __init__(self, op_names: Sequence[str], c_in: int, c_out: int, stride: int, bn_affine: bool,
                 kind: str, block: int, edge: tuple[int, int] | None = None, layer: int | None = None):
        super().__init__()
        self.op_names = tuple(op_names)
        self.kind, self.block, self.edge, self.layer = kind, block, edge, layer
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.ops = nn.ModuleList(build_op(n, c_in, c_out, stride, bn_affine) for n in self.op_names)
        self.alpha = nn.Parameter(torch.zeros(len(self.op_names)))
        self.skip_index = self.op_names.index("skip") if "skip" in self.op_names else None
        self._all = tuple(range(len(self.op_names)))

    def forward(self, x: torch.Tensor, choice: Sequence[int], arch_grad: bool = True,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale * sum_k softmax(alpha[choice])_k * op_k(x)`` (no scale: 1; one chosen op: its output).

        Each op's weight is folded into its last BatchNorm (``MBConv.forward``'s ``scale``) and the residual
        ``x`` is added once: its coefficient, the sum of the residual ops' weights, is ``scale`` itself
        when every chosen op is residual or skip (their softmax weights sum to 1), so no pass over the
        feature map multiplies by a weight. The same function as weighting each op's output.
        """
        if len(choice) == 1 and scale is None:
            return self.ops[choice[0]](x)
        if len(choice) == 1:
            w: Sequence[torch.Tensor] = (scale,)
        else:
            if len(choice) == len(self.op_names) and tuple(choice) == self._all:
                logits = self.alpha
            else:
                logits = self.alpha[list(choice)]
            if arch_grad:
                w = F.softmax(logits, dim=0)
            else:
                with torch.no_grad():
                    w = F.softmax(logits, dim=0)
            if scale is not None:
                w = w * scale
        out = None
        residual: list[torch.Tensor] = []
        for k, i in enumerate(choice):
            op = self.ops[i]
            if isinstance(op, Skip):
                op(x)  # the identity: called so that the module's hooks see it run
                residual.append(w[k])
                continue
            if isinstance(op, MBConv):
                y = op(x, scale=w[k], residual=False)
                if op.use_residual:
                    residual.append(w[k])
            else:
                y = w[k] * op(x)
            out = y if out is None else out + y
        if residual:
            if len(residual) == len(choice):
                r = x if scale is None else scale * x
            else:
                r = torch.stack(list(residual)).sum() * x
            out = r if out is None else out + r
        return out

    def extra_repr(self) -> str:
        where = f"edge={self.edge}" if self.kind == "head" else f"block={self.block}, layer={self.layer}"
        return f"kind={self.kind}, {where}, c_in={self.c_in}, c_out={self.c_out}, stride={self.stride}"


class SuperBlock(nn.Module):
    """One routing block: a head mixed op per in-edge and its stacking mixed ops."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.heads = nn.ModuleDict()
        self.stack = nn.ModuleList()


class SuperNet(nn.Module):
    """The densely connected super network of a ``SearchSpace`` (see the module docstring)."""

    def __init__(self, space: SearchSpace | str | dict, num_classes: int, bn_affine: bool = False,
                 channels_last: bool = True):
        super().__init__()
        space = load_space(space)
        self.space, self.num_classes, self.bn_affine = space, int(num_classes), bn_affine
        self.channels_last = channels_last
        blocks = space.blocks

        # Fixed layers. The stem keeps an affine BN like the authors' super net (90,430,100 weights).
        self.stem = build_op(space.stem.op, space.in_channels, space.stem.out, space.stem.stride, True)
        if space.first_layer is not None:
            fl = space.first_layer
            self.first_layer: nn.Module = build_op(fl.op, space.stem.out, fl.out, fl.stride, bn_affine)
        else:
            self.first_layer = nn.Identity()

        # Blocks, in block order; inside a block the heads (nearest source first), then stacking layers.
        self.blocks = nn.ModuleList()
        mixed: list[MixedOp] = []
        for b in blocks:
            sb = SuperBlock(b.index)
            if b.index > 0:
                for (i, j, s) in space.in_edges(b.index):
                    op = MixedOp(space.head_ops, blocks[i].width, b.width, s, bn_affine, "head", j, edge=(i, j))
                    sb.heads[f"from_{i}"] = op
                    mixed.append(op)
                for l in range(b.n_stacking):
                    op = MixedOp(space.stacking_ops, b.width, b.width, 1, bn_affine, "stack", b.index, layer=l)
                    sb.stack.append(op)
                    mixed.append(op)
            self.blocks.append(sb)
        self.mixed_ops: list[MixedOp] = mixed  # a plain list: the modules are registered under blocks

        # Final branches: 1x1 conv per final block, shared pool + classifier; or per-block classifiers.
        last = space.last_conv_channels
        if last is not None:
            self.final_convs = nn.ModuleDict(
                {f"block_{b}": build_op("conv1x1", blocks[b].width, last, 1, bn_affine) for b in space.final_blocks})
            self.classifier = nn.Linear(last, self.num_classes)
        else:
            self.classifiers = nn.ModuleDict(
                {f"block_{b}": nn.Linear(blocks[b].width, self.num_classes) for b in space.final_blocks})

        self.betas = nn.ParameterList(
            nn.Parameter(torch.zeros(len(space.out_edges(b.index)))) for b in blocks)

        # Static routing tables, so forward does no graph queries: for each block j,
        # [(source block, beta index of source, position in its out_edges, head module)].
        self._edge_pos = {}
        for b in blocks:
            for pos, (i, j, _) in enumerate(space.out_edges(b.index)):
                self._edge_pos[(i, j)] = pos
        self._routes: list[list[tuple[int, int, MixedOp]]] = [[] for _ in blocks]
        self._mixed_index = {id(m): k for k, m in enumerate(mixed)}
        for b in blocks[1:]:
            for (i, j, _) in space.in_edges(b.index):
                self._routes[j].append((i, self._edge_pos[(i, j)], self.blocks[j].heads[f"from_{i}"]))
        self._final = [(b, self._edge_pos[(b, space.end_node)]) for b in space.final_blocks]
        # Index of each block's first mixed op in ``mixed_ops`` (heads then stack, contiguous).
        self._block_slices: list[tuple[int, int]] = []
        k = 0
        for b in blocks:
            n = len(self.blocks[b.index].heads) + len(self.blocks[b.index].stack)
            self._block_slices.append((k, k + n))
            k += n
        if channels_last:
            # Depthwise convs (and their backward) run 3-30x faster in channels_last on CPU oneDNN
            # (measured, torch 2.14: e.g. dw 7x7 on 144@16, batch 32: 132 ms NCHW vs 36 ms NHWC).
            self.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------- parameters
    def arch_parameters(self) -> list[nn.Parameter]:
        """Alphas of every mixed op (``mixed_ops`` order), then the betas (block order)."""
        return [m.alpha for m in self.mixed_ops] + list(self.betas)

    def named_arch_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        arch = {id(p) for p in self.arch_parameters()}
        return ((n, p) for n, p in self.named_parameters() if id(p) in arch)

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        arch = {id(p) for p in self.arch_parameters()}
        return ((n, p) for n, p in self.named_parameters() if id(p) not in arch)

    def edge_probs(self) -> dict[tuple[int, int], torch.Tensor]:
        """p(src -> dst) = softmax(betas[src]) at the edge's position; final edges have dst == end_node."""
        out = {}
        for i, beta in enumerate(self.betas):
            probs = F.softmax(beta, dim=0)
            for pos, (_, j, _) in enumerate(self.space.out_edges(i)):
                out[(i, j)] = probs[pos]
        return out

    def op_probs(self) -> list[torch.Tensor]:
        """softmax(alpha) of every mixed op, in ``mixed_ops`` order."""
        return [F.softmax(m.alpha, dim=0) for m in self.mixed_ops]

    # ----------------------------------------------------------------- sampling
    def sample_choices(self, mode: str = "uniform1", generator: torch.Generator | None = None) -> Choices:
        """Which ops each mixed op runs in the next forward.

        ``uniform1``: one op uniformly; ``alpha1``: one op from softmax(alpha); ``alpha2``: two distinct
        ops from softmax(alpha) (one when the op has a single candidate); ``all``: every op.
        """
        if mode == "all":
            return Choices(tuple(range(len(m.op_names))) for m in self.mixed_ops)
        if mode == "uniform1":
            # One draw for all mixed ops: floor(u * n_ops) is uniform over each op's candidates.
            u = torch.rand(len(self.mixed_ops), generator=generator, dtype=torch.float64).tolist()
            return Choices((min(int(x * len(m.op_names)), len(m.op_names) - 1),)
                           for x, m in zip(u, self.mixed_ops))
        if mode in ("alpha1", "alpha2"):
            k = 1 if mode == "alpha1" else 2
            out = []
            with torch.no_grad():
                for m in self.mixed_ops:
                    n = min(k, len(m.op_names))
                    probs = F.softmax(m.alpha.detach().float().cpu(), dim=0)
                    idx = torch.multinomial(probs, n, replacement=False, generator=generator)
                    out.append(tuple(sorted(idx.tolist())))
            return Choices(out)
        raise ValueError(f"unknown sampling mode {mode!r}; use one of {', '.join(SAMPLE_MODES)}")

    def check_choices(self, choices: Sequence[Sequence[int]]) -> None:
        """Raise ValueError if ``choices`` does not fit this super network."""
        if len(choices) != len(self.mixed_ops):
            raise ValueError(f"choices has {len(choices)} entries but the super network has "
                             f"{len(self.mixed_ops)} mixed ops; sample them with sample_choices()")
        for k, (c, m) in enumerate(zip(choices, self.mixed_ops)):
            if not c or len(set(c)) != len(c) or any(not 0 <= i < len(m.op_names) for i in c):
                raise ValueError(f"choices[{k}] = {tuple(c)} is not a non-empty set of distinct op indices "
                                 f"in [0, {len(m.op_names)}) for mixed op {m.kind} {m.edge or (m.block, m.layer)}")

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, choices: Sequence[Sequence[int]] | None = None,
                arch_grad: bool = True) -> torch.Tensor:
        """Logits for ``x`` with the given op choices (``None``: every op, as mode ``all``).

        ``arch_grad=False``: architecture parameters take no part in autograd (the weight step).
        """
        if choices is None:
            choices = self.sample_choices("all")
        elif len(choices) != len(self.mixed_ops):
            self.check_choices(choices)
        if arch_grad:
            probs = [F.softmax(b, dim=0) for b in self.betas]
        else:
            with torch.no_grad():
                probs = [F.softmax(b, dim=0) for b in self.betas]

        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.first_layer(self.stem(x))
        outs: list[torch.Tensor | None] = [x] + [None] * (len(self.blocks) - 1)
        for j in range(1, len(self.blocks)):
            start, _ = self._block_slices[j]
            k = start
            h = None
            for (i, pos, head) in self._routes[j]:
                y = head(outs[i], choices[k], arch_grad, scale=probs[i][pos])
                h = y if h is None else h + y
                k += 1
            for layer in self.blocks[j].stack:
                h = layer(h, choices[k], arch_grad)
                k += 1
            outs[j] = h

        if self.space.last_conv_channels is not None:
            z = None
            for (b, pos) in self._final:
                y = probs[b][pos] * self.final_convs[f"block_{b}"](outs[b])
                z = y if z is None else z + y
            return self.classifier(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))
        logits = None
        for (b, pos) in self._final:
            y = probs[b][pos] * self.classifiers[f"block_{b}"](torch.flatten(F.adaptive_avg_pool2d(outs[b], 1), 1))
            logits = y if logits is None else logits + y
        return logits

    def extra_repr(self) -> str:
        return (f"space={self.space.name!r} ({self.space.space_hash()[:12]}), classes={self.num_classes}, "
                f"mixed_ops={len(self.mixed_ops)}, bn_affine={self.bn_affine}")
