"""Pre-work checks: everything that can fail a run is checked before the first stage starts.

``pipeline/run.py`` (and ``--plan``, which runs the same checks) calls, in order:

- ``open_store_checked(cfg)``: the store URI has a supported scheme and the store answers within
  ``PROBE_S`` seconds (a dead S3 endpoint, wrong credentials, a missing bucket, an ``ftp://`` URI);
- ``prework_checks(cfg, planned)`` for the stages that will run:
  tracking server reachable (``tracking.uri``), Ray address reachable within ``ray.init_timeout_s``,
  ``data.val_fraction > 0`` and ``data.max_per_class`` large enough for the search's batches, a dry scan
  of a folder dataset's chosen classes (an empty class, or one whose every image is unreadable, fails
  before any shard is written), a latency-table file given as ``search.cost`` (parses, belongs to the
  space, its batch matches ``retrain.latency_batch``), and every Ray request (split tasks, profile
  actors, search, retrain, sweep trials) against the cluster's nodes (a local Ray: this machine's
  CPUs or ``ray.num_cpus``).

Every failure is a ``CheckFailed(key, message)``: one line naming the config key or file and what to do.
"""
from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlparse

from pipeline.config import COST_SOURCES, ConfigError, PipelineConfig, resolve_space

__all__ = ["CheckFailed", "PROBE_S", "open_store_checked", "prework_checks", "resource_plan", "check_resource_plan",
           "local_nodes", "probe_ray_address", "check_tracking", "check_data", "check_latency_table",
           "will_run"]

PROBE_S = 10.0   # a store or tracking server that does not answer within this is reported as down


class CheckFailed(ConfigError):
    """A pre-work check failed: ``key: what is wrong; what to do``."""


def will_run(planned: Iterable[Any], *names: str) -> bool:
    return any(p.stage.name in names and p.action == "run" for p in planned)


# --------------------------------------------------------------------------- store
def open_store_checked(cfg: PipelineConfig) -> Any:
    """The run's store, after a probe that answers within ``PROBE_S`` seconds."""
    from cluster.storage import StorageError, open_store

    uri = cfg.storage.uri
    try:
        store = open_store(uri)
        if urlparse(str(uri)).scheme == "s3":   # a short-fused twin for the probe; the run keeps its retries
            probe = open_store(uri, connect_timeout=2.0, read_timeout=3.0, max_attempts=2, deadline=PROBE_S - 1)
            probe.options.connect_timeout, probe.options.read_timeout = 2.0, 3.0
            probe.options.max_attempts, probe.options.deadline = 2, PROBE_S - 1
        else:
            probe = store
        probe.check()
        probe.list("runs/_index/")
    except StorageError as e:
        raise CheckFailed("storage.uri", f"{uri}: {e}") from None
    return store


# --------------------------------------------------------------------------- tracking
def check_tracking(cfg: PipelineConfig) -> None:
    if not cfg.tracking.enabled:
        return
    uri = str(cfg.tracking.uri or "")
    parsed = urlparse(uri)
    what = "set tracking.uri to a running MLflow server, start the embedded one (python -m cluster.local up), " \
           "or set tracking.enabled: false"
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=PROBE_S / 2).read(64)
        except urllib.error.HTTPError:
            return          # it answers (auth, a proxy): reachable
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise CheckFailed("tracking.uri", f"MLflow server {uri} does not answer ({reason}); {what}") from None
    elif parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        parent = Path(path).expanduser().parent if path else None
        if parent is not None and not parent.is_dir():
            raise CheckFailed("tracking.uri", f"{uri}: directory {parent} does not exist; create it or {what}")
        if parent is not None and not os.access(parent, os.W_OK):
            raise CheckFailed("tracking.uri", f"{uri}: directory {parent} is not writable; {what}")
    elif parsed.scheme not in ("", "file", "databricks", "postgresql", "mysql", "mssql"):
        raise CheckFailed("tracking.uri", f"unsupported tracking URI scheme {parsed.scheme!r} in {uri!r}; {what}")


# --------------------------------------------------------------------------- Ray
def _ray_target(cfg: PipelineConfig) -> str | None:
    """The address a Ray stage would join (None: a local Ray is started, or 'auto' finds one here)."""
    address = cfg.ray.address
    if address in (None, "auto"):
        env = os.environ.get("RAY_ADDRESS")
        return env if env and env != "auto" else None
    return address


def probe_ray_address(address: str, timeout_s: float, key: str = "ray.address") -> None:
    """TCP-connect to a Ray address (``host:port``, ``ray://host:port``, ``http://host:port``) until it
    answers or ``timeout_s`` passes (``ray.init`` itself would wait minutes on a dead one)."""
    text = address if "://" in address else f"tcp://{address}"
    parsed = urlparse(text)
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise CheckFailed(key, f"{address!r} is not host:port (or ray://host:port); fix it or leave it unset for a "
                               "local Ray")
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(left, 3.0)):
                return
        except OSError as e:
            last = e
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    raise CheckFailed(key, f"no Ray cluster answers at {address} within {timeout_s:g} s ({last}); start it, fix "
                           "ray.address / $RAY_ADDRESS, or leave both unset for a local Ray (ray.init_timeout_s sets "
                           "the wait)")


