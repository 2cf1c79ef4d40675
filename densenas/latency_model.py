"""The latency model: one measurement protocol, per-layer units, and an affine calibration on whole nets.

Why a model and not a plain table sum: the sum of isolated op timings misses what a whole network
costs (``bench/diagnose_latency_gap.py``, ``docs/profiling.md``): per-layer dispatch and memory
traffic between layers, which an op timed alone on a cache-warm input does not pay. The model:

``predicted(net) = sum over its units of scale(op) * raw table entry + layer_ms * units + fixed_ms``

- a *unit* is a layer the built network really runs (stem, first layer, each head and non-skip
  stacking layer, the last 1x1 conv, pooling + classifier); a skip is an identity in the built net
  and costs nothing;
- ``scale`` (one for all ops, or one per searchable op when leave-one-out on the calibration nets
  prefers it), ``layer_ms`` and ``fixed_ms`` are fitted (weighted least squares on relative error)
  on whole-net measurements of one set of random nets (the calibration nets); the profile stage
  reports the model on other, held-out nets;
- the model is affine in the per-signature entries, so it decomposes per signature: a layer costs
  ``scale(op) * raw + layer_ms`` and the stem also carries ``fixed_ms``. ``LatencyModel`` is a
  ``LatencyTable`` whose ``lookup`` serves exactly that, so the search's expected latency
  (``ExpectedLatency``, exact in expectation because the model is affine), the derive stage's
  predicted cost and the sweep's predicted axis all come from this one model unchanged.

``MeasurementProtocol`` is what every latency number here depends on besides the device: batch,
threads, dtype, memory format, warm-up, repeats, statistic, and the CPU timer (wall clock, or the
thread's CPU time, which does not charge a shared machine's preemption to the net). The table records it in its device
record (``device["protocol"]``); ``measure_net_latency(net, protocol)`` is the one way a whole net
is timed (profile stage report, retrain stage, the ``predict`` CLI's users), and comparing a table
with a measurement of another protocol raises ``ProtocolMismatchError``.

Pure PyTorch + numpy: no Ray, no MLflow.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from densenas.latency import (LatencyStats, LatencyTable, LatencyTableError, OpSignature, space_signatures,
                              stem_signatures)

__all__ = [
    "MEMORY_FORMATS",
    "ALLOCATORS",
    "DEFAULT_REFERENCE",
    "MeasurementProtocol",
    "ProtocolMismatchError",
    "Calibration",
    "LatencyModel",
    "measure_net_latency",
    "reference_latency_ms",
    "time_forward",
    "unit_features",
    "unit_kind_sums",
    "fit_calibration",
    "table_protocol",
    "predict_arch_latency",
    "arch_signatures",
]

MEMORY_FORMATS = ("contiguous", "channels_last")
ALLOCATORS = ("default", "steady")
# The reference workload of the profile stage's CPU protocol: about 3 ms at batch 32 on a 2.6 GHz Xeon
# core, between the space's small and large ops, so pairing it with each forward costs little.
DEFAULT_REFERENCE = "mbconv_k3_e6:16:16:1:8"
_STATISTICS = ("mean", "median", "p10", "p90")


class ProtocolMismatchError(LatencyTableError):
    """Two latency numbers measured under different protocols (batch, threads, dtype, ...) compared."""


@dataclass(frozen=True)
class MeasurementProtocol:
    """How a latency number is measured. Two numbers are comparable only under the same protocol.

    ``threads`` is the CPU intra-op thread count (None on CUDA, where CUDA events time the GPU).
    ``statistic`` is what is reported of the ``repeats`` timed forwards (after ``warmup`` discarded).
    ``allocator`` ``steady`` keeps glibc from unmapping activation buffers between forwards
    (``densenas.profiling.steady_allocator``); ``default`` leaves it as it is.
    ``reference`` (CPU): ``none``, or an op signature without its batch (``mbconv_k3_e6:16:16:1:8``)
    run at the protocol's batch right after each timed forward. Each sample is then the ratio of the
    two times (which does not drift with a shared machine's speed) times ``reference_ms``, the
    reference's own time fixed once for a table (``reference_latency_ms``) and carried in its protocol
    record, so every number under the protocol is in the same ms.
    """

    device: str = "cpu"
    batch: int = 32
    threads: int | None = 1
    dtype: str = "float32"
    memory_format: str = "contiguous"
    warmup: int = 5
    repeats: int = 30
    statistic: str = "median"
    timer: str = "wall"
    allocator: str = "default"
    reference: str = "none"
    reference_ms: float | None = None

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"protocol device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"protocol needs batch >= 1, repeats >= 1, warmup >= 0; got {self}")
        if self.device == "cpu" and (self.threads is None or self.threads < 1):
            raise ValueError(f"a CPU protocol needs threads >= 1, got {self.threads!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"protocol dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if self.statistic not in _STATISTICS:
            raise ValueError(f"statistic must be one of {_STATISTICS}, got {self.statistic!r}")
        if self.device == "cuda" and self.timer != "cuda_events":
            object.__setattr__(self, "timer", "cuda_events")  # the only GPU timer
        if self.device == "cpu" and self.timer not in ("wall", "thread_cpu"):
            raise ValueError(f"a CPU protocol's timer is 'wall' or 'thread_cpu', got {self.timer!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"protocol allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        if self.reference != "none":
            if self.device != "cpu":
                raise ValueError("a reference workload normalises CPU timings; on CUDA use reference 'none'")
            try:
                OpSignature.parse(f"{self.reference}:{self.batch}")
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"protocol reference must be 'none' or an op signature without its batch, such "
                                 f"as {DEFAULT_REFERENCE!r}; got {self.reference!r} ({e})") from None
        if self.reference_ms is not None and not (self.reference_ms > 0 and math.isfinite(self.reference_ms)):
            raise ValueError(f"protocol reference_ms must be a time > 0, got {self.reference_ms!r}")
        if self.timer == "thread_cpu" and self.threads != 1:
            raise ValueError(f"timer 'thread_cpu' counts one thread's CPU time; it needs threads 1, got "
                             f"{self.threads} (use timer 'wall' with more threads)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MeasurementProtocol":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        # Records older than these fields were measured without them: their defaults say so.
        missing = [k for k in cls.__dataclass_fields__
                   if k not in d and k not in ("timer", "allocator", "reference", "reference_ms")]
        if missing:
            raise ProtocolMismatchError(f"protocol record {dict(d)} lacks {missing}")
        return cls(**known)

    def measurement_key(self) -> dict:
        """The fields that decide whether a stored measurement can be reused: all but the statistic
        (every statistic is stored) and ``reference_ms`` (a reuse adopts the stored one)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("statistic", "reference_ms")}

    def reference_signature(self) -> OpSignature | None:
        """The reference workload at this protocol's batch (None without one)."""
        return None if self.reference == "none" else OpSignature.parse(f"{self.reference}:{self.batch}")

    def mismatch(self, other: "MeasurementProtocol") -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]

    def check_same(self, other: "MeasurementProtocol", what: str = "the measurement") -> None:
        """Refuse to compare with a number measured under another protocol."""
        diff = self.mismatch(other)
        if diff:
            raise ProtocolMismatchError(
                f"the latency table's protocol differs from {what}'s ({'; '.join(diff)}): the numbers are not "
                "comparable; measure with measure_net_latency(net, table_protocol(table)) or profile again "
                "with this protocol")

    def with_(self, **kw: Any) -> "MeasurementProtocol":
        return replace(self, **kw)


