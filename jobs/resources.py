"""Check a Ray Train resource request against the cluster before starting, so that an impossible
request fails at once with a message that names what is missing -- instead of Ray's endless
"waiting for resources" retry loop.

    request = WorkerResources(workers=2, cpus_per_worker=0.5)
    check_resources(request)                        # raises ResourceRequestError when it cannot fit
    ScalingConfig(**request.scaling_kwargs())

Two checks, both against ``ray.nodes()`` of the live cluster (alive nodes only):

1. totals: ``workers x (CPU, GPU, custom)`` plus ``reserve`` (e.g. one CPU for Ray Data's decode
   tasks, which cannot run when the Train workers hold every CPU) against the cluster's totals;
2. packing: every worker is one bundle that must fit on a single node, so the bundles are packed
   first-fit-decreasing onto the nodes' capacities (a request can pass (1) and still not fit).

An autoscaling cluster may grow: ``allow_autoscale=True`` turns the error into a warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["ResourceRequestError", "WorkerResources", "cluster_nodes", "check_resources"]

_EPS = 1e-9
# Ray placement group strategies (ScalingConfig.placement_strategy). SPREAD is best effort: workers go
# to different nodes while they can and share a node otherwise (so a job survives losing a node when
# the rest can hold it); STRICT_SPREAD never shares a node (it waits for enough nodes instead).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Ray's bookkeeping resources on every node; never part of a request.
_INTERNAL = ("memory", "object_store_memory")


class ResourceRequestError(RuntimeError):
    """The cluster cannot satisfy a resource request; the message says what is missing and what exists."""

    def __init__(self, message: str, missing: Mapping[str, float] | None = None,
                 cluster: Mapping[str, float] | None = None):
        super().__init__(message)
        self.missing = dict(missing or {})
        self.cluster = dict(cluster or {})


@dataclass(frozen=True)
class WorkerResources:
    """What a Ray Train job asks for: ``workers`` bundles of (cpus, gpus, custom resources)."""

    workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    custom: Mapping[str, float] = field(default_factory=dict)
    placement_strategy: str = "PACK"   # Ray Train's placement group strategy for the worker bundles

    def __post_init__(self) -> None:
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or any(v < 0 for v in self.custom.values()):
            raise ValueError(f"resources per worker must be >= 0, got {self.per_worker()}")

    def per_worker(self) -> dict[str, float]:
        out = {"CPU": float(self.cpus_per_worker), "GPU": float(self.gpus_per_worker)}
        out.update({k: float(v) for k, v in self.custom.items()})
        return {k: v for k, v in out.items() if v > 0}

    def total(self) -> dict[str, float]:
        return {k: v * self.workers for k, v in self.per_worker().items()}

    def scaling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ray.train.ScalingConfig`` for this request."""
        return {"num_workers": self.workers, "use_gpu": self.gpus_per_worker > 0,
                "resources_per_worker": self.per_worker(), "placement_strategy": self.placement_strategy}


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster (Ray must be initialised)."""
    import ray

    if not ray.is_initialized():
        raise ResourceRequestError("Ray is not initialised; call ray.init() (or start the pipeline's Ray) "
                                   "before checking resources")
    nodes = []
    for node in ray.nodes():
        if node.get("Alive", node.get("alive", False)):
            nodes.append({k: float(v) for k, v in (node.get("Resources") or {}).items()
                          if k not in _INTERNAL and not k.startswith("node:")})
    return nodes


def _fmt(res: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items())) or "nothing"


def _pack(bundles: Sequence[Mapping[str, float]], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many bundles fit on the nodes, first-fit-decreasing (largest bundles first)."""
    free = [dict(n) for n in nodes]
    placed = 0
    for b in sorted(bundles, key=lambda b: sorted(b.items(), key=lambda kv: -kv[1]), reverse=True):
        for n in free:
            if all(n.get(k, 0.0) + _EPS >= v for k, v in b.items()):
                for k, v in b.items():
                    n[k] = n.get(k, 0.0) - v
                placed += 1
                break
    return placed


