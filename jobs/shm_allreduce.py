"""Gradient averaging through shared memory for the data-parallel ranks of one node (CPU training).

On a few CPU cores gloo's all-reduce costs more than the arithmetic: every call passes through two
helper threads and the loopback TCP stack, 2.3 ms on average after both ranks were ready in the
2-worker retrain of docs/benchmarks/overhead.md, whose steps take about 30 ms. Here each rank writes
its tensor into its own slot of a ``/dev/shm`` segment, publishes a call counter, spins (yielding the
core) until every rank has published, and adds the slots up itself, in rank order: every rank computes
the same sum with the same additions, so the result is identical bit for bit on all of them.

    sync = SharedMemoryAllReduce.for_params(params, device)   # collective; None -> keep gloo
    sync.mean_(flat)                                          # every rank, same order of calls
    ddp.register_comm_hook(sync, shared_memory_mean_hook)     # DDP's buckets through it

Two buffers alternate between calls, so a rank writes call s+2 into the buffer of call s only after
every rank has published call s+1, which each does after it finished reading call s. Publishing is
a plain store after the data's stores: ordered for other cores on x86-64 (TSO), so the segment is only
used there. ``for_group`` returns None (the caller keeps gloo) when the ranks span nodes, on another
CPU architecture, or when ``/dev/shm`` cannot hold the segment; every rank takes the same decision.
"""
from __future__ import annotations

import mmap
import os
import platform
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import torch

__all__ = ["SharedMemoryAllReduce", "shared_memory_mean_hook", "SHM_DIR", "MAX_SEGMENT_BYTES"]

SHM_DIR = Path("/dev/shm")
_COUNTER_STRIDE = 8          # int64s per rank's counter: one 64-byte cache line each
_SPINS_BEFORE_YIELD = 64
_YIELDS_BEFORE_SLEEP = 4096   # ~2-4 ms of yielding (a blocked gloo wait measured 0.65 ms median, 4 ms p90)
_SLEEP_S = 1e-4
MAX_SEGMENT_BYTES = 256 << 20   # two float32 copies of the gradients per rank: a 16M-parameter net on 2 ranks


_PREFIX = "densenas-allreduce-"