def table_protocol(table: Any) -> MeasurementProtocol:
    """The protocol recorded in a table's device record (``device["protocol"]``)."""
    rec = (getattr(table, "device", None) or {}).get("protocol")
    if rec is None:
        raise ProtocolMismatchError("the latency table records no measurement protocol (device['protocol']); it was "
                                    "made before protocols were recorded: profile the space again")
    return MeasurementProtocol.from_dict(rec)


# --------------------------------------------------------------------------- timing
def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _prepare(module: nn.Module, x: torch.Tensor, protocol: MeasurementProtocol) -> tuple[nn.Module, torch.Tensor]:
    dev = torch.device("cuda:0" if protocol.device == "cuda" else "cpu")
    dt = _torch_dtype(protocol.dtype)
    module = module.to(device=dev, dtype=dt).eval()
    x = x.to(device=dev, dtype=dt)
    if protocol.memory_format == "channels_last" and x.dim() == 4:
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return module, x


@torch.no_grad()
def time_forward(module: nn.Module, input_shape: Sequence[int], protocol: MeasurementProtocol) -> LatencyStats:
    """Time ``module`` on a random input of ``input_shape`` under ``protocol`` (eval, no_grad, threads,
    dtype, memory format, warm-up, repeats); all statistics of the timed runs, in ms."""
    return _time(module, input_shape, protocol)[0]