def check_resources(request: WorkerResources, reserve: Mapping[str, float] | None = None,
                    nodes: Sequence[Mapping[str, float]] | None = None, what: str = "Ray Train job",
                    allow_autoscale: bool = False) -> dict[str, float]:
    """Raise ``ResourceRequestError`` when ``request`` (+ ``reserve``) cannot run on the cluster.

    ``nodes`` defaults to ``cluster_nodes()`` (the live cluster). Returns the cluster totals.
    """
    nodes = list(cluster_nodes() if nodes is None else nodes)
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            totals[k] = totals.get(k, 0.0) + v
    need = request.total()
    for k, v in (reserve or {}).items():
        need[k] = need.get(k, 0.0) + float(v)
    missing = {k: v - totals.get(k, 0.0) for k, v in need.items() if totals.get(k, 0.0) + _EPS < v}
    problem = None
    if missing:
        reserve_txt = f" plus {_fmt(reserve or {})} kept free for data loading" if reserve else ""
        names = ", ".join(f"{k} (needs {need[k]:g}, cluster has {totals.get(k, 0.0):g})" for k in sorted(missing))
        hints = []
        if "GPU" in missing:
            hints.append("set use_gpu: false, or run on a cluster with GPU nodes")
        if "CPU" in missing:
            hints.append("lower workers or cpus_per_worker (fractions such as 0.5 are allowed)")
        custom = [k for k in missing if k not in ("CPU", "GPU")]
        if custom:
            hints.append(f"start nodes with the custom resource(s) {custom} (ray start --resources=...) "
                         "or drop them from the request")
        problem = (f"{what} asks for {request.workers} worker(s) x {{{_fmt(request.per_worker())}}}{reserve_txt}: "
                   f"missing {names}. The cluster has {_fmt(totals)} on {len(nodes)} node(s). "
                   + "; ".join(hints))
    else:
        bundles = [request.per_worker()] * request.workers
        placed = _pack(bundles, nodes)
        if request.placement_strategy == "STRICT_SPREAD":
            fitting = sum(1 for n in nodes if all(n.get(k, 0.0) + _EPS >= v for k, v in request.per_worker().items()))
            if fitting < request.workers:
                problem = (f"{what} asks for {request.workers} worker(s) x {{{_fmt(request.per_worker())}}} with "
                           f"placement_strategy STRICT_SPREAD (one worker per node), but only {fitting} node(s) can "
                           f"hold a worker (nodes: {'; '.join(_fmt(n) for n in nodes)}). Use SPREAD (best effort) "
                           "or add nodes")
                missing = {"nodes": float(request.workers - fitting)}
        elif request.placement_strategy == "STRICT_PACK":
            if not any(_pack(bundles, [n]) == request.workers for n in nodes):
                problem = (f"{what} asks for {request.workers} worker(s) x {{{_fmt(request.per_worker())}}} with "
                           f"placement_strategy STRICT_PACK (all on one node), but no node holds them all "
                           f"(nodes: {'; '.join(_fmt(n) for n in nodes)}). Use PACK or bigger nodes")
                missing = {"bundles": float(request.workers)}
        if problem is None and placed < request.workers:
            problem = (f"{what} asks for {request.workers} worker(s) x {{{_fmt(request.per_worker())}}}: the cluster "
                       f"has {_fmt(totals)} in total, but only {placed} worker(s) fit, because a worker cannot span "
                       f"nodes (nodes: {'; '.join(_fmt(n) for n in nodes)}). Lower the per-worker resources or "
                       "use bigger nodes")
            missing = {"bundles": float(request.workers - placed)}
    if problem:
        if allow_autoscale:
            warnings.warn(problem + " (continuing: the cluster may autoscale)", RuntimeWarning, stacklevel=2)
        else:
            raise ResourceRequestError(problem, missing, totals)
    return totals