def _remove_stale_segments() -> None:
    """Segments whose creator died before every rank had mapped them (it unlinks them right after)."""
    for path in SHM_DIR.glob(f"{_PREFIX}*"):
        try:
            pid = int(path.name[len(_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, OSError):   # not ours, or a live process we may not signal
            continue


def _node_key() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class SharedMemoryAllReduce:
    """In-place mean of a float32 CPU tensor across the ranks of the default process group, on one node."""

    def __init__(self, path: Path, rank: int, world: int, capacity: int, timeout_s: float = 1800.0):
        self.rank, self.world, self.capacity, self.timeout_s = rank, world, capacity, timeout_s
        size = self.segment_bytes(world, capacity)
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        header = world * _COUNTER_STRIDE * 8
        self._counters = np.frombuffer(self._mm, dtype=np.int64, count=world * _COUNTER_STRIDE)
        data = np.frombuffer(self._mm, dtype=np.float32, count=2 * world * capacity, offset=header)
        self._slots = torch.from_numpy(data).view(2, world, capacity)
        self._calls = 0

    @staticmethod
    def segment_bytes(world: int, capacity: int) -> int:
        return world * _COUNTER_STRIDE * 8 + 2 * world * capacity * 4

    @classmethod
    def for_params(cls, params, device: torch.device, log=None) -> "SharedMemoryAllReduce | None":
        """``for_group`` sized to hold the gradients of all of ``params``; None off CPU."""
        if device.type != "cpu":
            return None
        return cls.for_group(sum(p.numel() for p in params), log=log)

    @classmethod
    def for_group(cls, capacity: int, timeout_s: float = 1800.0, log=None,
                  max_bytes: int = MAX_SEGMENT_BYTES) -> "SharedMemoryAllReduce | None":
        """Collective over the default process group: the segment every rank maps, or None on every rank
        when shared memory cannot or should not be used (the reason goes to ``log`` on rank 0)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        rank, world = dist.get_rank(), dist.get_world_size()
        keys: list = [None] * world
        dist.all_gather_object(keys, _node_key())
        reason = None
        if len(set(keys)) > 1:
            reason = "the ranks are on more than one node"
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            reason = f"{platform.machine()} is not x86-64 (publishing relies on its store order)"
        elif cls.segment_bytes(world, capacity) > max_bytes:
            reason = (f"the segment would take {cls.segment_bytes(world, capacity) / 2**20:.0f} MiB "
                      f"(over {max_bytes / 2**20:.0f} MiB)")
        path = None
        if reason is None and rank == 0:
            _remove_stale_segments()
            path = SHM_DIR / f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.posix_fallocate(fd, 0, cls.segment_bytes(world, capacity))
                finally:
                    os.close(fd)
            except OSError as e:
                reason = f"{SHM_DIR} cannot hold {cls.segment_bytes(world, capacity) / 2**20:.1f} MiB ({e})"
                path.unlink(missing_ok=True)
        decision = [str(path) if reason is None else None, reason]
        dist.broadcast_object_list(decision, src=0)
        if decision[0] is None:
            if rank == 0 and log is not None and decision[1]:
                log(f"gradient all-reduce through gloo: {decision[1]}")
            return None
        sync, error = None, None
        try:
            sync = cls(Path(decision[0]), rank, world, capacity, timeout_s)
        except OSError as e:
            error = f"rank {rank} could not map {decision[0]} ({e})"
        errors: list = [None] * world
        dist.all_gather_object(errors, error)   # every rank has mapped it (or failed) before it goes
        if rank == 0:
            Path(decision[0]).unlink(missing_ok=True)
        failed = [e for e in errors if e]
        if failed:
            if sync is not None:
                sync.close()
            if rank == 0 and log is not None:
                log(f"gradient all-reduce through gloo: {failed[0]}")
            return None
        return sync

    def mean_(self, flat: torch.Tensor) -> torch.Tensor:
        """Replace ``flat`` (1-d float32, CPU, at most ``capacity`` elements) by its mean over the ranks.
        Every rank must call this the same number of times, with tensors of the same size each time."""
        n = flat.numel()
        if n > self.capacity or flat.dtype != torch.float32 or flat.device.type != "cpu" or flat.dim() != 1:
            raise ValueError(f"shared-memory all-reduce takes a 1-d float32 CPU tensor of at most "
                             f"{self.capacity} elements, got {tuple(flat.shape)} {flat.dtype} on {flat.device}")
        self._calls += 1
        call, buf = self._calls, self._slots[self._calls % 2]
        buf[self.rank, :n].copy_(flat)
        self._counters[self.rank * _COUNTER_STRIDE] = call
        self._wait_for(call)
        flat.copy_(buf[0, :n])
        for j in range(1, self.world):
            flat.add_(buf[j, :n])
        return flat.div_(self.world)

    def _wait_for(self, call: int) -> None:
        counters, stride = self._counters, _COUNTER_STRIDE
        start = None
        for j in range(self.world):
            spins = 0
            while counters[j * stride] < call:
                spins += 1
                if spins < _SPINS_BEFORE_YIELD:
                    continue
                if spins < _YIELDS_BEFORE_SLEEP:
                    os.sched_yield()   # the core goes to whatever else is runnable (the late rank, if it was preempted)
                    continue
                # a long wait (a slow or dead rank, more ranks than cores): stop burning the core
                time.sleep(_SLEEP_S)
                now = time.monotonic()
                start = start or now
                if now - start > self.timeout_s:
                    raise TimeoutError(f"rank {self.rank}: rank {j} did not reach gradient all-reduce call "
                                       f"{call} within {self.timeout_s:g}s (it died or hangs); Ray Train "
                                       "restarts the worker group from the last checkpoint")

    def close(self) -> None:
        self._slots = self._counters = None
        try:
            self._mm.close()
        except BufferError:   # a view is still alive somewhere: the mapping goes with the process
            pass


def shared_memory_mean_hook(sync: SharedMemoryAllReduce, bucket):   # no annotations: DDP checks them as objects
    """A DDP comm hook: the bucket's gradients averaged through ``sync`` (in place), already done."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(sync.mean_(bucket.buffer()))
    return fut