@torch.no_grad()
def _time(module: nn.Module, input_shape: Sequence[int], protocol: MeasurementProtocol
          ) -> tuple[LatencyStats, LatencyStats | None, LatencyStats | None]:
    """(the protocol's statistics; with a reference also the plain times of the same forwards and the
    reference's times as paired, for the reader)."""
    from densenas.profiling import set_cpu_threads, steady_allocator, time_module, time_paired

    ref_sig = protocol.reference_signature()
    if ref_sig is not None and protocol.reference_ms is None:
        raise ProtocolMismatchError(f"the protocol times against the reference {protocol.reference} but carries no "
                                    "reference_ms; measure it once with reference_latency_ms(protocol) and use "
                                    "protocol.with_(reference_ms=...)")
    if protocol.device == "cpu":
        previous = torch.get_num_threads()
        set_cpu_threads(int(protocol.threads))
        if protocol.allocator == "steady":
            steady_allocator()
    elif not torch.cuda.is_available():
        raise ProtocolMismatchError("the protocol's device is 'cuda' but torch sees no CUDA device here")
    try:
        module, x = _prepare(module, torch.randn(*input_shape), protocol)
        if ref_sig is None:
            return LatencyStats.from_samples(time_module(module, x, x.device, protocol.warmup, protocol.repeats,
                                                         "wall" if protocol.device == "cuda" else protocol.timer)
                                             ), None, None
        from densenas.latency import build_signature_module

        ref, rx = _prepare(build_signature_module(ref_sig), torch.randn(*_sig_input_shape(ref_sig)), protocol)
        own, paired = time_paired(module, x, ref, rx, protocol.warmup, protocol.repeats, protocol.timer)
        scaled = [a / max(b, 1e-9) * float(protocol.reference_ms) for a, b in zip(own, paired)]
        return LatencyStats.from_samples(scaled), LatencyStats.from_samples(own), LatencyStats.from_samples(paired)
    finally:
        if protocol.device == "cpu":
            torch.set_num_threads(previous)


def _sig_input_shape(sig: OpSignature) -> tuple[int, int, int, int]:
    return (sig.batch, sig.c_in, sig.resolution, sig.resolution)


def _as_net(net: nn.Module | Any, num_classes: int | None) -> nn.Module:
    if not isinstance(net, nn.Module):
        from densenas.arch import build_model

        net = build_model(net, num_classes=num_classes)
    if getattr(net, "arch", None) is None:
        raise ValueError("a whole-net measurement needs a network built from an architecture (with .arch) "
                         "to know its input shape")
    return net


def _net_input_shape(net: nn.Module, protocol: MeasurementProtocol) -> tuple[int, int, int, int]:
    return (protocol.batch, net.arch.in_channels, net.arch.input_size, net.arch.input_size)


def reference_latency_ms(protocol: MeasurementProtocol, paired_with: nn.Module | Any = None,
                         num_classes: int | None = None) -> float:
    """The ``reference_ms`` that turns ratios to the reference workload into ms: the reference's median
    time as it runs in the protocol, right after a forward of ``paired_with`` (a whole net of the space,
    as a module or an architecture document; it runs colder there than in a loop of its own), or, with
    no net, alone. Fixed once per table; its own drift only rescales every number under the table alike."""
    ref_sig = protocol.reference_signature()
    if ref_sig is None:
        raise ProtocolMismatchError("the protocol has no reference workload (reference 'none')")
    from densenas.latency import build_signature_module

    if paired_with is None:
        plain = protocol.with_(reference="none", reference_ms=None)
        return float(time_forward(build_signature_module(ref_sig), _sig_input_shape(ref_sig), plain).median)
    net = _as_net(paired_with, num_classes)
    _, _, paired = _time(net, _net_input_shape(net, protocol), protocol.with_(reference_ms=1.0))
    return float(paired.median)


