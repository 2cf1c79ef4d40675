"""The profile stage: a latency lookup table measured by Ray actors, and how well it predicts whole nets.

``run(ProfileConfig, ProfileInputs(space, num_classes), ctx) -> ProfileOutput``

1. Signatures: every distinct op signature the space needs (``densenas.latency.space_signatures``,
   from the same space object the super network is built from): stem, first layer, each head op of
   each edge fed its source block's output, each stacking op, each final 1x1 conv, the classifier.
   Identical signatures are measured once.
2. Actors: one ``ProfilerActor`` per device slot -- CPU actors hold ``threads_per_actor`` CPUs and
   fix torch's thread count to it; GPU actors hold one GPU and time with CUDA events. Eval mode,
   ``no_grad``, warm-up runs discarded, ``repeats`` timed runs; mean, median, std, p10, p90, count.
3. Queue: the driver keeps a queue of signature batches and hands one batch to each idle actor
   (``ray.wait``), so actors on several nodes share the work. An actor that dies has its batch put
   back at the front of the queue and a replacement started (up to ``max_actor_restarts``); an
   actor whose batch runs past ``task_timeout_s`` is treated as dead.
4. Resumable: measurements are saved to the store every ``save_every`` results
   (``profile_measurements.json``, in ``ctx.checkpoint_store`` under the pipeline), and anything
   already measured for the same device fingerprint and measurement protocol (all of
   ``MeasurementProtocol`` but the statistic) is not measured again -- neither from that file nor
   from an earlier ``latency_table.json`` in the store.
5. The table (``latency_table.json``, published atomically): ``densenas.latency.LatencyTable`` --
   entries keyed by signature, the space hash, units, and the device record: the fingerprint
   (``densenas.profiling.device_fingerprint``: CPU model, threads, GPU name, CUDA/driver, torch,
   dtype, batch) plus ``protocol`` (``densenas.latency_model.MeasurementProtocol``: batch, threads,
   dtype, memory format, warm-up, repeats, statistic, timer). The search refuses a table of another
   space or device (``check_compatible``).
6. The latency model (``densenas.latency_model``): ``calibration_paths`` random nets and
   ``report_paths`` other, held-out random nets, each timed end to end by the same actors under the
   same protocol (``measure_net_latency``). The calibration is fitted on the first set only and
   goes into the published table (``meta["latency_model"]``), so every consumer that loads the table
   -- search, derive, sweep, retrain, ``predict_latency`` -- uses the model; ``accuracy_report.json``
   and ``latency_scatter.png`` score it (and the plain sum) on the held-out nets.
CLI: ``python -m jobs.profile --config configs/tiny.yaml [--actors N] [--out URI]`` prints
``[profile] 37/120 signatures, 2 actors, eta 40 s`` as it goes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from densenas.latency import LatencyStats, LatencyTable, OpSignature, load_cost_model, space_signatures
from densenas.latency_model import (DEFAULT_REFERENCE, LatencyModel, MeasurementProtocol, fit_calibration,
                                    unit_features, unit_kind_sums)
from densenas.latency_report import accuracy_metrics, net_signatures, sample_random_nets
from densenas.profiling import FINGERPRINT_KEYS, fingerprint_mismatch
from densenas.space import SearchSpace, load_space
from jobs.context import LOCAL_STORE, StageContext, StageOutput, resolve_space

__all__ = [
    "ProfileConfig",
    "ProfileError",
    "ProfilerActor",
    "Profiler",
    "ProfileInputs",
    "ProfileOutput",
    "run",
    "resolve_cost_model",
    "table_from_uri",
    "scaled_space",
    "TABLE_KEY",
    "REPORT_KEY",
    "SCATTER_KEY",
    "MEASUREMENTS_KEY",
    "main",
]

TABLE_KEY = "latency_table.json"
REPORT_KEY = "accuracy_report.json"
SCATTER_KEY = "latency_scatter.png"
MEASUREMENTS_KEY = "profile_measurements.json"
MEASUREMENTS_FORMAT = "densenas-profile-measurements/1"


class ProfileError(RuntimeError):
    """The profile stage cannot proceed; the message names the problem and what to do."""


class ProfileConfig(BaseModel):
    """The profile stage's config section (``profile:`` in the experiment YAML).

    ``workers`` / ``threads_per_worker`` are accepted as old spellings of ``actors`` /
    ``threads_per_actor``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    device: Literal["cpu", "cuda"] = Field("cpu", description="where the table is measured")
    actors: int = Field(1, ge=1, validation_alias=AliasChoices("actors", "workers"),
                        description="profiling actors (device slots) sharing the queue")
    threads_per_actor: int = Field(1, ge=1, validation_alias=AliasChoices("threads_per_actor", "threads_per_worker"),
                                   description="torch intra-op threads of a CPU actor (recorded in the table)")
    batch_size: int = Field(32, ge=1, description="images per forward (paper: 32)")
    input_size: int | None = Field(None, ge=1, description="profile the space scaled to this input size "
                                                           "(None: the space's own; the table then belongs "
                                                           "to the scaled space)")
    num_classes: int | None = Field(None, ge=1, description="classifier width; None: the pipeline's "
                                                            "data.classes when it is a count, else 1000")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    memory_format: Literal["contiguous", "channels_last"] = Field(
        "contiguous", description="memory format of the input and weights (part of the protocol)")
    timer: Literal["wall", "thread_cpu"] = Field(
        "wall", description="CPU clock: 'wall' (perf_counter) or 'thread_cpu' (the thread's CPU time: a shared "
                            "machine's preemption is not charged; needs threads_per_actor 1). CUDA: CUDA events")
    warmup: int = Field(20, ge=0, description="discarded runs per signature")
    repeats: int = Field(2000, ge=1, description="timed runs per signature (paper: 2,000)")
    allocator: Literal["default", "steady"] = Field(
        "steady", description="CPU: 'steady' keeps glibc from unmapping activation buffers between forwards, so a "
                              "net's time does not wander with the allocator's history; 'default' leaves it")
    reference: str = Field(
        DEFAULT_REFERENCE, description="CPU: an op signature without its batch, run right after each timed "
                                       "forward; samples are the ratio of the two times (immune to a shared "
                                       "machine's speed drift) times the reference's own time, fixed once per "
                                       "table. 'none': plain times")
    statistic: Literal["median", "mean", "p10", "p90"] = Field(
        "median", description="what the table serves and the report compares (p10 resists a loaded machine)")
    calibration_paths: int = Field(20, ge=0, description="random nets timed end to end to fit the latency model's "
                                                         "calibration (0: no calibration, the plain sum)")
    report_concurrency: int | None = Field(
        1, ge=1, description="whole nets timed at once across the actors; 1: each net alone (as the retrain stage "
                             "times the derived net), since a net timed while another actor works on a core of the "
                             "same machine is slowed by the shared caches and memory bandwidth; None: one per actor")
    report_rounds: int = Field(1, ge=1, description="each report net is timed in this many rounds spread over the "
                                                    "report (repeats split between them; its statistic is the median "
                                                    "over rounds), so a machine whose speed drifts while the nets are "
                                                    "timed slows every net alike")
    report_paths: int = Field(50, ge=0, description="held-out random nets of the accuracy report, none of them a "
                                                    "calibration net (0: no report)")
    seed: int = Field(0, description="seed of the random nets (calibration and held-out drawn as one distinct set)")
    signatures_per_task: int = Field(4, ge=1, description="signatures handed to an actor at a time")
    save_every: int = Field(20, ge=1, description="save measurements to the store every N results")
    num_cpus_per_actor: float | None = Field(None, ge=0, description="Ray CPUs per actor (None: threads_per_actor "
                                                                      "on CPU, 1 on CUDA)")
    resources_per_actor: dict[str, float] = Field(default_factory=dict,
                                                  description="extra Ray resources per actor, e.g. {node_type_a: 1}")
    placement: Literal["default", "spread"] = Field(
        "default", description="'spread': actors go to different nodes where they can (Ray's SPREAD scheduling "
                               "strategy), so one table is measured across a multi-node cluster's nodes")
    max_actor_restarts: int = Field(4, ge=0, description="replacement actors started after actor deaths")
    actor_start_timeout_s: float = Field(300.0, gt=0, description="fail when no actor is ready after this long")
    task_timeout_s: float = Field(900.0, gt=0, description="a batch running longer marks its actor as hung")

    @model_validator(mode="after")
    def _protocol_is_valid(self) -> "ProfileConfig":
        self.measurement_protocol()  # e.g. timer thread_cpu with 2 threads: refused here, with the reason
        return self

    def ray_resources(self) -> dict[str, float]:
        """What one actor asks Ray for."""
        cpus = self.num_cpus_per_actor
        if cpus is None:
            cpus = float(self.threads_per_actor) if self.device == "cpu" else 1.0
        res = {"CPU": float(cpus), **{k: float(v) for k, v in self.resources_per_actor.items()}}
        if self.device == "cuda":
            res["GPU"] = 1.0
        return res

    def measurement_protocol(self) -> MeasurementProtocol:
        """How every number of the stage is measured (ops, report nets; the retrain stage reads it back
        from the table's device record)."""
        cpu = self.device == "cpu"
        return MeasurementProtocol(device=self.device, batch=self.batch_size,
                                   threads=self.threads_per_actor if cpu else None,
                                   dtype=self.dtype, memory_format=self.memory_format, warmup=self.warmup,
                                   repeats=self.repeats, statistic=self.statistic,
                                   timer=self.timer if cpu else "cuda_events",
                                   allocator=self.allocator if cpu else "default",
                                   reference=self.reference if cpu else "none")

    def protocol(self) -> dict[str, Any]:
        """What decides whether a stored measurement can be reused: the protocol but its statistic
        (every statistic is stored)."""
        return self.measurement_protocol().measurement_key()


