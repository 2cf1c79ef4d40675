"""Derivation of DenseNAS: the most probable block path (Viterbi) and argmax ops -> an architecture.

- ``viterbi_path(space, edge_probs)``: max-product over the block graph from block 0 to the end;
  a path's probability is the product of ``p(src -> dst)`` along it, the final edge (last block ->
  final 1x1 conv) included. Returns the block indices, block 0 first, a final block last.
- ``k_best_paths(space, edge_probs, k)``: the k most probable paths (exact, DP over top-k lists).
- ``best_path_within(space, edge_probs, edge_costs, fixed, budget)``: the most probable path whose
  cost stays within ``budget`` (exact branch and bound over the DAG, pruned by the cheapest and the
  most probable completion of every prefix).
- ``argmax_ops(supernet)``: per mixed op, the index of its largest alpha.
- ``derive(supernet, cost_model)`` -> ``Derivation`` (path, ops, the ``densenas.arch.Arch``, path
  probability, predicted cost); ``derive_arch(supernet, ...) -> Arch``.

A stacking layer whose argmax is ``skip`` is removed from the architecture; a head always stays.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from densenas.space import SearchSpace, load_space

__all__ = [
    "viterbi_path",
    "k_best_paths",
    "best_path_within",
    "path_log_prob",
    "argmax_ops",
    "Derivation",
    "derive",
    "derive_arch",
    "official_string",
]


def _log_probs(space: SearchSpace, edge_probs: Mapping[tuple[int, int], Any]) -> dict[tuple[int, int], float]:
    """log p per edge of the space; every edge must be given, probabilities in [0, 1]."""
    out = {}
    missing = []
    for (i, j, _) in space.edges:
        if (i, j) not in edge_probs:
            missing.append((i, j))
            continue
        p = edge_probs[(i, j)]
        p = float(p.detach()) if isinstance(p, torch.Tensor) else float(p)
        if not (0.0 <= p <= 1.0 + 1e-6) or math.isnan(p):
            raise ValueError(f"edge probability p{(i, j)} = {p} is not in [0, 1]")
        out[(i, j)] = math.log(p) if p > 0 else -math.inf
    if missing:
        raise ValueError(f"edge_probs lacks {len(missing)} edge(s) of the space: {missing[:6]}; "
                         "pass SuperNet.edge_probs() (final edges have dst == space.end_node)")
    return out


def path_log_prob(space: SearchSpace, edge_probs: Mapping[tuple[int, int], Any], path: Sequence[int]) -> float:
    """log of the product of edge probabilities along ``path`` (its final edge included)."""
    lp = _log_probs(space, edge_probs)
    return sum(lp[e] for e in zip(path, list(path[1:]) + [space.end_node]))


def viterbi_path(space: SearchSpace | str | Mapping, edge_probs: Mapping[tuple[int, int], Any]) -> list[int]:
    """The most probable block path (max-product Viterbi), block 0 first. Ties go to the smaller block."""
    space = load_space(space)
    lp = _log_probs(space, edge_probs)
    end = space.end_node
    best = [-math.inf] * (end + 1)
    back = [-1] * (end + 1)
    best[0] = 0.0
    for (i, j, _) in space.edges:  # sorted by source: every source is final before it is read
        score = best[i] + lp[(i, j)]
        if score > best[j]:
            best[j], back[j] = score, i
    path, node = [], back[end]
    while node != -1:
        path.append(node)
        node = back[node]
    return path[::-1]


def k_best_paths(space: SearchSpace | str | Mapping, edge_probs: Mapping[tuple[int, int], Any],
                 k: int) -> list[tuple[list[int], float]]:
    """The ``k`` most probable paths as (path, probability), most probable first (exact)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    space = load_space(space)
    lp = _log_probs(space, edge_probs)
    end = space.end_node
    # top[j]: up to k (log prob, path to j) pairs, best first.
    top: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(end + 1)]
    top[0] = [(0.0, (0,))]
    for j in range(1, end + 1):
        cands = [(s + lp[(i, j)], p + (j,)) for (i, _, _) in space.in_edges(j) for (s, p) in top[i]]
        top[j] = heapq.nsmallest(k, cands, key=lambda c: (-c[0], c[1]))
    return [(list(p[:-1]), math.exp(s)) for (s, p) in top[end] if s > -math.inf]