def local_nodes(cfg: PipelineConfig) -> list[dict[str, float]]:
    """The one node of the local Ray a stage would start (``ray.num_cpus`` / ``ray.num_gpus``, else this machine)."""
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    gpus = cfg.ray.num_gpus
    if gpus is None:
        try:
            import torch

            gpus = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 -- no torch / no CUDA: no GPUs
            gpus = 0
    node = {"CPU": float(cpus)}
    if gpus:
        node["GPU"] = float(gpus)
    return [node]


def _reserve(section: Any) -> dict[str, float]:
    """What a Train stage keeps free beside its workers: its own ``reserve()`` (the same call the stage
    checks with), else its ``data_cpus``."""
    if hasattr(section, "reserve"):
        return dict(section.reserve() or {})
    cpus = getattr(section, "data_cpus", 0)
    return {"CPU": float(cpus)} if cpus else {}


def resource_plan(cfg: PipelineConfig, stages: Iterable[str]) -> list[tuple[str, str, Any, dict[str, float]]]:
    """(config key, what, WorkerResources, reserve) for every Ray request of the named stages."""
    from jobs.resources import WorkerResources

    names = set(stages)
    out: list[tuple[str, str, Any, dict[str, float]]] = []
    if "split" in names and getattr(cfg.data, "executor", "local") == "ray":
        out.append(("data.executor", "split stage (one task per shard)", WorkerResources(1, 1.0), {}))
    if "profile" in names:
        res = dict(cfg.profile.ray_resources())
        cpu, gpu = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
        out.append(("profile.threads_per_actor", "profile stage (one actor)", WorkerResources(1, cpu, gpu, res), {}))
    if "search" in names and hasattr(cfg.search, "request"):
        out.append(("search.cpus_per_worker", "search stage", cfg.search.request(), _reserve(cfg.search)))
    if "retrain" in names and hasattr(cfg.retrain, "request"):
        out.append(("retrain.cpus_per_worker", "retrain stage", cfg.retrain.request(), _reserve(cfg.retrain)))
    if "sweep" in names and hasattr(cfg.sweep, "workers_per_trial"):
        sw = cfg.sweep
        out.append(("sweep.cpus_per_worker", "one sweep trial", WorkerResources(sw.workers_per_trial, sw.cpus_per_worker),
                    {"CPU": sw.data_cpus + sw.trial_driver_cpus}))
        if sw.max_concurrent > 1:
            out.append(("sweep.max_concurrent", f"{sw.max_concurrent} concurrent sweep trials",
                        WorkerResources(sw.max_concurrent * sw.workers_per_trial, sw.cpus_per_worker),
                        {"CPU": sw.data_cpus + sw.max_concurrent * sw.trial_driver_cpus}))
    return out


def check_resource_plan(cfg: PipelineConfig, stages: Iterable[str], nodes: Sequence[Mapping[str, float]]) -> None:
    from jobs.resources import ResourceRequestError, check_resources

    for key, what, request, reserve in resource_plan(cfg, stages):
        try:
            check_resources(request, reserve=reserve or None, nodes=nodes, what=what)
        except ResourceRequestError as e:
            raise CheckFailed(key, str(e)) from None


def _cluster_nodes_for(cfg: PipelineConfig, log: Callable[[str], None]) -> list[dict[str, float]]:
    import ray

    from jobs.resources import cluster_nodes

    if ray.is_initialized():
        return cluster_nodes()
    target = _ray_target(cfg)
    if target is None and cfg.ray.address != "auto":
        return local_nodes(cfg)
    from pipeline.runtime import ensure_ray

    try:
        ensure_ray(cfg.ray, log=log)      # joining a cluster: its nodes are the truth
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001 -- ray.init's ConnectionError & co.: one line naming the key
        raise CheckFailed("ray.address", f"cannot join the Ray cluster ({type(e).__name__}: {e}); start it, fix "
                                         "ray.address / $RAY_ADDRESS, or leave both unset for a local Ray") from None
    return cluster_nodes()


