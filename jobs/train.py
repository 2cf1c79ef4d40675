"""The Ray Train toolkit of the training stages (search, retrain, the sweep's trials).

    driver:   cfg.request() -> check_resources -> fit_resuming(lambda pointer, name: torch_trainer(...), ...)
    worker:   threads_for_cpus, keep_freed_memory, broadcast_module (identical start),
              capped_batches (equal step counts), gradient_mean (per step: shared memory or gloo),
              allreduce_mean / allreduce_sum (statistics, counts), numeric_metrics,
              report_checkpoint + publish_latest (rank 0, every epoch), load_checkpoint_file (resume)

A stage's checkpoint store holds Ray Train's checkpoints (``storage_path``) and ``latest.json``, a
pointer {run, dir, epoch} to the newest one: a restarted worker group resumes from
``ray.train.get_checkpoint()``, or from the pointer when that is ahead of it; a new Train run resumes
from that pointer after the whole job died, or after Ray Train's controller failed (``fit_resuming``).
The workers' data (``jobs.data``) and rank 0's MLflow curves (``jobs.epochs.EpochCurves``) are the two
other pieces every worker loop uses.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from jobs.resources import WorkerResources

__all__ = ["TrainJobResources", "torch_trainer", "fit_resuming", "threads_for_cpus", "keep_freed_memory",
           "allreduce_mean", "gradient_mean", "allreduce_sum", "broadcast_module", "capped_batches",
           "steps_per_worker", "latest_checkpoint", "publish_latest", "report_checkpoint", "load_checkpoint_file",
           "numeric_metrics", "node_id", "tensors_digest", "LATEST", "META_FILE"]

LATEST = "latest.json"
META_FILE = "meta.json"
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


class TrainJobResources(BaseModel):
    """How a Ray Train stage runs: workers and what each asks of the cluster."""

    model_config = ConfigDict(extra="forbid")
    workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks)")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs per worker (fractions allowed)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; otherwise gloo on CPU")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint (-1: forever)")
    data_loading: Literal["memory", "ray_data"] = Field(
        "memory", description="memory: each worker reads and decodes its own rows once and keeps them as tensors "
                              "(augmentation batched on tensors); ray_data: stream and decode through Ray Data "
                              "every epoch (data larger than the workers' memory)")
    data_cpus: float = Field(1.0, ge=0, description="CPUs kept free for Ray Data's decode tasks (ray_data only)")
    custom_resources: dict[str, float] = Field(default_factory=dict, description="custom resources per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where the workers go: PACK fills a node first; SPREAD puts them on different nodes "
                            "while it can (a lost node's workers restart on the others); STRICT_* never bend")
    shared_memory_allreduce: bool = Field(
        True, description="CPU ranks on one node average gradients through a /dev/shm segment instead of gloo "
                          "(gloo when they span nodes, on a CPU other than x86-64, or when the segment would "
                          "exceed 256 MiB or not fit in /dev/shm)")
    report_poll_s: float = Field(
        0.5, gt=0, le=60, description="how often Ray Train's controller collects the workers' reports "
                                      "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2 s). A worker's per-epoch "
                                      "report waits until the controller has taken the previous one, so epochs "
                                      "shorter than this wait for it")

    def request(self) -> WorkerResources:
        return WorkerResources(self.workers, self.cpus_per_worker, 1.0 if self.use_gpu else 0.0,
                               dict(self.custom_resources), self.placement_strategy)

    def reserve(self) -> dict[str, float] | None:
        """CPUs kept free beside the workers: Ray Data's decode tasks need them, in-memory data does not."""
        return {"CPU": self.data_cpus} if self.data_loading == "ray_data" and self.data_cpus else None


def threads_for_cpus(cpus: float) -> int:
    """Whole CPUs a worker's torch should use for ``cpus`` logical CPUs (at least one thread)."""
    return max(1, math.floor(cpus + 1e-9))


