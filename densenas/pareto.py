"""Pareto bookkeeping for accuracy / latency trade-offs (pure Python, no plotting).

A point *dominates* another when it is at least as accurate **and** at least as fast, and strictly
better in one of the two. The Pareto front is the set of points no other point dominates.

    pts = [ParetoPoint("l0.05", accuracy=0.81, latency=2.1), ParetoPoint("l0.5", 0.77, 1.2), ...]
    front = pareto_front(pts)                 # non-dominated points, fastest first
    flags = non_dominated_mask(accs, lats)    # the same as a list of booleans, input order

Points whose accuracy or latency is missing / NaN cannot be compared and are never on the front
(``non_dominated_mask`` marks them False). Exact duplicates (same accuracy and latency) do not
dominate each other: both stay on the front.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["ParetoPoint", "dominates", "non_dominated_mask", "pareto_front", "pareto_table", "hypervolume_2d"]


@dataclass(frozen=True)
class ParetoPoint:
    """One candidate: an id, its accuracy (higher is better), its latency (lower is better), extras."""

    key: str
    accuracy: float | None
    latency: float | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def comparable(self) -> bool:
        return _finite(self.accuracy) and _finite(self.latency)


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))


def dominates(acc_a: float, lat_a: float, acc_b: float, lat_b: float) -> bool:
    """True when (acc_a, lat_a) is no worse in both and strictly better in one than (acc_b, lat_b)."""
    return acc_a >= acc_b and lat_a <= lat_b and (acc_a > acc_b or lat_a < lat_b)


def non_dominated_mask(accuracies: Sequence[float | None], latencies: Sequence[float | None]) -> list[bool]:
    """Per point (input order): is it on the Pareto front (max accuracy, min latency)?

    O(n log n): sweep by latency ascending (accuracy descending within ties); a point is dominated
    iff an earlier point of the sweep is at least as accurate and differs from it.
    """
    if len(accuracies) != len(latencies):
        raise ValueError(f"accuracies ({len(accuracies)}) and latencies ({len(latencies)}) differ in length")
    idx = [i for i in range(len(accuracies)) if _finite(accuracies[i]) and _finite(latencies[i])]
    idx.sort(key=lambda i: (float(latencies[i]), -float(accuracies[i])))
    mask = [False] * len(accuracies)
    best_acc, best_lat = -math.inf, math.inf   # most accurate point seen (the fastest one reaching it)
    for i in idx:
        a, l = float(accuracies[i]), float(latencies[i])
        # Every point seen so far is no slower than this one. It is dominated by one that is more
        # accurate, or as accurate and strictly faster; an exact twin does not dominate it.
        if best_acc > a or (best_acc == a and best_lat < l):
            continue
        mask[i] = True
        if a > best_acc:
            best_acc, best_lat = a, l
    return mask


def pareto_front(points: Iterable[ParetoPoint]) -> list[ParetoPoint]:
    """The non-dominated points, fastest first (ties: the more accurate first, then by key)."""
    pts = list(points)
    mask = non_dominated_mask([p.accuracy for p in pts], [p.latency for p in pts])
    front = [p for p, m in zip(pts, mask) if m]
    return sorted(front, key=lambda p: (float(p.latency), -float(p.accuracy), p.key))


def pareto_table(rows: Sequence[Mapping[str, Any]], accuracy: str = "accuracy", latency: str = "latency"
                 ) -> list[dict]:
    """``rows`` (dicts) with a boolean ``pareto`` column added, input order kept; rows lacking either
    metric get ``pareto=False``."""
    mask = non_dominated_mask([r.get(accuracy) for r in rows], [r.get(latency) for r in rows])
    return [{**dict(r), "pareto": bool(m)} for r, m in zip(rows, mask)]


def hypervolume_2d(points: Iterable[ParetoPoint], ref_accuracy: float, ref_latency: float) -> float:
    """Area dominated by the front and bounded by the reference point (worst accuracy, worst latency):
    one number that grows when the front improves. Points worse than the reference contribute nothing."""
    front = [p for p in pareto_front(points)
             if float(p.accuracy) > ref_accuracy and float(p.latency) < ref_latency]
    area, prev_acc = 0.0, ref_accuracy
    # Along the front (fastest first) accuracy rises: each point adds the strip between the previous
    # point's accuracy and its own, from its latency to the reference latency.
    for p in front:
        acc = float(p.accuracy)
        if acc > prev_acc:
            area += (acc - prev_acc) * (ref_latency - float(p.latency))
            prev_acc = acc
    return area
