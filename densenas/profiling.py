"""Timing primitives of the profile stage: build what a signature describes, time it, summarise.

Pure PyTorch (no Ray): the profiling actors of ``jobs.profile`` call these, and so can a notebook.

- ``device_fingerprint(device, threads, dtype, batch)``: what a latency number depends on -- CPU
  model and thread count, or GPU name, compute capability, CUDA and driver versions; torch
  version, dtype, batch size. Two tables are interchangeable only when their fingerprints agree
  on ``FINGERPRINT_KEYS``.
- ``time_module(module, x, device, warmup, repeats)``: per-run forward times in ms, eval mode,
  ``no_grad``; ``warmup`` runs discarded. CPU: ``time.perf_counter`` around each forward (the
  thread count is whatever ``set_cpu_threads`` fixed). GPU: a CUDA event pair per run, recorded
  after a ``synchronize`` so earlier queued work is not charged to this run.
- ``measure_signature_stats`` / ``measure_model_stats``: the two things the profiler times -- one
  op signature (``densenas.latency.build_signature_module``) or a whole network -- summarised by
  ``robust_stats`` into ``LatencyStats`` (mean, median, std, p10, p90, count).

Why a fresh module per signature: the op's weights are random (latency does not depend on them),
and a fresh module keeps one measurement from warming the caches of another.
"""
from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from densenas.latency import LatencyStats, OpSignature, build_signature_module

__all__ = [
    "DTYPES",
    "FINGERPRINT_KEYS",
    "ProfilingError",
    "resolve_dtype",
    "set_cpu_threads",
    "steady_allocator",
    "cpu_model_name",
    "device_fingerprint",
    "fingerprint_mismatch",
    "time_module",
    "time_paired",
    "CPU_TIMERS",
    "robust_stats",
    "measure_signature_stats",
    "measure_model_stats",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The fields of a fingerprint that make two measurements comparable. ``hostname`` and the like are
# recorded for the reader but never compared: two identical machines may share a table.
FINGERPRINT_KEYS = ("kind", "name", "threads", "torch", "cuda", "driver", "capability", "dtype", "batch")


class ProfilingError(RuntimeError):
    """A measurement that cannot be made as asked (no CUDA, bad dtype, ...); the message says what to do."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ProfilingError(f"dtype {dtype!r} is not supported for profiling; use one of {list(DTYPES)}") from None


def set_cpu_threads(threads: int) -> int:
    """Fix the intra-op thread count of this process (and one inter-op thread); returns what holds now.

    The inter-op pool can only be sized before torch first uses it, so a failure there is ignored:
    the models timed here are sequential and never use it.
    """
    if threads < 1:
        raise ProfilingError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch.get_num_threads()


_STEADY_ALLOCATOR = False


def steady_allocator() -> None:
    """Keep glibc's allocator from handing activation buffers back to the kernel between forwards.

    By default glibc serves large blocks with ``mmap`` and unmaps them on free, and trims the heap's top,
    with thresholds that move as the process runs. A forward then pays page faults for its activations,
    and how many depends on the allocator's history, so one net's time wanders by 20-30 % within a
    process (docs/profiling.md). Raising the mmap threshold to glibc's maximum (32 MiB) and the trim
    threshold to 1 GiB makes the freed buffers be reused: what the PyTorch CPU tuning guide gets from
    jemalloc or tcmalloc. Process-wide and kept for the process's life; idempotent.
    """
    global _STEADY_ALLOCATOR
    if _STEADY_ALLOCATOR:
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        raise ProfilingError("protocol allocator 'steady' needs glibc's mallopt, which this platform lacks; "
                             "profile with allocator 'default'") from None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (mallopt(m_mmap_threshold, 32 * 1024 * 1024) and mallopt(m_trim_threshold, 1 << 30)):
        raise ProfilingError("glibc refused the 'steady' allocator settings (mallopt); profile with allocator "
                             "'default'")
    _STEADY_ALLOCATOR = True


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi (torch does not expose it); None when unavailable."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    return line.strip() or None


def device_fingerprint(device: str | torch.device = "cpu", threads: int | None = None,
                       dtype: str | torch.dtype = "float32", batch: int | None = None) -> dict[str, Any]:
    """What a latency measurement depends on (see ``FINGERPRINT_KEYS``), plus the host for the record.

    ``kind``/``name``/``threads`` are the keys ``LatencyTable.check_compatible`` compares.
    """
    device = torch.device(device)
    dt = resolve_dtype(dtype)
    fp: dict[str, Any] = {"kind": device.type, "torch": torch.__version__,
                          "dtype": str(dt).replace("torch.", ""), "batch": None if batch is None else int(batch),
                          "cpu": cpu_model_name(), "host": platform.node()}
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfilingError("device 'cuda' was asked for but torch sees no CUDA device here; "
                                 "profile on a GPU node (num_gpus=1 actors) or use device 'cpu'")
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        fp.update(name=torch.cuda.get_device_name(index), capability=f"{major}.{minor}",
                  cuda=torch.version.cuda, driver=_nvidia_driver_version(), threads=None)
    elif device.type == "cpu":
        fp.update(name=fp["cpu"], threads=int(threads if threads is not None else torch.get_num_threads()),
                  cuda=None, driver=None, capability=None)
    else:
        raise ProfilingError(f"device {device} is not supported for profiling; use 'cpu' or 'cuda'")
    return fp


def fingerprint_mismatch(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The ``FINGERPRINT_KEYS`` on which two fingerprints differ, as 'key: a vs b' strings."""
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in FINGERPRINT_KEYS if a.get(k) != b.get(k)]