# --------------------------------------------------------------------------- data
def _counts_per_class(n: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) of a class with ``n`` images after the test cut (``imagedata.split_per_class``)."""
    val = int(round(n * val_fraction))
    if val_fraction > 0:
        val = max(val, 1)
    return n - val, val


def check_data(cfg: PipelineConfig, planned: Sequence[Any]) -> None:
    data = cfg.data
    searching = will_run(planned, "search", "sweep")
    if searching and data.val_fraction <= 0:
        raise CheckFailed("data.val_fraction", f"is {data.val_fraction}: the search's architecture steps train on "
                                               "search-val, so it must be > 0 (e.g. 0.2)")
    classes = data.classes if isinstance(data.classes, int) else (len(data.classes) if data.classes else None)
    if searching and data.max_per_class and classes:
        needs = []
        if will_run(planned, "search") and hasattr(cfg.search, "workers"):
            needs.append(("search", cfg.search.workers))
        if will_run(planned, "sweep") and hasattr(cfg.sweep, "workers_per_trial"):
            needs.append(("sweep", cfg.sweep.workers_per_trial))
        for stage, workers in needs:
            train, val = _counts_per_class(data.max_per_class, data.val_fraction)
            if train < 1 or train * classes < workers or val * classes < workers:
                least = next(n for n in range(1, 1_000_000)
                             if (t := _counts_per_class(n, data.val_fraction))[0] >= 1
                             and t[0] * classes >= workers and t[1] * classes >= workers)
                raise CheckFailed("data.max_per_class", f"{data.max_per_class} images per class give {train} "
                                  f"search-train and {val} search-val per class ({classes} classes, val_fraction "
                                  f"{data.val_fraction}): not one batch for each of the {stage}'s {workers} "
                                  f"worker(s); raise max_per_class to at least {least}")
    if will_run(planned, "split") and data.source == "folder" and data.root and "://" not in str(data.root):
        scan_folder(cfg)


def scan_folder(cfg: PipelineConfig) -> None:
    """Dry scan of a folder dataset: every chosen class has images and at least one of them decodes."""
    import imagedata as D

    data = cfg.data
    try:
        listing = D.scan_image_folder(Path(str(data.root)).expanduser())
    except D.DataError as e:
        raise CheckFailed("data.root", str(e)) from None
    try:
        chosen = D.choose_classes(listing.classes, data.classes, data.seed)
    except D.DataError as e:
        raise CheckFailed("data.classes", str(e)) from None
    by_class: dict[str, list[str]] = {}
    for rel, cls in listing.train:
        by_class.setdefault(cls, []).append(rel)
    channels = data.channels or 3
    for cls in chosen:
        files = by_class.get(cls, [])
        if not files:
            raise CheckFailed("data.root", f"class {cls!r} ({listing.root}/train/{cls}) has no images; add images or "
                                           "remove the folder (or leave it out of data.classes)")
        first_error = None
        for rel in files:
            try:
                D.load_image_file((listing.root / rel).read_bytes(), channels, data.short_side)
                break
            except Exception as e:  # noqa: BLE001 -- corrupt / unreadable: try the next one
                first_error = first_error or f"{rel}: {type(e).__name__}: {e}"
        else:
            raise CheckFailed("data.root", f"class {cls!r} ({listing.root}/train/{cls}): none of its {len(files)} "
                                           f"images can be read (e.g. {first_error}); fix or remove them")


# --------------------------------------------------------------------------- latency tables
def check_latency_table(cfg: PipelineConfig) -> None:
    cost = cfg.search.cost
    if cost in COST_SOURCES or "://" in cost:
        return
    from densenas.latency import LatencyTable

    path = Path(cost)
    key = "search.cost"
    try:
        table = LatencyTable.from_json(path)
    except OSError as e:
        raise CheckFailed(key, f"latency table {path}: cannot read it ({e.strerror or e}); give an existing table "
                               "JSON, 'profile' or 'macs'") from None
    except ValueError as e:   # JSONDecodeError, LatencyTableError, bad entries
        raise CheckFailed(key, f"latency table {path} is not a valid table ({type(e).__name__}: {e}); re-profile it "
                               "(profile stage) or use cost: profile") from None
    try:
        table.check_compatible(resolve_space(cfg.space))
    except ValueError as e:
        raise CheckFailed(key, f"latency table {path}: {e}") from None
    want = getattr(cfg.retrain, "latency_batch", None)
    if want is not None and want != table.batch:
        raise CheckFailed("retrain.latency_batch", f"is {want}, but the latency table {path} was measured at batch "
                                                   f"{table.batch}: predicted and measured latency would not compare; "
                                                   f"set it to {table.batch} or leave it unset")


# --------------------------------------------------------------------------- all of them
def prework_checks(cfg: PipelineConfig, planned: Sequence[Any], log: Callable[[str], None] = print) -> None:
    """The checks of the module doc for the planned stages (``cfg`` resolved); ``CheckFailed`` on the first miss."""
    running = [p.stage.name for p in planned if p.action == "run"]
    check_tracking(cfg)
    check_data(cfg, planned)
    if will_run(planned, "search", "derive", "sweep"):
        check_latency_table(cfg)
    ray_stages = [p.stage for p in planned if p.action == "run" and p.stage.uses_ray]
    uses_ray = [s.name for s in ray_stages
                if (s.uses_ray(s.section_arg(cfg)) if callable(s.uses_ray) else s.uses_ray)]
    if not uses_ray:
        return
    target = _ray_target(cfg)
    if target is not None:
        probe_ray_address(target, cfg.ray.init_timeout_s)
    check_resource_plan(cfg, running, _cluster_nodes_for(cfg, log))