def torch_trainer(worker_fn, loop_config: dict, request: WorkerResources, *, use_gpu: bool, run_name: str,
                  storage, max_failures: int, datasets: dict | None, report_poll_s: float):
    """The TorchTrainer both Train stages (search, retrain) run: gloo on CPU / NCCL on GPU, the
    validated worker request, checkpoints in the artifact store (``storage`` = ray_storage(store)),
    FailureConfig restarts from the latest checkpoint, the last two checkpoints kept. ``datasets``:
    Ray Datasets for ``ray.train.get_dataset_shard`` (None when the workers load their own data).
    ``report_poll_s``: the controller's poll interval (``TrainJobResources.report_poll_s``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.console import train_log_level

    # Ray Train reads its controller's poll interval only from the driver's environment, at fit().
    # Each worker's report queue holds one result, so with Ray's 2 s default a 1 s epoch waits ~1 s
    # for the controller (bench/bench_overhead.py, retrain with 2 workers).
    os.environ[REPORT_POLL_ENV] = f"{report_poll_s:g}"
    storage_path, storage_fs = storage
    return TorchTrainer(
        worker_fn, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(**request.scaling_kwargs()),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level=train_log_level())),
        datasets=datasets)


def fit_resuming(build: Callable[[dict | None, str], Any], ckpt_store, run_name: str, *, what: str,
                 say: Callable[[str], None], retries: int = 2, wait_s: float = 10.0):
    """``build(pointer, name).fit()``, run again from the ``latest.json`` pointer when Ray Train's
    controller fails; returns the Train ``Result``.

    Ray Train restarts a failed worker group by itself (``FailureConfig``), but a failure of its
    controller (for example the artifact store unreachable while it writes its own snapshot) ends
    ``fit()`` with a ``ControllerError``. The stage's checkpoints and pointer outlive it, so a new Train
    run (``{run_name}-retry{k}``) built from the pointer continues where the failed one stopped. Worker
    errors are not retried here (their budget is ``max_failures``), nor is a controller error that
    repeats ``retries`` times. ``build`` gets the pointer (None before the first checkpoint) and the
    Train run's name."""
    from ray.train import ControllerError

    name = run_name
    for attempt in range(retries + 1):
        pointer = latest_checkpoint(ckpt_store)
        try:
            result = build(pointer, name).fit()
        except ControllerError as e:
            if attempt == retries:
                raise RuntimeError(f"{what}: Ray Train's controller failed {retries + 1} times (last: "
                                   f"{e.controller_failure!r}); the checkpoints stay in "
                                   f"{ckpt_store.uri_for('')}: rerun with --resume once the cause "
                                   "(usually the artifact store) is fixed") from e
            name = f"{run_name}-retry{attempt + 1}"
            at = latest_checkpoint(ckpt_store)
            say(f"{what}: Ray Train's controller failed ({type(e.controller_failure).__name__}: "
                f"{str(e.controller_failure)[:200]}); a new Train run {name} continues from "
                f"{'epoch ' + str(at['epoch']) if at else 'the start'} in {wait_s:g}s")
            time.sleep(wait_s)
            continue
        if getattr(result, "error", None) is not None:
            raise RuntimeError(f"{what} Train run {name} failed: {result.error}") from result.error
        return result