CPU_TIMERS = ("wall", "thread_cpu")


def _cpu_clock(timer: str, repeats: int) -> Callable[[], float]:
    """The CPU clock of ``timer``, after checking the timing arguments."""
    if timer not in CPU_TIMERS:
        raise ProfilingError(f"timer must be one of {CPU_TIMERS}, got {timer!r}")
    if repeats < 1:
        raise ProfilingError(f"repeats must be >= 1, got {repeats}")
    return time.perf_counter if timer == "wall" else time.thread_time


@torch.no_grad()
def time_module(module: nn.Module, x: torch.Tensor, device: str | torch.device = "cpu", warmup: int = 10,
                repeats: int = 50, timer: str = "wall") -> list[float]:
    """Forward times of ``module(x)`` in ms: ``warmup`` runs discarded, then ``repeats`` timed runs.

    The module is put in eval mode. On CUDA each run is bracketed by CUDA events and the device is
    synchronised before the start event (so queued work is not charged) and after the end event.
    On CPU, ``timer`` ``wall`` is ``time.perf_counter``; ``thread_cpu`` is the calling thread's CPU
    time (``time.thread_time``): with one torch thread the whole forward runs in that thread, and the
    time other processes hold the core (a shared machine's preemption) is not charged to the net.
    """
    clock = _cpu_clock(timer, repeats)
    device = torch.device(device)
    module.eval()
    if device.type == "cuda":
        for _ in range(warmup):
            module(x)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start.record()
            module(x)
            end.record()
            end.synchronize()
            samples.append(float(start.elapsed_time(end)))
        return samples
    for _ in range(warmup):
        module(x)
    samples = []
    for _ in range(repeats):
        t0 = clock()
        module(x)
        samples.append((clock() - t0) * 1e3)
    return samples


@torch.no_grad()
def time_paired(module: nn.Module, x: torch.Tensor, reference: nn.Module, rx: torch.Tensor, warmup: int = 10,
                repeats: int = 50, timer: str = "wall") -> tuple[list[float], list[float]]:
    """CPU forward times (ms) of ``module(x)``, each followed at once by a forward of the fixed workload
    ``reference(rx)``: (module times, reference times), pair by pair.

    A shared machine's speed drifts by tens of percent over seconds (other tenants' cache and memory
    traffic, which a thread's CPU time does charge); the two forwards of a pair run at the same speed,
    so their ratio does not drift (``densenas.latency_model``'s reference protocol)."""
    clock = _cpu_clock(timer, repeats)
    module.eval()
    reference.eval()
    for _ in range(warmup):
        module(x)
        reference(rx)
    own, ref = [], []
    for _ in range(repeats):
        t0 = clock()
        module(x)
        t1 = clock()
        reference(rx)
        t2 = clock()
        own.append((t1 - t0) * 1e3)
        ref.append((t2 - t1) * 1e3)
    return own, ref


def robust_stats(samples: Sequence[float]) -> LatencyStats:
    """Mean, median, std, p10, p90 and count of timing samples (ms); the table serves the median."""
    return LatencyStats.from_samples(samples)


def _prepare(module: nn.Module, shape: Sequence[int], device: torch.device, dtype: torch.dtype
             ) -> tuple[nn.Module, torch.Tensor]:
    module = module.to(device=device, dtype=dtype).eval()
    x = torch.randn(*shape, device=device, dtype=dtype)
    return module, x


def measure_signature_stats(sig: OpSignature, device: str | torch.device = "cpu", warmup: int = 10,
                            repeats: int = 50, dtype: str | torch.dtype = "float32") -> LatencyStats:
    """Time one op signature: its module (``build_signature_module``) on a random batch of its input shape."""
    device, dt = torch.device(device), resolve_dtype(dtype)
    module, x = _prepare(build_signature_module(sig), (sig.batch, sig.c_in, sig.resolution, sig.resolution),
                         device, dt)
    return robust_stats(time_module(module, x, device, warmup, repeats))


def measure_model_stats(build: Callable[[], nn.Module] | nn.Module, input_shape: Sequence[int],
                        device: str | torch.device = "cpu", warmup: int = 10, repeats: int = 50,
                        dtype: str | torch.dtype = "float32") -> LatencyStats:
    """Time a whole network end to end (same protocol as the ops): ``build`` is a module or a factory."""
    device, dt = torch.device(device), resolve_dtype(dtype)
    module = build if isinstance(build, nn.Module) else build()
    module, x = _prepare(module, input_shape, device, dt)
    return robust_stats(time_module(module, x, device, warmup, repeats))
