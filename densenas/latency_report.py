"""How well a latency table predicts whole networks: random nets of a space, predicted vs measured.

The maths of the accuracy report (no timing, no plotting, no Ray):

- ``sample_random_nets(space, n, seed)``: ``n`` distinct random networks of the space -- a block
  path drawn uniformly among all of the space's paths (not a random walk, which would favour short
  paths), a random head op per edge and a random op per stacking layer (skip included) -- each as
  a ``RandomNet`` with its ``densenas.arch.Arch`` (skips dropped there: they are identities).
- ``net_signatures(space, net, batch, num_classes)``: the op signatures along the net, exactly
  the terms the search's expected latency sums for that net (stem, first layer, head op of each
  edge, each stacking op -- skip's tiny entry too -- final 1x1 conv of the last block, classifier);
  ``predict_latency(table, ...)`` is their sum.
- ``accuracy_metrics(predicted, measured)``: share within +-5 % / +-10 %, mean absolute % error,
  mean signed % error (bias), Spearman rank correlation.
- ``fit_correction(kind, ...)``: where the plain sum is biased (per-op call overhead, cache effects
  of running ops back to back), a least-squares correction ``measured ~ a * predicted + b``
  (``linear``) or ``measured ~ predicted + c * layers + b`` (``overhead``); its quality is reported
  with leave-one-out predictions, so the numbers are not fitted to the nets they are scored on.
- ``accuracy_report(...)``: all of that in one JSON-ready dict.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from densenas.latency import (OpSignature, classifier_signature, final_signature, head_signature,
                              stack_signature, stem_signatures)
from densenas.space import SearchSpace, load_space

__all__ = [
    "RandomNet",
    "Correction",
    "CORRECTION_KINDS",
    "sample_path",
    "sample_random_nets",
    "net_signatures",
    "predict_latency",
    "spearman",
    "accuracy_metrics",
    "fit_correction",
    "loo_predictions",
    "accuracy_report",
]

CORRECTION_KINDS = ("linear", "overhead")


@dataclass(frozen=True)
class RandomNet:
    """One network of a space: a block path (block 0 first) and its ops."""

    path: tuple[int, ...]
    head_ops: tuple[str, ...]                 # one per edge of the path
    stacking_ops: tuple[tuple[str, ...], ...]  # one tuple per block after block 0 (skip included)
    arch: Any = field(compare=False, default=None)  # densenas.arch.Arch

    @property
    def key(self) -> str:
        """A stable id: path and ops (the same net always gets the same key)."""
        blocks = [f"{b}:{h}:{'+'.join(s)}" for b, h, s in zip(self.path[1:], self.head_ops, self.stacking_ops)]
        return "0|" + "|".join(blocks)

    @property
    def num_layers(self) -> int:
        """Layers the table sums for this net (heads + stacking, skips included)."""
        return len(self.head_ops) + sum(len(s) for s in self.stacking_ops)

    def to_dict(self) -> dict:
        return {"key": self.key, "path": list(self.path), "head_ops": list(self.head_ops),
                "stacking_ops": [list(s) for s in self.stacking_ops],
                "arch": None if self.arch is None else self.arch.to_dict()}


def _paths_to_end(space: SearchSpace) -> dict[int, int]:
    count = {space.end_node: 1}
    for i in range(len(space.blocks) - 1, -1, -1):
        count[i] = sum(count[j] for (_, j, _) in space.out_edges(i))
    return count


def sample_path(space: SearchSpace, rng: random.Random, _count: Mapping[int, int] | None = None) -> tuple[int, ...]:
    """A block path drawn uniformly among all paths of the space (each out-edge weighted by the
    number of paths through it)."""
    count = _count or _paths_to_end(space)
    path, node = [0], 0
    while True:
        edges = space.out_edges(node)
        weights = [count[j] for (_, j, _) in edges]
        (_, nxt, _), = rng.choices(edges, weights=weights)
        if nxt == space.end_node:
            return tuple(path)
        path.append(nxt)
        node = nxt


def sample_random_nets(space: SearchSpace | str | Mapping, n: int = 50, seed: int = 0,
                       num_classes: int = 1000, max_tries_factor: int = 50) -> list[RandomNet]:
    """``n`` distinct random networks (fewer only when the space has fewer), reproducible from ``seed``."""
    from densenas.arch import Arch  # the architecture document (landed separately from this module)

    space = load_space(space)
    rng = random.Random(seed)
    count = _paths_to_end(space)
    nets: dict[str, RandomNet] = {}
    tries = 0
    while len(nets) < n and tries < max_tries_factor * n:
        tries += 1
        path = sample_path(space, rng, count)
        heads = tuple(rng.choice(space.head_ops) for _ in path[1:])
        stacks = tuple(tuple(rng.choice(space.stacking_ops) for _ in range(space.blocks[b].n_stacking))
                       for b in path[1:])
        net = RandomNet(path, heads, stacks)
        if net.key in nets:
            continue
        arch = Arch.from_path(space, path, heads, stacks, num_classes=num_classes,
                              metadata={"name": f"random-{len(nets)}", "source": "latency-report",
                                        "seed": seed, "key": net.key})
        nets[net.key] = RandomNet(path, heads, stacks, arch)
    return list(nets.values())


def net_signatures(space: SearchSpace, net: RandomNet, batch: int, num_classes: int) -> list[OpSignature]:
    """The signatures the table sums for ``net``, in network order (duplicates kept: each is a layer)."""
    sigs = list(stem_signatures(space, batch))
    for (i, j), head, stack in zip(zip(net.path, net.path[1:]), net.head_ops, net.stacking_ops):
        sigs.append(head_signature(space, head, i, j, batch))
        sigs += [stack_signature(space, op, j, batch) for op in stack]
    last = net.path[-1]
    sigs.append(final_signature(space, last, batch, num_classes))
    if space.last_conv_channels is not None:
        sigs.append(classifier_signature(space.last_conv_channels, space.blocks[last].resolution, num_classes, batch))
    return sigs


def predict_latency(table: Any, space: SearchSpace, net: RandomNet, num_classes: int) -> float:
    """Sum of the table's entries along the net (the table's statistic, its units)."""
    return float(sum(table.lookup(s) for s in net_signatures(space, net, table.batch, num_classes)))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); nan when either side is constant or n < 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def accuracy_metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Error of ``predicted`` relative to ``measured`` (both in the same units, measured > 0)."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"need two equal-length non-empty lists, got {p.shape} and {m.shape}")
    if (m <= 0).any():
        raise ValueError("measured latencies must be > 0")
    rel = (p - m) / m
    return {
        "n": int(len(p)),
        "within_5pct": float((np.abs(rel) <= 0.05).mean()),
        "within_10pct": float((np.abs(rel) <= 0.10).mean()),
        "mape_pct": float(np.abs(rel).mean() * 100),
        "mean_signed_error_pct": float(rel.mean() * 100),
        "max_abs_error_pct": float(np.abs(rel).max() * 100),
        "spearman": spearman(p, m),
    }


@dataclass(frozen=True)
class Correction:
    """``linear``: a * predicted + b. ``overhead``: predicted + a * layers + b (a = per-layer overhead)."""

    kind: str
    a: float
    b: float

    def apply(self, predicted: Sequence[float] | float, layers: Sequence[float] | float = 0) -> np.ndarray:
        p, n = np.asarray(predicted, dtype=np.float64), np.asarray(layers, dtype=np.float64)
        if self.kind == "linear":
            return self.a * p + self.b
        return p + self.a * n + self.b

    def to_dict(self) -> dict:
        meaning = ("measured ~ a * predicted + b" if self.kind == "linear"
                   else "measured ~ predicted + a * layers + b (a: per-layer overhead)")
        return {"kind": self.kind, "a": self.a, "b": self.b, "formula": meaning}


def fit_correction(kind: str, predicted: Sequence[float], measured: Sequence[float],
                   layers: Sequence[float] | None = None) -> Correction:
    """Least-squares fit of a ``Correction`` (needs at least 2 nets)."""
    if kind not in CORRECTION_KINDS:
        raise ValueError(f"correction kind must be one of {CORRECTION_KINDS}, got {kind!r}")
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(p) < 2:
        raise ValueError("a correction needs at least 2 measured nets")
    if kind == "linear":
        A, y = np.stack([p, np.ones_like(p)], 1), m
    else:
        if layers is None:
            raise ValueError("the 'overhead' correction needs the layer count of each net")
        A, y = np.stack([np.asarray(layers, dtype=np.float64), np.ones_like(p)], 1), m - p
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    return Correction(kind, float(a), float(b))


def loo_predictions(kind: str, predicted: Sequence[float], measured: Sequence[float],
                    layers: Sequence[float] | None = None) -> np.ndarray:
    """Corrected predictions where each net's correction was fitted without it (leave-one-out)."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    n = np.zeros_like(p) if layers is None else np.asarray(layers, dtype=np.float64)
    out = np.empty_like(p)
    for k in range(len(p)):
        keep = np.arange(len(p)) != k
        c = fit_correction(kind, p[keep], m[keep], None if layers is None else n[keep])
        out[k] = c.apply(p[k], n[k])
    return out