# --------------------------------------------------------------------------- inside a worker
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """glibc's malloc keeps what a training step frees for the next step: no trimming below 1 GiB free,
    no mmap per allocation under 32 MiB, the heap grown 64 MiB at a time. True when it took (False off glibc).

    Otherwise a step's freed activations can go back to the kernel and the next step faults them in
    again, zeroed: up to 28,000 page faults per epoch in a 2-worker retrain rank, none with this
    (docs/benchmarks/overhead.md). The cost: a worker's resident memory stays near its peak."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1, mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1,
                mallopt(_M_TOP_PAD, 64 << 20) == 1])


def _mean_as_one_buffer(tensors: list[torch.Tensor], mean_: Callable[[torch.Tensor], Any]) -> None:
    """``tensors`` flattened into one buffer, averaged in place by ``mean_``, copied back."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    mean_(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def allreduce_mean(tensors: list[torch.Tensor]) -> None:
    """In-place mean of ``tensors`` across the process group, as one flat buffer (one collective)."""
    import torch.distributed as dist

    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return

    def mean_(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()

    _mean_as_one_buffer(tensors, mean_)


def gradient_mean(params: list[torch.Tensor], shared_memory: bool, device: torch.device,
                  log: Callable[[str], None] | None = None) -> Callable[[list[torch.Tensor]], None] | None:
    """The ``grad_sync`` of a worker loop: the in-place mean of a list of gradients across the ranks, one
    collective per call; through shared memory (``jobs.shm_allreduce``) when ``shared_memory`` and the
    ranks can, else ``allreduce_mean`` (gloo / NCCL). None for a single rank. Collective: every rank calls it."""
    import torch.distributed as dist

    from jobs.shm_allreduce import SharedMemoryAllReduce

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    shm = SharedMemoryAllReduce.for_params(params, device, log) if shared_memory else None
    if shm is None:
        return allreduce_mean

    def shared_memory_mean(tensors: list[torch.Tensor]) -> None:
        if any(t.dtype != torch.float32 for t in tensors):   # the segment holds float32 (same branch on every rank)
            return allreduce_mean(tensors)
        _mean_as_one_buffer(tensors, shm.mean_)

    return shared_memory_mean


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` from rank ``src`` (so all ranks start identical)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for t in itertools.chain(module.parameters(), module.buffers()):
        dist.broadcast(t.data, src)


def capped_batches(batches: Iterable, cap: int, on_step: Callable[[int], None] | None = None) -> Iterator:
    """Yield the first ``cap`` batches and drain the rest (data-parallel ranks must take the same
    number of steps, and a streaming split must be read to its end before the next epoch)."""
    n = 0
    for batch in batches:
        if n < cap:
            if on_step is not None:
                on_step(n)
            yield batch
        n += 1


def steps_per_worker(rows: int, workers: int, global_batch: int) -> tuple[int, int]:
    """(per-worker batch, steps per epoch) for ``rows`` split evenly over ``workers``."""
    per_rows = rows // workers
    batch = max(1, global_batch // workers)
    batch = min(batch, per_rows) if per_rows else batch
    return batch, (per_rows // batch if per_rows else 0)


# --------------------------------------------------------------------------- checkpoints
def latest_checkpoint(ckpt_store) -> dict | None:
    """The ``latest.json`` pointer of a checkpoint store ({run, dir, epoch}), or None."""
    if ckpt_store is None or not ckpt_store.exists(LATEST):
        return None
    return ckpt_store.get_json(LATEST)


def publish_latest(ckpt_store, run_name: str, dir_name: str, epoch: int, files: list[str]) -> None:
    ckpt_store.publish_json(LATEST, {"run": run_name, "dir": f"{run_name}/{dir_name}", "epoch": int(epoch),
                                     "files": files, "time": time.time()})


def report_checkpoint(metrics: dict, files: Mapping[str, bytes], dir_name: str) -> None:
    """``ray.train.report`` with a checkpoint made of ``files`` (written to a temporary directory)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="densenas-ckpt-") as d:
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=dir_name)


def load_checkpoint_file(name: str, ckpt_store, pointer: dict | None) -> tuple[bytes | None, str]:
    """The bytes of ``name`` from the newest complete checkpoint: Ray Train's (a restarted worker group)
    or the ``latest.json`` pointer (a new run after the whole job died, or a pointer ahead of Ray Train's).
    (None, "") when neither exists.

    Ray Train registers a checkpoint only when every rank's report for it has reached its controller.
    A rank that dies right after rank 0 uploaded and published epoch e leaves Ray Train at epoch e - 1,
    while the pointer (published only after the upload) already names epoch e: the pointer, read again
    here, wins, so the restart does not train and log epoch e twice."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            ray_epoch = _checkpoint_epoch(Path(d))
            ahead = _pointer_ahead_of(ckpt_store, ray_epoch)
            if ahead is None:
                return Path(d, name).read_bytes(), f"Ray Train checkpoint {ckpt.path}"
        return (ckpt_store.get_bytes(f"{ahead['dir']}/{name}", verify=False),
                f"{ckpt_store.uri_for(ahead['dir'])} (epoch {ahead['epoch']}; Ray Train's checkpoint was epoch "
                f"{ray_epoch})")
    if pointer is not None:
        return ckpt_store.get_bytes(f"{pointer['dir']}/{name}", verify=False), f"{ckpt_store.uri_for(pointer['dir'])}"
    return None, ""


def _checkpoint_epoch(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / META_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pointer_ahead_of(ckpt_store, epoch: int | None) -> dict | None:
    """The store's pointer when it names a later epoch than ``epoch`` (None: not ahead, or unreadable)."""
    if epoch is None:
        return None
    try:
        pointer = latest_checkpoint(ckpt_store)
    except Exception:  # noqa: BLE001 -- the store unreachable: Ray Train's checkpoint is still good
        return None
    if pointer is None or int(pointer.get("epoch", -1)) <= epoch:
        return None
    return pointer


def numeric_metrics(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record (what ``ray.train.report``, Tune and MLflow take)."""
    return {f"{prefix}{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def node_id() -> str:
    """The Ray node id when Ray is up, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        pass
    import socket

    return socket.gethostname()


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