# --------------------------------------------------------------------------- the actor
class ProfilerActor:
    """Times signatures and whole networks on one device slot (wrapped with ``ray.remote`` at run time)."""

    def __init__(self, protocol: Mapping[str, Any]):
        import torch

        from densenas.profiling import device_fingerprint, set_cpu_threads

        self.protocol = MeasurementProtocol.from_dict(protocol)
        p = self.protocol
        if p.device == "cpu":
            set_cpu_threads(p.threads)
        self.device = "cuda:0" if p.device == "cuda" else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to our GPU
        self._fp = device_fingerprint(self.device, p.threads, p.dtype, p.batch)
        self._fp["pid"] = os.getpid()
        try:
            import ray

            self._fp["node_id"] = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray (tests call the class directly)
            self._fp["node_id"] = None
        torch.manual_seed(0)

    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fp)

    def _protocol(self, protocol: Mapping[str, Any] | None) -> MeasurementProtocol:
        return self.protocol if protocol is None else MeasurementProtocol.from_dict(protocol)

    def measure_reference(self, protocol: Mapping[str, Any] | None = None, paired_with: dict | None = None) -> float:
        """The protocol's reference workload timed right after forwards of ``paired_with`` (an architecture
        document), median ms: one actor's proposal for ``reference_ms``."""
        from densenas.latency_model import reference_latency_ms

        return reference_latency_ms(self._protocol(protocol), paired_with)

    def measure_signatures(self, keys: Sequence[str], protocol: Mapping[str, Any] | None = None
                           ) -> list[tuple[str, dict, float]]:
        """(key, stats, seconds spent) per signature key (``protocol``: the driver's, with its reference_ms)."""
        from densenas.latency import build_signature_module
        from densenas.latency_model import time_forward

        proto = self._protocol(protocol)
        out = []
        for key in keys:
            t0 = time.perf_counter()
            sig = OpSignature.parse(key)
            stats = time_forward(build_signature_module(sig), (sig.batch, sig.c_in, sig.resolution, sig.resolution),
                                 proto)
            out.append((key, stats.to_dict(), time.perf_counter() - t0))
        return out

    def measure_nets(self, items: Sequence[tuple[str, dict]], repeats: int | None = None,
                     protocol: Mapping[str, Any] | None = None) -> list[tuple[str, dict, float]]:
        """(key, stats, seconds) per (key, arch document): the whole network, end to end
        (``measure_net_latency``, the project's one whole-net measurement); ``repeats`` overrides the
        protocol's for one round of a multi-round report."""
        from densenas.latency_model import measure_net_latency

        protocol = self._protocol(protocol)
        if repeats is not None:
            protocol = protocol.with_(repeats=int(repeats))
        out = []
        for key, doc in items:
            t0 = time.perf_counter()
            lat = measure_net_latency(doc, protocol)
            stats = {k: lat[k] for k in ("mean", "median", "std", "p10", "p90", "count")}
            out.append((key, stats, time.perf_counter() - t0))
        return out