def best_path_within(space: SearchSpace | str | Mapping, edge_probs: Mapping[tuple[int, int], Any],
                     edge_costs: Mapping[tuple[int, int], float], budget: float,
                     fixed: float = 0.0) -> tuple[list[int], float, float] | None:
    """The most probable path whose cost ``fixed + sum(edge_costs along it)`` is <= ``budget``.

    Returns (path, probability, cost), or None when even the cheapest path is over budget.
    Exact: depth-first branch and bound, pruning a prefix when its cheapest completion is over
    budget or its most probable completion cannot beat the best path found so far.
    """
    space = load_space(space)
    lp = _log_probs(space, edge_probs)
    end = space.end_node
    out = {i: [(j, lp[(i, j)], float(edge_costs[(i, j)])) for (_, j, _) in space.out_edges(i)]
           for i in range(end)}
    min_cost = [math.inf] * (end + 1)
    max_lp = [-math.inf] * (end + 1)
    min_cost[end], max_lp[end] = 0.0, 0.0
    for i in range(end - 1, -1, -1):
        min_cost[i] = min(c + min_cost[j] for (j, _, c) in out[i])
        max_lp[i] = max(l + max_lp[j] for (j, l, _) in out[i])
    if fixed + min_cost[0] > budget:
        return None
    # Visit the most probable continuation first, so good incumbents come early.
    for i in out:
        out[i].sort(key=lambda t: -(t[1] + max_lp[t[0]]))
    best: list[Any] = [-math.inf, None, None]
    stack = [(0, 0.0, fixed, (0,))]
    while stack:
        node, score, cost, path = stack.pop()
        for (j, l, c) in reversed(out[node]):
            s, cc = score + l, cost + c
            if cc + min_cost[j] > budget + 1e-12 or s + max_lp[j] <= best[0]:
                continue
            if j == end:
                best[:] = [s, list(path), cc]
            else:
                stack.append((j, s, cc, path + (j,)))
    if best[1] is None:
        return None
    return best[1], math.exp(best[0]), best[2]


def argmax_ops(supernet: Any) -> list[int]:
    """Index of the largest alpha of every mixed op (``mixed_ops`` order); ties go to the first op."""
    return [int(torch.argmax(m.alpha.detach())) for m in supernet.mixed_ops]


@dataclass
class Derivation:
    """A derived network: the block path, one op per mixed op, and what it is predicted to cost."""

    path: list[int]
    op_choice: list[int]
    blocks: list[dict]            # per block after block 0: c_in, c_out, head, stack (skips removed), stride
    path_prob: float
    predicted_cost: float | None = None
    cost_units: str | None = None
    official: str = ""
    arch: Any = None              # densenas.arch.Arch when densenas.arch is importable
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "blocks": self.blocks, "path_prob": self.path_prob,
                "predicted_cost": self.predicted_cost, "cost_units": self.cost_units,
                "official": self.official}


def _blocks_on_path(supernet: Any, path: Sequence[int], op_choice: Sequence[int]) -> list[dict]:
    space: SearchSpace = supernet.space
    head_at = {}
    stack_at: dict[int, list[str]] = {}
    for k, m in enumerate(supernet.mixed_ops):
        name = m.op_names[op_choice[k]]
        if m.kind == "head":
            head_at[tuple(m.edge)] = name
        else:
            stack_at.setdefault(m.block, []).append(name)
    blocks = []
    for i, j in zip(path, path[1:]):
        bi, bj = space.blocks[i], space.blocks[j]
        stack = [o for o in stack_at.get(j, []) if o != "skip"]
        blocks.append({"block": j, "c_in": bi.width, "c_out": bj.width, "head": head_at[(i, j)],
                       "stack": stack, "stride": bi.resolution // bj.resolution,
                       "resolution": bj.resolution})
    return blocks


