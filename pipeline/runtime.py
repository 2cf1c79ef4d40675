"""Where the pipeline runs: the artifact store, the tracker, Ray, node ids.

Each piece prefers the cluster/ layer's implementation and says so when it falls back:

- ``open_store(uri)``: ``cluster.storage.open_store``.
- ``open_tracker(cfg, run_id)``: ``cluster.tracking`` when present and tracking is enabled, else a
  ``NullTracker`` (nothing is logged; the run record still holds everything).
- ``ensure_ray(ray_cfg)``: inside ``ray job submit`` (or with ``$RAY_ADDRESS``) join that cluster with
  ``address="auto"``; else the configured address; else start a local Ray. Started lazily: a run
  whose stages are all cached never starts Ray.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any

from jobs.context import NullTracker

__all__ = ["open_store", "open_tracker", "ensure_ray", "node_id"]


def open_store(uri: str) -> Any:
    """``cluster.storage.open_store``: s3://bucket/prefix, file:///path or a plain path."""
    from cluster.storage import open_store as _open

    return _open(uri)


def open_tracker(cfg: Any, run_id: str) -> Any:
    """A tracker for the pipeline run (parent run), or a ``NullTracker`` with the reason printed."""
    if not cfg.tracking.enabled:
        return NullTracker()
    try:
        from pipeline._tracking_adapter import PipelineTracker
    except ImportError as e:
        print(f"tracking: cluster/tracking.py cannot be imported ({e}); MLflow logging is off "
              "(the run record keeps stages, metrics and fingerprints)", file=sys.stderr, flush=True)
        return NullTracker()

    return PipelineTracker(cfg.tracking.uri, cfg.tracking.experiment, run_id, config=cfg.dump())


_RAY_LOCK = threading.Lock()


def ensure_ray(ray_cfg: Any, log=print) -> None:
    """Connect to (or start) Ray once per process."""
    import ray

    with _RAY_LOCK:
        if ray.is_initialized():
            return
        address = ray_cfg.address
        if address is None and (os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")):
            address = "auto"     # we are a `ray job submit` entrypoint, or pointed at a cluster
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
        if address:
            from pipeline.checks import probe_ray_address

            target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
            if target and target != "auto":   # ray.init waits minutes on a dead address: fail in init_timeout_s
                probe_ray_address(target, ray_cfg.init_timeout_s)
            log(f"ray: joining cluster at {address}")
            ray.init(address=address, **kwargs)
        else:
            log(f"ray: no cluster given ($RAY_ADDRESS unset); starting a local Ray"
                + (f" with {ray_cfg.num_cpus} CPUs" if ray_cfg.num_cpus else ""))
            ray.init(num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus, **kwargs)


def node_id() -> str:
    """The Ray node id when Ray is up, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return socket.gethostname()