def measure_net_latency(net: nn.Module | Any, protocol: MeasurementProtocol | Mapping[str, Any],
                        num_classes: int | None = None) -> dict:
    """Time a whole network end to end under ``protocol``: the one whole-net measurement of the project
    (the profile stage's report nets, the retrain stage's measured latency).

    ``net`` is a module with ``.arch`` (a ``DenseNASNet``) or anything ``densenas.arch.load_arch`` takes
    (then built with random weights: latency does not depend on them). Returns the statistics (ms),
    ``value`` (the protocol's statistic) and the protocol record; under a reference protocol also
    ``plain_median`` (the same forwards' own median ms, which drifts with the machine) and
    ``reference_paired_median`` (the reference's, as paired).
    """
    if not isinstance(protocol, MeasurementProtocol):
        protocol = MeasurementProtocol.from_dict(protocol)
    net = _as_net(net, num_classes)
    stats, plain, paired = _time(net, _net_input_shape(net, protocol), protocol)
    out = {**stats.to_dict(), "value": getattr(stats, protocol.statistic), "units": "ms",
           "protocol": protocol.to_dict()}
    if plain is not None:
        out.update(plain_median=plain.median, reference_paired_median=paired.median)
    return out


# --------------------------------------------------------------------------- the model
def _is_unit(sig: OpSignature) -> bool:
    """Whether a signature is a layer the built network runs (a skip is an identity: dropped)."""
    return sig.op != "skip"


def unit_features(table: LatencyTable, sigs: Sequence[OpSignature]) -> tuple[float, int]:
    """(sum of the table's raw statistic over the units, number of units) of a net's signatures."""
    units = [s for s in sigs if _is_unit(s)]
    return float(sum(LatencyTable.lookup(table, s) for s in units)), len(units)


def unit_kind_sums(table: LatencyTable, sigs: Sequence[OpSignature]) -> dict[str, float]:
    """The table's raw statistic summed per op name over a net's units (skips dropped)."""
    out: dict[str, float] = {}
    for s in sigs:
        if _is_unit(s):
            out[s.op] = out.get(s.op, 0.0) + LatencyTable.lookup(table, s)
    return out


@dataclass(frozen=True)
class Calibration:
    """``measured ~ sum over units of scale(op) * raw + layer_ms * units + fixed_ms``, fitted on whole nets.

    ``scale(op)`` is ``op_scales[op]`` for the ops that have their own (the ``per_op`` form), else ``scale``.
    """

    scale: float = 1.0
    layer_ms: float = 0.0
    fixed_ms: float = 0.0
    op_scales: dict = field(default_factory=dict)
    fitted_on: dict = field(default_factory=dict)  # how many nets, seed, in-sample metrics (for the reader)

    @property
    def form(self) -> str:
        return "per_op" if self.op_scales else "shared"

    def op_scale(self, op: str) -> float:
        return float(self.op_scales.get(op, self.scale))

    def apply(self, raw_sum: float | np.ndarray, units: float | np.ndarray) -> np.ndarray | float:
        """The shared form on (raw sum, units) features (``predict`` for the per-op form)."""
        return self.scale * raw_sum + self.layer_ms * units + self.fixed_ms

    def predict(self, kind_sums: Mapping[str, float], units: int) -> float:
        return float(sum(self.op_scale(k) * v for k, v in kind_sums.items()) + self.layer_ms * units + self.fixed_ms)

    def to_dict(self) -> dict:
        return {"form": self.form, "scale": self.scale, "op_scales": dict(self.op_scales), "layer_ms": self.layer_ms,
                "fixed_ms": self.fixed_ms,
                "formula": "measured ~ sum_units scale(op) * raw entry + layer_ms * units + fixed_ms "
                           "(scale(op) = op_scales[op], else scale)",
                "fitted_on": dict(self.fitted_on)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        try:
            return cls(float(d["scale"]), float(d["layer_ms"]), float(d["fixed_ms"]),
                       {str(k): float(v) for k, v in (d.get("op_scales") or {}).items()},
                       dict(d.get("fitted_on") or {}))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise LatencyTableError(f"bad latency-model calibration record {dict(d)}; expected scale, layer_ms, "
                                    "fixed_ms") from None


def _wls(cols: list[np.ndarray], m: np.ndarray) -> np.ndarray:
    """Least squares on relative error: each net's row weighs 1/measured."""
    w = 1.0 / m
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1) * w[:, None], m * w, rcond=None)
    return coef