def _official_op(name: str) -> str:
    """Canonical mbconv_kK_eE -> the authors' mbconv_kK_tE spelling."""
    return name.replace("_e", "_t") if name.startswith("mbconv_") else name


def official_string(space: SearchSpace, blocks: Sequence[Mapping[str, Any]]) -> str:
    """The authors' encoding of a derived network (block 0's first layer, the path's blocks, last conv)."""
    parts = []
    if space.first_layer is not None:
        fl = space.first_layer
        parts.append(f"[[{space.stem.out}, {fl.out}], '{_official_op(fl.op)}', [], 0, {fl.stride}]")
    for b in blocks:
        stack = ", ".join(f"'{_official_op(o)}'" for o in b["stack"])
        parts.append(f"[[{b['c_in']}, {b['c_out']}], '{_official_op(b['head'])}', [{stack}], "
                     f"{len(b['stack'])}, {b['stride']}]")
    if space.last_conv_channels is not None:
        c = blocks[-1]["c_out"] if blocks else space.blocks[0].width
        parts.append(f"[[{c}, {space.last_conv_channels}], 'conv1_1']")
    return "|".join(parts)


def near_target(supernet: Any, latency: Any, target: float, tolerance: float = 0.05,
                k: int = 64) -> tuple[list[int], list[int], bool]:
    """The most probable network whose predicted cost is within ``target * (1 +- tolerance)``.

    Candidates: the ``k`` most probable block paths; on each, the ops start at argmax and are moved
    greedily toward the target, each move the op change of a layer on the path that loses the least
    log-probability per unit of cost gained toward the target (never overshooting further than it
    was). Score: log p(path) + sum of log softmax(alpha) of the chosen ops on the path. Returns
    (path, op_choice, in_band); when no candidate reaches the band, the one closest to the target.
    """
    import torch.nn.functional as F

    space: SearchSpace = supernet.space
    with torch.no_grad():
        probs = {e: float(p) for e, p in supernet.edge_probs().items()}
        logp = [F.log_softmax(m.alpha.detach().double(), 0).tolist() for m in supernet.mixed_ops]
    ops0 = argmax_ops(supernet)
    costs: dict[int, list[float]] = {}
    for n, idx in enumerate(latency.head_index):
        costs[idx] = [float(c) for c in latency.head_costs[n]]
    for n, idx in enumerate(latency.stack_index):
        costs[idx] = [float(c) for c in latency.stack_costs[n]]
    head_at = {tuple(m.edge): idx for idx, m in enumerate(supernet.mixed_ops) if m.kind == "head"}
    stacks_at: dict[int, list[int]] = {}
    for idx, m in enumerate(supernet.mixed_ops):
        if m.kind == "stack":
            stacks_at.setdefault(m.block, []).append(idx)
    lo, hi = target * (1 - tolerance), target * (1 + tolerance)
    best = None
    for path, p in k_best_paths(space, probs, k):
        layers = [head_at[e] for e in zip(path, path[1:])] + [i for j in path[1:] for i in stacks_at.get(j, [])]
        ops = list(ops0)
        cost = latency.path_cost(path, ops)
        for _ in range(8 * len(layers) + 1):
            if lo <= cost <= hi:
                break
            move = None
            for i in layers:
                now = costs[i][ops[i]]
                for o, c in enumerate(costs[i]):
                    if o == ops[i] or abs(cost + c - now - target) >= abs(cost - target):
                        continue
                    rate = (logp[i][ops[i]] - logp[i][o]) / abs(c - now)
                    if move is None or rate < move[0]:
                        move = (rate, i, o, c - now)
            if move is None:
                break
            ops[move[1]] = move[2]
            cost += move[3]
        cost = latency.path_cost(path, ops)
        inside = lo <= cost <= hi
        score = math.log(p) + sum(logp[i][ops[i]] for i in layers) if inside else -abs(cost - target)
        if best is None or (inside, score) > best[0]:
            best = ((inside, score), path, ops)
    (inside, _), path, ops = best
    return list(path), ops, inside


