"""Where the pipeline runs: the artifact store, the tracker, Ray, node ids.

- ``open_store(uri)``: ``cluster.storage.open_store``.
- ``open_tracker(cfg, run_id, store)``: ``cluster.run_tracking.PipelineTracker`` (MLflow through
  ``cluster.tracking``), over ``NullTracker`` when tracking is off (nothing is logged; the run record
  still holds everything). Its spool (MLflow operations kept while the server is down) is the run's
  own: ``tracking_spool_dir``.
- ``ensure_ray(ray_cfg)``: inside ``ray job submit`` (or with ``$RAY_ADDRESS``) join that cluster with
  ``address="auto"``; else the configured address; else start a local Ray. Started lazily: a run
  whose stages are all cached never starts Ray.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any


__all__ = ["open_store", "open_tracker", "tracking_spool_dir", "ensure_ray"]


def open_store(uri: str) -> Any:
    """``cluster.storage.open_store``: s3://bucket/prefix, file:///path or a plain path."""
    from cluster.storage import open_store as _open

    return _open(uri)


def tracking_spool_dir(store: Any, run_id: str, uri: str) -> Path:
    """Where the run's MLflow operations wait while its tracking server is down: keyed by the tracking
    URI and the run, so a spool is replayed only into the server it was meant for, by the same run.

    A local store keeps it under the run's own directory (``runs/<run_id>/.densenas-tracking-spool/<uri
    key>/``, hidden from store listings); an object store cannot hold a locked append-only file, so
    there it is ``$DENSENAS_SPOOL_DIR`` (default ``~/.cache/densenas/tracking-spool``)
    ``/<uri key>/<run_id>/`` on the driver's machine."""
    key = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    root = getattr(store, "root", None)
    if isinstance(root, Path):
        return root / "runs" / run_id / ".densenas-tracking-spool" / key
    base = os.environ.get("DENSENAS_SPOOL_DIR") or str(Path.home() / ".cache" / "densenas" / "tracking-spool")
    return Path(base).expanduser() / key / run_id


def open_tracker(cfg: Any, run_id: str, store: Any = None) -> Any:
    """The MLflow parent run of the pipeline run (``cluster.run_tracking.PipelineTracker``); with
    ``tracking.enabled: false`` the same class over ``NullTracker``. With ``store`` its spool is the
    run's own (``tracking_spool_dir``)."""
    from cluster.run_tracking import PipelineTracker

    if not cfg.tracking.enabled:
        return PipelineTracker.disabled(run_id)
    spool = tracking_spool_dir(store, run_id, cfg.tracking.uri) if store is not None else None
    return PipelineTracker(cfg.tracking.uri, cfg.tracking.experiment, run_id, config=cfg.dump(), spool_dir=spool)


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