def _fit_shared(s: np.ndarray, n: np.ndarray, m: np.ndarray) -> tuple[float, float, float]:
    """The richest shared form whose scale comes out > 0: (scale, layer_ms, fixed_ms), else
    (scale, fixed_ms), else the scale alone. On nets whose measured spread is all noise (tiny spaces on a
    busy machine) the fits with an intercept can tilt the scale negative; the scale alone is a weighted
    mean of measured/raw ratios and so always > 0."""
    if len(m) >= 4 and np.ptp(n) > 0:
        a, c, b = _wls([s, n, np.ones_like(s)], m)
        if a > 0 and np.isfinite([a, c, b]).all():
            return float(a), float(c), float(b)
    a, b = _wls([s, np.ones_like(s)], m)
    if a > 0 and np.isfinite([a, b]).all():
        return float(a), 0.0, float(b)
    (a,) = _wls([s], m)
    return float(a), 0.0, 0.0


def _fit_per_op(kind_sums: Sequence[Mapping[str, float]], n: np.ndarray, m: np.ndarray,
                per_op: Sequence[str], rest_scale: float) -> Calibration | None:
    """Own scales for the ``per_op`` ops; the other units (the fixed layers, nearly the same in every
    net and so collinear with ``fixed_ms``) keep the shared form's ``rest_scale``. None when it cannot
    be fitted."""
    per_op = [k for k in per_op if any(ks.get(k, 0) > 0 for ks in kind_sums)]
    if not per_op or len(m) < len(per_op) + 4:
        return None
    cols = [np.array([ks.get(k, 0.0) for ks in kind_sums]) for k in per_op]
    rest = np.array([sum(v for k, v in ks.items() if k not in per_op) for ks in kind_sums])
    w = 1.0 / m
    A = np.stack(cols + [n, np.ones_like(rest)], 1) * w[:, None]
    coef, *_ = np.linalg.lstsq(A, (m - rest_scale * rest) * w, rcond=None)
    scales, c, b = coef[:len(per_op)], coef[-2], coef[-1]
    if (scales <= 0).any() or not np.isfinite(coef).all():
        return None
    return Calibration(float(rest_scale), float(c), float(b), {k: float(v) for k, v in zip(per_op, scales)})


def fit_calibration(raw_sums: Sequence[float], units: Sequence[float], measured: Sequence[float],
                    fitted_on: Mapping[str, Any] | None = None,
                    kind_sums: Sequence[Mapping[str, float]] | None = None,
                    per_op: Sequence[str] = ()) -> Calibration:
    """Fit the calibration by weighted least squares on relative error (each net weighs 1/measured).

    The shared form (one scale, ``layer_ms``, ``fixed_ms``; with fewer than 4 nets or constant layer
    counts, no ``layer_ms``) always; with ``kind_sums`` and ``per_op`` also the per-op form (own scales
    for the ``per_op`` ops). Of the two, the one with the lower leave-one-out MAPE *on these nets*
    is kept -- the choice never sees the held-out nets.
    """
    s, n, m = (np.asarray(v, dtype=np.float64) for v in (raw_sums, units, measured))
    if not (len(s) == len(n) == len(m)) or len(m) < 2:
        raise ValueError(f"a calibration needs >= 2 nets with raw sums, unit counts and measurements; got "
                         f"{len(s)}, {len(n)}, {len(m)}")
    if (m <= 0).any():
        raise ValueError("measured latencies must be > 0")
    shared = Calibration(*_fit_shared(s, n, m))
    cal, loo = shared, {}
    if kind_sums is not None and per_op and len(m) >= 6:
        def loo_mape(fit) -> float:
            errs = []
            for k in range(len(m)):
                keep = np.arange(len(m)) != k
                c = fit(keep)
                if c is None:
                    return math.inf
                errs.append(abs(c.predict(kind_sums[k], n[k]) - m[k]) / m[k])
            return float(np.mean(errs) * 100)

        loo["shared"] = loo_mape(lambda keep: Calibration(*_fit_shared(s[keep], n[keep], m[keep])))
        def per_op_fit(keep):
            a = _fit_shared(s[keep], n[keep], m[keep])[0]
            return _fit_per_op([kind_sums[i] for i in np.flatnonzero(keep)], n[keep], m[keep], per_op, a)

        loo["per_op"] = loo_mape(per_op_fit)
        per = per_op_fit(np.ones(len(m), dtype=bool))
        if per is not None and loo["per_op"] < loo["shared"]:
            cal = per
    pred = (np.array([cal.predict(ks, u) for ks, u in zip(kind_sums, n)]) if cal.op_scales
            else np.asarray(cal.apply(s, n)))
    rel = (pred - m) / m
    info = {"n_nets": int(len(m)), "in_sample_mape_pct": float(np.abs(rel).mean() * 100),
            "in_sample_within_10pct": float((np.abs(rel) <= 0.10).mean())}
    if loo:
        info["calibration_loo_mape_pct"] = loo
    return replace(cal, fitted_on={**info, **dict(fitted_on or {})})