def accuracy_report(nets: Sequence[RandomNet], predicted: Sequence[float], measured: Sequence[float],
                    units: str = "ms", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report: plain-sum metrics, each correction (fit on all nets, scored leave-one-out), the
    recommended one (lowest leave-one-out error, or none when the plain sum is as good), and per-net rows."""
    layers = [net.num_layers for net in nets]
    plain = accuracy_metrics(predicted, measured)
    report: dict[str, Any] = {"units": units, "n_nets": len(nets), "plain_sum": plain, "corrections": {}}
    best_kind, best_mape = None, plain["mape_pct"]
    loo: dict[str, np.ndarray] = {}
    if len(nets) >= 4:  # leave-one-out needs >= 3 nets per fit
        for kind in CORRECTION_KINDS:
            corr = fit_correction(kind, predicted, measured, layers)
            loo[kind] = loo_predictions(kind, predicted, measured, layers)
            metrics = accuracy_metrics(loo[kind], measured)
            report["corrections"][kind] = {**corr.to_dict(), "leave_one_out": metrics,
                                           "in_sample": accuracy_metrics(corr.apply(predicted, layers), measured)}
            if metrics["mape_pct"] < best_mape:
                best_kind, best_mape = kind, metrics["mape_pct"]
    report["recommended_correction"] = best_kind
    report["rows"] = [
        {"key": net.key, "layers": n_layers, "predicted": float(p), "measured": float(m),
         **{f"corrected_{k}_loo": float(v[i]) for k, v in loo.items()}}
        for i, (net, n_layers, p, m) in enumerate(zip(nets, layers, predicted, measured))
    ]
    report.update(dict(extra or {}))
    return report