def derive(supernet: Any, cost_model: Any = None, budget: float | None = None, num_classes: int | None = None,
           build_arch: bool = True, target: float | None = None, tolerance: float = 0.05) -> Derivation:
    """Viterbi path + argmax ops of a super network; with ``budget`` (cost model units), the most
    probable path whose predicted cost stays within it (ops stay argmax); with ``target``, the most
    probable network within ``target * (1 +- tolerance)`` (``near_target``: path and ops)."""
    space: SearchSpace = supernet.space
    with torch.no_grad():
        probs = {e: float(p) for e, p in supernet.edge_probs().items()}
    ops = argmax_ops(supernet)
    latency = None
    if cost_model is not None:
        from densenas.latency import ExpectedLatency

        latency = ExpectedLatency(supernet, cost_model, num_classes)
    notes = []
    if target is not None:
        if latency is None:
            raise ValueError("a latency target needs a cost model (a LatencyTable or MacsCostModel)")
        path, ops, inside = near_target(supernet, latency, target, tolerance)
        if not inside:
            notes.append(f"no network among the most probable paths is within {tolerance:.0%} of the target "
                         f"{target:g} {latency.units}: the closest was taken")
    elif budget is not None:
        if latency is None:
            raise ValueError("a latency budget needs a cost model (a LatencyTable or MacsCostModel)")
        fixed, costs = latency.edge_costs(ops)
        found = best_path_within(space, probs, costs, budget, fixed)
        if found is None:
            raise ValueError(f"no path of the space fits the budget {budget} {latency.units} with the argmax ops "
                             f"(cheapest: {fixed + _min_path_cost(space, costs):.4g}); raise the budget")
        path = found[0]
    else:
        path = viterbi_path(space, probs)
    prob = math.exp(path_log_prob(space, probs, path))
    blocks = _blocks_on_path(supernet, path, ops)
    d = Derivation(path=path, op_choice=ops, blocks=blocks, path_prob=prob,
                   official=official_string(space, blocks), notes=notes)
    if latency is not None:
        d.predicted_cost, d.cost_units = latency.path_cost(path, ops), latency.units
    if build_arch:
        d.arch = _to_arch(supernet, d)
    return d


def _min_path_cost(space: SearchSpace, costs: Mapping[tuple[int, int], float]) -> float:
    best = {space.end_node: 0.0}
    for i in range(space.end_node - 1, -1, -1):
        best[i] = min(costs[(i, j)] + best[j] for (_, j, _) in space.out_edges(i))
    return best[0]


def _to_arch(supernet: Any, d: Derivation) -> Any:
    """The ``densenas.arch.Arch`` of a derivation (built from the derivation's blocks)."""
    from densenas.arch import arch_from_derivation  # the architecture document owns its format

    meta = {"path": list(d.path), "path_prob": d.path_prob}
    if d.predicted_cost is not None:
        meta.update(predicted_cost=d.predicted_cost, cost_units=d.cost_units)
    return arch_from_derivation(supernet.space, d.blocks, num_classes=supernet.num_classes, metadata=meta)


def derive_arch(supernet: Any, cost_model: Any = None, budget: float | None = None) -> Any:
    """The derived architecture (``densenas.arch.Arch``; its metadata holds the path, the path's
    probability and, with a cost model, the predicted cost); see ``derive`` for the details."""
    return derive(supernet, cost_model, budget).arch