class LatencyModel(LatencyTable):
    """A latency table plus its calibration: ``lookup`` serves each signature's share of a whole net.

    A unit costs ``scale * raw + layer_ms``; a skip costs 0 (the built net drops it); the stem carries
    ``fixed_ms`` (every net has exactly one stem). So any sum the search makes over a net's signatures
    -- ``ExpectedLatency.path_cost``, the expected cost under alphas and betas -- is the model's
    prediction. ``raw_lookup`` is the table's measured entry.
    """

    def __init__(self, *args: Any, calibration: Calibration | Mapping[str, Any], fixed_key: str, **kw: Any):
        super().__init__(*args, **kw)
        self.calibration = calibration if isinstance(calibration, Calibration) else Calibration.from_dict(calibration)
        self.fixed_sig = OpSignature.parse(fixed_key)
        if self.fixed_sig not in self.entries:
            raise LatencyTableError(f"the latency model's fixed part {fixed_key} is not an entry of the table")
        c = self.calibration
        if min([c.scale, *c.op_scales.values()]) <= 0 or not all(math.isfinite(v) for v in (
                c.scale, c.layer_ms, c.fixed_ms, *c.op_scales.values())):
            raise LatencyTableError(f"latency-model calibration must be finite with scale > 0, got {self.calibration}")

    @classmethod
    def from_table(cls, table: LatencyTable, calibration: Calibration, space: Any) -> "LatencyModel":
        """Attach ``calibration`` to ``table`` (the model goes in ``meta['latency_model']``)."""
        from densenas.space import load_space

        space = load_space(space)
        stem = stem_signatures(space, table.batch)[0]
        others = [s for s in space_signatures(space, table.batch, 1)[1:] if s.key == stem.key]
        if others:
            raise LatencyTableError(f"the stem signature {stem.key} also names another layer of the space; the "
                                    "fixed part cannot ride on it")
        meta = {**table.meta, "latency_model": {"calibration": calibration.to_dict(), "fixed_key": stem.key}}
        return cls(table.entries, table.space_hash, table.device, table.units, table.statistic, meta,
                   calibration=calibration, fixed_key=stem.key)

    @classmethod
    def from_plain(cls, table: LatencyTable) -> "LatencyModel":
        """The model a table document describes (its ``meta['latency_model']``)."""
        rec = table.meta.get("latency_model") or {}
        if not isinstance(rec, Mapping) or "calibration" not in rec or "fixed_key" not in rec:
            raise LatencyTableError(f"bad meta['latency_model'] in the latency table: {rec!r}; expected "
                                    "{calibration, fixed_key}")
        return cls(table.entries, table.space_hash, table.device, table.units, table.statistic, table.meta,
                   calibration=rec["calibration"], fixed_key=rec["fixed_key"])

    def raw_table(self) -> LatencyTable:
        meta = {k: v for k, v in self.meta.items() if k != "latency_model"}
        return LatencyTable(self.entries, self.space_hash, self.device, self.units, self.statistic, meta)

    def raw_lookup(self, sig: OpSignature) -> float:
        return LatencyTable.lookup(self, sig)

    def lookup(self, sig: OpSignature) -> float:
        if not _is_unit(sig):
            self.stats(sig)  # still refuse a signature the table lacks
            return 0.0
        c = self.calibration
        cost = c.op_scale(sig.op) * self.raw_lookup(sig) + c.layer_ms
        return cost + c.fixed_ms if sig == self.fixed_sig else cost

    def predict_signatures(self, sigs: Sequence[OpSignature]) -> float:
        """The model's prediction of a net given by its signatures (stem first)."""
        return self.calibration.predict(unit_kind_sums(self, sigs), sum(1 for s in sigs if _is_unit(s)))

    def __repr__(self) -> str:
        c = self.calibration
        return (f"LatencyModel({len(self)} entries, batch={self.batch}, space={self.space_hash[:12]}, "
                f"scale={c.scale:.3f}, layer_ms={c.layer_ms:.4f}, fixed_ms={c.fixed_ms:.3f})")