@dataclass
class _Slot:
    """One actor of the pool and its state as the driver sees it."""

    index: int
    handle: Any
    ready_ref: Any
    ready: bool = False
    busy_since: float | None = None
    fingerprint: dict | None = None


@dataclass
class QueueStats:
    actor_deaths: int = 0
    requeued_batches: int = 0
    replacements: int = 0
    per_actor_results: Counter = field(default_factory=Counter)
    per_node_results: Counter = field(default_factory=Counter)   # Ray node id -> results measured there
    actor_nodes: list = field(default_factory=list)         # node id of every actor that became ready


# --------------------------------------------------------------------------- space helpers
def scaled_space(space: SearchSpace, input_size: int | None) -> SearchSpace:
    """The space with every resolution scaled to ``input_size`` (a different workload, hence hash)."""
    if input_size is None or input_size == space.input_size:
        return space
    doc = space.to_dict()
    old = space.input_size
    res = []
    for r in doc["resolutions"]:
        if (r * input_size) % old:
            raise ProfileError(f"input_size {input_size} does not scale the space's resolutions {doc['resolutions']} "
                               f"(input {old}) to integers; pick a multiple of {old // math.gcd(old, max(doc['resolutions']))}"
                               " or leave profile.input_size unset")
        res.append(r * input_size // old)
    doc.update(input_size=input_size, resolutions=res)
    try:
        out = load_space(doc)
    except ValueError as e:
        raise ProfileError(f"profile.input_size={input_size} gives an invalid space: {e}") from None
    out.name = f"{space.name or 'space'}@{input_size}"
    return out


def _num_classes(cfg: ProfileConfig, num_classes: int | None) -> int:
    """The classifier width of the profiled nets: the config's, else the data's, else ImageNet's."""
    return cfg.num_classes or num_classes or 1000


# --------------------------------------------------------------------------- the driver
class Profiler:
    """One profile run: actors, the work queue, resumable measurements, the table and the report.

    ``callbacks`` are called after every result with an event dict ``{phase, done, total, slots}``
    (``slots``: the live ``_Slot`` objects, whose ``.handle`` is the actor) -- for progress sinks,
    and for tests that kill an actor mid-run.
    """

    def __init__(self, cfg: ProfileConfig, space: Any, store: Any, ctx: Any = None,
                 callbacks: Iterable[Callable[[dict], None]] = (), log: Callable[[str], None] | None = None,
                 num_classes: int | None = None):
        self.cfg, self.store, self.ctx = cfg, store, ctx
        self.space = scaled_space(load_space(space), cfg.input_size)
        self.num_classes = _num_classes(cfg, num_classes)
        self.callbacks = list(callbacks)
        progress = getattr(ctx, "progress", None)
        self.log = log or (progress if callable(progress) else (lambda m: print(f"[profile] {m}", flush=True)))
        ckpt = getattr(ctx, "checkpoint_store", None)
        self.ckpt_store = ckpt if ckpt is not None else store
        self.slots: list[_Slot] = []
        self.qstats = QueueStats()
        self.fingerprint: dict | None = None
        self.sig_stats: dict[str, dict] = {}
        self.net_stats: dict[str, dict] = {}
        self.reference_ms: float | None = None  # fixed once per table: measured, or adopted with reused numbers
        self._unsaved = 0
        self._next_index = 0

    @property
    def protocol(self) -> MeasurementProtocol:
        """The config's protocol with this table's ``reference_ms``."""
        return self.cfg.measurement_protocol().with_(reference_ms=self.reference_ms)

    # ------------------------------------------------------------------ actors
    def _actor_class(self):
        import ray

        res = self.cfg.ray_resources()
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        return ray.remote(ProfilerActor).options(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0),
                                                 resources=custom or None, max_restarts=0, max_task_retries=0,
                                                 scheduling_strategy="SPREAD" if self.cfg.placement == "spread"
                                                 else "DEFAULT")

    def _check_resources(self) -> int:
        """How many actors fit the cluster at all; refuse a request that can never be placed."""
        import ray

        need = self.cfg.ray_resources()
        total = ray.cluster_resources()
        fits = []
        for k, v in need.items():
            if v <= 0:
                continue
            have = float(total.get(k, 0.0))
            if have < v:
                what = ("GPUs: profile.device 'cuda' needs a GPU node (or use device 'cpu')" if k == "GPU"
                        else f"{k}: lower threads_per_actor / num_cpus_per_actor" if k == "CPU"
                        else f"custom resource {k!r}: start nodes with it or drop it from resources_per_actor")
                raise ProfileError(f"one profiling actor needs {v:g} {k} but the Ray cluster has {have:g} {what}; "
                                   f"a request that can never be placed would wait forever")
            fits.append(int(have // v))
        n = min([self.cfg.actors] + fits)
        if n < self.cfg.actors:
            self.log(f"the cluster fits {n} actor(s) of {need}, not the {self.cfg.actors} asked for; using {n}")
        return n

    def _start_actor(self) -> _Slot:
        cls = self._actor_class()
        handle = cls.remote(self.cfg.measurement_protocol().to_dict())
        slot = _Slot(self._next_index, handle, handle.fingerprint.remote())
        self._next_index += 1
        self.slots.append(slot)
        return slot

    def _drop(self, slot: _Slot, why: str, kill: bool = True) -> None:
        import ray

        if slot in self.slots:
            self.slots.remove(slot)
        if kill:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:
                pass
        self.log(f"actor {slot.index} dropped: {why}")

    def _replace(self, why: str) -> None:
        if self.qstats.replacements >= self.cfg.max_actor_restarts:
            self.log(f"not replacing the lost actor ({why}): max_actor_restarts={self.cfg.max_actor_restarts} used")
            return
        self.qstats.replacements += 1
        slot = self._start_actor()
        self.log(f"started replacement actor {slot.index} ({why})")

    def _on_ready(self, slot: _Slot) -> None:
        import ray

        fp = ray.get(slot.ready_ref)
        slot.ready, slot.fingerprint = True, fp
        if fp.get("node_id"):
            self.qstats.actor_nodes.append(fp["node_id"])
        if self.fingerprint is None:
            self.fingerprint = {k: v for k, v in fp.items() if k not in ("pid", "node_id")}
            self.log("device: " + ", ".join(f"{k}={fp.get(k)}" for k in ("kind", "name", "threads", "dtype", "batch",
                                                                          "torch", "cuda", "driver")
                                             if fp.get(k) is not None))
            return
        diff = fingerprint_mismatch(self.fingerprint, fp)
        if diff:
            self._drop(slot, f"its device differs from the table's ({'; '.join(diff)}); one table, one device")

    # ------------------------------------------------------------------ the queue
    def _run_queue(self, phase: str, items: list[Any], method: str, per_task: int,
                   on_result: Callable[[str, dict], None], max_inflight: int | None = None,
                   kwargs: Mapping[str, Any] | None = None) -> None:
        """Hand ``items`` out in batches to idle actors until every item has a result (at most
        ``max_inflight`` batches at once when given)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:  # ActorUnavailableError is not a RayActorError subclass in every Ray version
            from ray.exceptions import ActorUnavailableError
            lost_errors: tuple = (RayActorError, ActorUnavailableError)
        except ImportError:
            lost_errors = (RayActorError,)
        total = len(items)
        pending = deque(list(items[i:i + per_task]) for i in range(0, total, per_task))
        inflight: dict[Any, tuple[_Slot, list]] = {}
        done_count, t0, last_print = 0, time.monotonic(), 0.0
        no_ready_since = time.monotonic()
        while pending or inflight:
            for slot in [s for s in self.slots if s.ready and s.busy_since is None]:
                if not pending or (max_inflight is not None and len(inflight) >= max_inflight):
                    break
                batch = pending.popleft()
                ref = getattr(slot.handle, method).remote(batch, **dict(kwargs or {}))
                inflight[ref] = (slot, batch)
                slot.busy_since = time.monotonic()
            starting = {s.ready_ref: s for s in self.slots if not s.ready}
            if not inflight and not starting:
                raise ProfileError(f"every profiling actor died and no replacement is left "
                                   f"({self.qstats.actor_deaths} deaths, max_actor_restarts="
                                   f"{self.cfg.max_actor_restarts}); {done_count}/{total} {phase} measured and "
                                   "saved -- run again to resume, and check the actors' logs (out of memory?)")
            if any(s.ready for s in self.slots):
                no_ready_since = time.monotonic()
            elif time.monotonic() - no_ready_since > self.cfg.actor_start_timeout_s:
                raise ProfileError(f"no profiling actor became ready within {self.cfg.actor_start_timeout_s:.0f} s "
                                   f"(each asks for {self.cfg.ray_resources()}; cluster has "
                                   f"{ray.available_resources()} free): free resources or lower actors/threads")
            done, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=2.0)
            for ref in done:
                if ref in starting:
                    slot = starting[ref]
                    try:
                        self._on_ready(slot)
                    except lost_errors as e:
                        self.qstats.actor_deaths += 1
                        self._drop(slot, f"died while starting ({type(e).__name__})", kill=False)
                        self._replace("actor died while starting")
                    except RayTaskError as e:
                        raise ProfileError(f"a profiling actor failed to start: {e}") from None
                    continue
                slot, batch = inflight.pop(ref)
                slot.busy_since = None
                try:
                    results = ray.get(ref)
                except lost_errors as e:
                    self.qstats.actor_deaths += 1
                    self.qstats.requeued_batches += 1
                    pending.appendleft(batch)
                    self._drop(slot, f"died with {len(batch)} {phase} in hand ({type(e).__name__}); re-queued",
                               kill=False)
                    self._replace("actor died")
                    continue
                except RayTaskError as e:
                    raise ProfileError(f"measuring {phase} {batch} failed on actor {slot.index}: {e.cause!r}; "
                                       "this is a bug in the op or the network, not a lost actor") from None
                for key, stats, _ in results:
                    on_result(key, stats)
                    done_count += 1
                self.qstats.per_actor_results[slot.index] += len(results)
                node = (slot.fingerprint or {}).get("node_id")
                if node:  # which nodes did the measuring (a multi-node run proves its actors spread)
                    self.qstats.per_node_results[node] += len(results)
                now = time.monotonic()
                if now - last_print > 2.0 or done_count == total:
                    last_print = now
                    rate = done_count / max(now - t0, 1e-9)
                    eta = (total - done_count) / rate if rate > 0 else float("nan")
                    n_live = sum(1 for s in self.slots if s.ready)
                    self.log(f"{done_count}/{total} {phase}, {n_live} actors, eta {eta:.0f} s")
                for cb in self.callbacks:
                    cb({"phase": phase, "done": done_count, "total": total, "slots": list(self.slots)})
            # A batch that runs far too long: its actor is hung (a stuck node); kill it and re-queue.
            now = time.monotonic()
            for ref, (slot, batch) in list(inflight.items()):
                if slot.busy_since is not None and now - slot.busy_since > self.cfg.task_timeout_s:
                    inflight.pop(ref)
                    self.qstats.actor_deaths += 1
                    self.qstats.requeued_batches += 1
                    pending.appendleft(batch)
                    self._drop(slot, f"batch ran past task_timeout_s={self.cfg.task_timeout_s:.0f} s; re-queued")
                    self._replace("hung actor")

    def _fix_reference_ms(self) -> None:
        """Time the protocol's reference workload on every ready actor (median of their medians) unless
        reused measurements already fixed ``reference_ms``. The reference runs right after forwards of one
        fixed net of the space (the first calibration net), as it runs when a net is timed, so ratio x
        reference_ms reads as that net's own ms at the machine's speed of that moment."""
        import ray

        if self.cfg.measurement_protocol().reference == "none" or self.reference_ms is not None:
            return
        slots = [s for s in self.slots if s.ready]
        proto = self.cfg.measurement_protocol().to_dict()
        pair = sample_random_nets(self.space, 1, self.cfg.seed, self.num_classes)[0].arch.to_dict()
        times, error = [], None
        for ref in [s.handle.measure_reference.remote(proto, pair) for s in slots]:
            try:  # an actor lost here is replaced by the queue later; one that answered is enough
                times.append(ray.get(ref, timeout=self.cfg.task_timeout_s))
            except Exception as e:
                error = e
        if not times:
            raise ProfileError(f"no profiling actor could time the reference workload ({error}); check the Ray "
                               "worker logs and run again")
        self.reference_ms = float(statistics.median(times))
        self.log(f"reference {self.cfg.reference}: {self.reference_ms:.3f} ms as paired with a net (median of "
                 f"{len(times)} actor(s)); every number of this table is a ratio to it, in these ms")

    # ------------------------------------------------------------------ resumable measurements
    def _load_previous(self) -> None:
        """Measurements of an earlier (partial or finished) run with the same device and protocol."""
        from cluster.storage import StorageError

        fp, proto = self.fingerprint, self.cfg.protocol()
        sources = []
        for store, key in ((self.ckpt_store, MEASUREMENTS_KEY), (self.store, TABLE_KEY)):
            try:
                if store.exists(key):
                    sources.append((key, store.get_json(key)))
            except StorageError as e:
                self.log(f"ignoring unreadable {key}: {e}")
        for key, doc in sources:
            if key == TABLE_KEY:
                device = doc.get("device", {})
                try:
                    doc_proto = MeasurementProtocol.from_dict(device.get("protocol") or {}).measurement_key()
                except (ValueError, TypeError):
                    doc_proto = None
                sigs, nets = doc.get("entries", {}), {}
            else:
                device, doc_proto = doc.get("fingerprint", {}), doc.get("protocol", {})
                sigs, nets = doc.get("signatures", {}), doc.get("nets", {})
            diff = fingerprint_mismatch(fp, device)
            if diff or doc_proto != proto:
                self.log(f"not reusing {key}: measured on another device or protocol "
                         f"({'; '.join(diff) or f'protocol {doc_proto} vs {proto}'})")
                continue
            ref_ms = (device.get("protocol") or {}).get("reference_ms") if key == TABLE_KEY else doc.get("reference_ms")
            if self.cfg.measurement_protocol().reference != "none":
                if ref_ms is None or (self.reference_ms is not None and ref_ms != self.reference_ms):
                    self.log(f"not reusing {key}: its numbers are in another reference_ms ({ref_ms})")
                    continue
                self.reference_ms = float(ref_ms)
            for k, v in sigs.items():
                self.sig_stats.setdefault(k, v)
            for k, v in nets.items():
                self.net_stats.setdefault(k, v)

    def _save(self, force: bool = False) -> None:
        if not force and self._unsaved < self.cfg.save_every:
            return
        self.ckpt_store.publish_json(MEASUREMENTS_KEY, {
            "format": MEASUREMENTS_FORMAT, "fingerprint": self.fingerprint, "protocol": self.cfg.protocol(),
            "reference_ms": self.reference_ms, "signatures": self.sig_stats, "nets": self.net_stats, "time": time.time()})
        self._unsaved = 0

    def _record(self, target: dict) -> Callable[[str, dict], None]:
        def on_result(key: str, stats: dict) -> None:
            target[key] = stats
            self._unsaved += 1
            self._save()
        return on_result

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        import ray

        t_start = time.monotonic()
        cfg, space = self.cfg, self.space
        if not ray.is_initialized():
            self.log("no Ray connected; starting a local Ray")
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        sigs = space_signatures(space, cfg.batch_size, self.num_classes)
        n_actors = self._check_resources()
        self.log(f"space {space.name} ({space.space_hash()[:12]}): {len(sigs)} distinct signatures at batch "
                 f"{cfg.batch_size}, {cfg.warmup} warm-up + {cfg.repeats} timed runs each, {n_actors} "
                 f"{cfg.device} actor(s) x {cfg.threads_per_actor if cfg.device == 'cpu' else 1} thread(s)")
        try:
            for _ in range(n_actors):
                self._start_actor()
            # The device fingerprint comes from an actor (the driver may be on a node without the device).
            deadline = time.monotonic() + cfg.actor_start_timeout_s
            while self.fingerprint is None:
                starting = {s.ready_ref: s for s in self.slots if not s.ready}
                if not starting:
                    raise ProfileError("every profiling actor died while starting; check the Ray worker logs")
                done, _ = ray.wait(list(starting), num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
                if not done:
                    raise ProfileError(f"no profiling actor started within {cfg.actor_start_timeout_s:.0f} s "
                                       f"(each asks for {cfg.ray_resources()}); free resources or lower actors")
                try:
                    self._on_ready(starting[done[0]])
                except Exception as e:
                    self._drop(starting[done[0]], f"failed to start: {e}")
                    self.qstats.actor_deaths += 1
                    self._replace("actor failed to start")
            self._load_previous()
            self._fix_reference_ms()
            todo = [s.key for s in sigs if s.key not in self.sig_stats]
            reused_sigs = len(sigs) - len(todo)
            if reused_sigs:
                self.log(f"reusing {reused_sigs} signatures measured earlier on this device; {len(todo)} to measure")
            self._run_queue("signatures", todo, "measure_signatures", cfg.signatures_per_task,
                            self._record(self.sig_stats), kwargs={"protocol": self.protocol.to_dict()})
            self._save(force=bool(todo))
            table = self._table({s: self.sig_stats[s.key] for s in sigs})
            self._publish_table(table)
            self.log(f"published {TABLE_KEY}: {len(table)} entries ({self.store.uri_for(TABLE_KEY)})")

            report, nets_measured, nets_reused = None, 0, 0
            if cfg.report_paths > 0 or cfg.calibration_paths > 0:
                report, nets_measured, nets_reused = self._report(table)
        finally:
            for slot in list(self.slots):
                self._kill_quietly(slot)
            self.slots.clear()

        out: dict[str, Any] = {
            "table_key": TABLE_KEY,
            "space_hash": space.space_hash(),
            "space_name": space.name,
            "device": self.fingerprint,
            "batch_size": cfg.batch_size,
            "num_classes": self.num_classes,
            "entries": len(table),
            "units": table.units,
            "statistic": table.statistic,
            "measured_signatures": len(todo),
            "reused_signatures": reused_sigs,
            "measured_nets": nets_measured,
            "reused_nets": nets_reused,
            "actors": n_actors,
            "actor_deaths": self.qstats.actor_deaths,
            "requeued_batches": self.qstats.requeued_batches,
            "replacement_actors": self.qstats.replacements,
            "node_ids": sorted(self.qstats.per_node_results),
            "actor_node_ids": sorted(set(self.qstats.actor_nodes)),
            "results_per_node": dict(sorted(self.qstats.per_node_results.items())),
            "wall_s": round(time.monotonic() - t_start, 2),
            "report_key": None,
            "scatter_key": None,
            "metrics": {"entries": len(table), "measured_signatures": len(todo)},
        }
        if report is not None:
            out["report_key"] = REPORT_KEY
            out["scatter_key"] = SCATTER_KEY if report["n_nets"] else None
            out["calibration"] = report.get("calibration")
            out["protocol"] = report.get("protocol")
            for part in ("model", "plain_sum"):
                if part in report:
                    prefix = "model" if part == "model" else "plain"
                    out["metrics"].update({f"{prefix}_{k}": v for k, v in report[part].items() if k != "n"})
            out["metrics"]["heldout_nets"] = report["n_nets"]
            out["metrics"]["calibration_nets"] = report["n_calibration_nets"]
        return out

    @staticmethod
    def _kill_quietly(slot: _Slot) -> None:
        import ray

        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass

    def _table(self, entries: Mapping[OpSignature, dict]) -> LatencyTable:
        cfg = self.cfg
        meta = {"warmup": cfg.warmup, "repeats": cfg.repeats, "num_classes": self.num_classes,
                "input_size": self.space.input_size, "space_name": self.space.name, "actors": cfg.actors,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "fingerprint_keys": list(FINGERPRINT_KEYS)}
        device = {**self.fingerprint, "protocol": self.protocol.to_dict()}
        return LatencyTable(dict(entries), self.space.space_hash(), device, units="ms",
                            statistic=cfg.statistic, meta=meta)

    def _publish_table(self, table: LatencyTable) -> None:
        self.store.publish_json(TABLE_KEY, table.to_dict())

    def _report(self, table: LatencyTable) -> tuple[dict, int, int]:
        """Calibration nets fit the model, held-out nets score it; all timed end to end by the actors."""
        from jobs.plots import latency_scatter

        cfg, space = self.cfg, self.space
        n_cal, n_held = cfg.calibration_paths, cfg.report_paths
        nets = sample_random_nets(space, n_cal + n_held, cfg.seed, self.num_classes)
        if len(nets) < n_cal + n_held:
            self.log(f"the space has only {len(nets)} distinct nets; fewer held-out nets than asked")
        cal_nets, held = nets[:n_cal], nets[n_cal:]
        # One queue, calibration and held-out nets alternating: load drift touches both sets alike.
        order = [n for pair in zip(held, cal_nets) for n in pair] + held[len(cal_nets):] + cal_nets[len(held):]
        rounds = cfg.report_rounds
        new = [n for n in order if n.key not in self.net_stats]
        todo = [(f"{n.key}#{r}" if rounds > 1 else n.key, n.arch.to_dict()) for r in range(rounds) for n in new]
        todo = [t for t in todo if t[0] not in self.net_stats]  # rounds of an interrupted run are kept
        reused = len(nets) - len(new)
        self.log(f"latency model: {len(cal_nets)} calibration + {len(held)} held-out random nets "
                 f"({reused} measured earlier), end to end" + (f", {rounds} rounds each" if rounds > 1 else ""))
        if todo and not self.slots:
            raise ProfileError("no live profiling actor is left to measure the report's networks; run again")
        self._run_queue("nets", todo, "measure_nets", 1, self._record(self.net_stats),
                        max_inflight=cfg.report_concurrency,
                        kwargs={"protocol": self.protocol.to_dict(),
                                **({"repeats": max(1, math.ceil(cfg.repeats / rounds))} if rounds > 1 else {})})
        if rounds > 1:  # each statistic: the median over the net's rounds
            for n in new:
                parts = [self.net_stats.pop(f"{n.key}#{r}") for r in range(rounds)]
                merged = {k: statistics.median(p[k] for p in parts) for k in ("mean", "median", "std", "p10", "p90")}
                self.net_stats[n.key] = {**merged, "count": sum(int(p["count"]) for p in parts),
                                         "rounds": [{k: p[k] for k in ("median", "p10")} for p in parts]}
        self._save(force=bool(todo))
        measured_count = len(new)

        def measured(n):
            return getattr(LatencyStats.from_dict(self.net_stats[n.key]), cfg.statistic)

        model: LatencyTable = table
        calibration = None
        if len(cal_nets) >= 2:
            sigs = [net_signatures(space, n, table.batch, self.num_classes) for n in cal_nets]
            f = [unit_features(table, x) for x in sigs]
            per_op = sorted({o for o in (*space.head_ops, *space.stacking_ops) if o != "skip"})
            calibration = fit_calibration([x[0] for x in f], [x[1] for x in f], [measured(n) for n in cal_nets],
                                          {"seed": cfg.seed, "statistic": cfg.statistic},
                                          kind_sums=[unit_kind_sums(table, x) for x in sigs], per_op=per_op)
            model = LatencyModel.from_table(table, calibration, space)
        extra = {"space_hash": space.space_hash(), "device": self.fingerprint, "batch_size": cfg.batch_size,
                 "statistic": table.statistic, "seed": cfg.seed,
                 "protocol": self.protocol.to_dict(), "latency_table": self.store.uri_for(TABLE_KEY),
                 "report_rounds": rounds, "report_concurrency": cfg.report_concurrency,
                 "calibration": None if calibration is None else calibration.to_dict()}
        report = latency_model_report(table, model, space, cal_nets, held, measured, self.num_classes, extra)
        for row in report["rows"]:  # each round's statistics, to see the measurement noise
            if isinstance(self.net_stats[row["key"]].get("rounds"), list):
                row["rounds"] = self.net_stats[row["key"]]["rounds"]
        self._publish_table(model)  # the table now carries the model: search, derive and sweep use it
        self.store.publish_json(REPORT_KEY, report)
        if held:
            rows = report["rows"]
            with tempfile.TemporaryDirectory() as tmp:
                png = Path(tmp) / SCATTER_KEY
                latency_scatter([r["plain_sum"] for r in rows], [r["measured"] for r in rows], png,
                                corrected=[r["predicted"] for r in rows] if calibration else None, units=table.units,
                                corrected_label="latency model (held-out nets)",
                                title=f"{space.name}: {len(held)} held-out nets, {self.fingerprint.get('name')}")
                self.store.put_file(SCATTER_KEY, png)
            m, p = report["model"], report["plain_sum"]
            self.log(f"held-out nets ({len(held)}): latency model {m['within_10pct']:.0%} within +-10%, "
                     f"MAPE {m['mape_pct']:.1f}%, Spearman {m['spearman']:.3f}; plain sum {p['within_10pct']:.0%} "
                     f"within +-10%, MAPE {p['mape_pct']:.1f}%")
        return report, measured_count, reused


def latency_model_report(table: LatencyTable, model: LatencyTable, space: SearchSpace, cal_nets: Sequence[Any],
                         held: Sequence[Any], measured: Callable[[Any], float], num_classes: int,
                         extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The accuracy report: the model and the plain table sum on the held-out nets (the headline), the
    model on its own calibration nets (in-sample, for reference), one row per net."""
    def rows(nets, role):
        out = []
        for n in nets:
            sigs = net_signatures(space, n, table.batch, num_classes)
            plain = float(sum(LatencyTable.lookup(table, s) for s in sigs))
            pred = model.predict_signatures(sigs) if isinstance(model, LatencyModel) else plain
            out.append({"key": n.key, "role": role, "units": sum(1 for s in sigs if s.op != "skip"),
                        "predicted": pred, "plain_sum": plain, "measured": float(measured(n)),
                        "raw_by_op": unit_kind_sums(table, sigs)})
        return out

    held_rows, cal_rows = rows(held, "held_out"), rows(cal_nets, "calibration")
    report: dict[str, Any] = {"units": table.units, "n_nets": len(held_rows), "n_calibration_nets": len(cal_rows),
                              "model_kind": "calibrated" if isinstance(model, LatencyModel) else "plain_sum"}
    if held_rows:
        m = [r["measured"] for r in held_rows]
        report["model"] = accuracy_metrics([r["predicted"] for r in held_rows], m)
        report["plain_sum"] = accuracy_metrics([r["plain_sum"] for r in held_rows], m)
    if cal_rows:
        m = [r["measured"] for r in cal_rows]
        report["calibration_in_sample"] = accuracy_metrics([r["predicted"] for r in cal_rows], m)
    report["goal"] = {"within_10pct": 0.95, "spearman": 0.95,
                      "met": bool(held_rows) and report["model"]["within_10pct"] >= 0.95
                      and report["model"]["spearman"] >= 0.95}
    report["rows"] = held_rows + cal_rows
    report.update(dict(extra or {}))
    return report


@dataclass(frozen=True)
class ProfileInputs:
    space: Any                          # a SearchSpace, or anything resolve_space takes
    num_classes: int | None = None      # the data's class count (the classifier's width); None: 1000


class ProfileOutput(StageOutput):
    """The latency table (``table_key``), the model's accuracy report and what was measured or reused."""

    table_key: str
    report_key: str | None = None
    scatter_key: str | None = None
    space_hash: str
    space_name: str | None
    device: dict[str, Any] | None
    batch_size: int
    num_classes: int
    entries: int
    units: str
    statistic: str | None
    measured_signatures: int
    reused_signatures: int
    measured_nets: int
    reused_nets: int
    actors: int
    actor_deaths: int
    requeued_batches: int
    replacement_actors: int
    actor_node_ids: list[str]
    results_per_node: dict[str, int]
    wall_s: float
    calibration: dict[str, Any] | None = None
    protocol: dict[str, Any] | None = None

    def table(self, store: Any) -> LatencyTable:
        """The latency table, read from the profile stage's store."""
        return LatencyTable.from_dict(store.get_json(self.table_key))


def run(cfg: ProfileConfig, inputs: ProfileInputs, ctx: StageContext) -> ProfileOutput:
    """Profile the space into ``ctx.store``: ``latency_table.json``, ``accuracy_report.json``,
    ``latency_scatter.png``; measurements in ``ctx.checkpoint_store`` are reused."""
    from jobs.diagrams import log_pictures
    from jobs.epochs import ProgressMetrics

    out = Profiler(cfg, resolve_space(inputs.space), ctx.store, ctx, [ProgressMetrics(ctx)],
                   num_classes=inputs.num_classes).run()
    log_pictures(ctx, ctx.store, [SCATTER_KEY])
    return ProfileOutput.model_validate(out)


def table_from_uri(uri: str, space: SearchSpace) -> LatencyTable:
    """A pinned latency table: the JSON at a store URI (``s3://bucket/.../table.json``, ``file:///...``),
    e.g. another run's profile table, so a search can be rerun exactly on the same costs."""
    from cluster.storage import open_store

    head, _, name = uri.rstrip("/").rpartition("/")
    if not head or not name.endswith(".json"):
        raise ProfileError(f"search.cost {uri!r}: a latency-table URI names a .json object (s3://bucket/key.json)")
    table = LatencyTable.from_dict(open_store(head).get_json(name, verify=False))
    table.check_compatible(space)
    return table


def resolve_cost_model(cost: str, space: SearchSpace, profile_table: LatencyTable | None = None,
                       skip_fraction: float = 0.1) -> Any:
    """``search.cost`` as a cost model: ``profile`` (the profile stage's table, given), a table's store
    URI, ``macs`` (the MACs proxy) or a latency-table JSON path; a table is checked against the space."""
    if cost == "profile":
        if profile_table is None:
            raise ProfileError("search.cost is 'profile' but there is no profile stage table (run the profile "
                               "stage, or set search.cost: macs)")
        profile_table.check_compatible(space)
        return profile_table
    if "://" in cost:
        return table_from_uri(cost, space)
    return load_cost_model(cost, space, skip_fraction=skip_fraction)


# --------------------------------------------------------------------------- CLI
def _load_yaml(path: str) -> dict:
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ProfileError(f"{path} must hold a mapping (an experiment config with a profile: section)")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.profile",
                                description="Measure a latency table of a search space with Ray actors.")
    p.add_argument("--config", required=True, help="experiment YAML (its space: and profile: sections), "
                                                   "or a YAML of the profile section alone (then give --space)")
    p.add_argument("--space", help="space preset / YAML path (overrides the config's space)")
    p.add_argument("--actors", type=int, help="override profile.actors")
    p.add_argument("--repeats", type=int, help="override profile.repeats")
    p.add_argument("--report-paths", type=int, help="override profile.report_paths")
    p.add_argument("--out", help="store URI for the artifacts (default: $DENSENAS_STORE or <repo>/runs-store, "
                                 "under profile/<space>)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray")
    args = p.parse_args(argv)

    from cluster.storage import default_store_uri, open_store

    doc = _load_yaml(args.config)
    section = doc.get("profile", doc if "space" not in doc else {})
    section = {k: v for k, v in section.items()}
    if args.actors is not None:
        section["actors"] = args.actors
        section.pop("workers", None)
    if args.repeats is not None:
        section["repeats"] = args.repeats
    if args.report_paths is not None:
        section["report_paths"] = args.report_paths
    classes = (doc.get("data") or {}).get("classes")
    if section.get("num_classes") is None and isinstance(classes, (int, list)) and not isinstance(classes, bool):
        section["num_classes"] = classes if isinstance(classes, int) else len(classes)
    try:
        cfg = ProfileConfig.model_validate(section)
        space = load_space(args.space or doc.get("space") or "tiny_mbconv")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(default_store_uri(LOCAL_STORE), "profile", space.name or space.space_hash()[:12])
    store = open_store(out)

    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        result = run(cfg, ProfileInputs(space), StageContext.standalone(store, "profile")).model_dump()
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in result.items() if k != "device"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