# --------------------------------------------------------------------------- architectures
def arch_signatures(arch: Any, batch: int) -> list[OpSignature]:
    """The signatures of an architecture document's layers, in network order (stem first), as the
    latency table keys them (each layer fed its real input shape)."""
    from densenas.arch import load_arch
    from densenas.latency import classifier_signature

    arch = load_arch(arch)
    r = arch.input_size
    sigs = [OpSignature(arch.stem.op, arch.in_channels, arch.stem.out, arch.stem.stride, r, batch)]
    r = -(-r // arch.stem.stride)
    for b in arch.blocks:
        sigs.append(OpSignature(b.head_op, b.c_in, b.c_out, b.stride, r, batch))
        r = -(-r // b.stride)
        sigs += [OpSignature(o, b.c_out, b.c_out, 1, r, batch) for o in b.stacking_ops]
    c = arch.blocks[-1].c_out
    if arch.last_conv is not None:
        sigs.append(OpSignature(arch.last_conv.op, c, arch.last_conv.out, 1, r, batch))
        c = arch.last_conv.out
    sigs.append(classifier_signature(c, r, arch.num_classes, batch))
    return sigs


def predict_arch_latency(arch: Any, table: LatencyTable) -> float:
    """The model's prediction (ms) of an architecture document on the table's device and protocol: a
    ``LatencyModel`` applies its calibration, a plain table is summed."""
    sigs = arch_signatures(arch, table.batch)
    missing = table.missing(sigs)
    if missing:
        from densenas.latency import MissingSignaturesError

        raise MissingSignaturesError(missing, where="latency table (for this architecture)")
    if isinstance(table, LatencyModel):
        return table.predict_signatures(sigs)
    return float(sum(table.lookup(s) for s in sigs))


# --------------------------------------------------------------------------- CLI
def cli_main(argv: Sequence[str] | None = None) -> int:
    """``python -m densenas.latency predict --table T --arch A.json``: the prediction and the table's protocol."""
    import argparse
    import json
    import sys

    from densenas.arch import ArchError, load_arch

    p = argparse.ArgumentParser(prog="python -m densenas.latency",
                                description="Latency tables and the latency model of DenseNAS.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="predict an architecture's latency from a latency table")
    pr.add_argument("--table", required=True, help="latency_table.json (the profile stage's artifact)")
    pr.add_argument("--arch", required=True, help="architecture JSON file, JSON text or preset name")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        table = LatencyTable.from_json(args.table)
        arch = load_arch(args.arch)
        if table.meta.get("num_classes") and arch.num_classes != table.meta["num_classes"]:
            arch = arch.replace(num_classes=int(table.meta["num_classes"]))
        value = predict_arch_latency(arch, table)
    except (LatencyTableError, ArchError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    proto = (table.device or {}).get("protocol")
    model = "latency model (calibrated)" if isinstance(table, LatencyModel) else "plain table sum (no calibration)"
    if args.json:
        print(json.dumps({"predicted_ms": value, "model": model, "protocol": proto,
                          "device": {k: table.device.get(k) for k in ("kind", "name", "threads", "torch")},
                          "calibration": table.calibration.to_dict() if isinstance(table, LatencyModel) else None}))
        return 0
    print(f"predicted latency: {value:.4f} ms ({model})")
    print(f"device: {table.device.get('name')} ({table.device.get('kind')}, torch {table.device.get('torch')})")
    if proto:
        print("protocol: " + ", ".join(f"{k}={v}" for k, v in proto.items()))
    else:
        print("protocol: not recorded (a table made before protocols were recorded)")
    if isinstance(table, LatencyModel):
        c = table.calibration
        scales = ", ".join(f"{k} x{v:.3f}" for k, v in c.op_scales.items())
        print(f"calibration ({c.form}): {c.scale:.4f} * sum(units){f' ({scales})' if scales else ''} + "
              f"{c.layer_ms:.4f} ms * units + {c.fixed_ms:.4f} ms "
              f"(fitted on {c.fitted_on.get('n_nets', '?')} nets)")
    return 0
