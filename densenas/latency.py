"""Latency model of DenseNAS: op signatures, latency tables, a MACs cost model, expected latency.

Everything here is keyed by *what an op computes*, never by where it sits in the network:

- ``OpSignature(op, c_in, c_out, stride, resolution, batch)``: an op fed ``batch`` images of
  ``c_in`` channels at ``resolution`` x ``resolution`` (its *input* resolution). String key
  ``op:c_in:c_out:s:r:b``. Besides the registry ops (``densenas.ops``) there is ``classifier``:
  global average pooling + Linear(c_in -> c_out = classes) at the given resolution.
- ``space_signatures(space, batch)``: every distinct signature a space needs (stem, first layer,
  each head op of each edge fed its source block's output shape, each stacking op, each final 1x1
  conv branch or per-block classifier, the classifier). The profiling actors measure exactly these.
- ``LatencyTable``: measured statistics (mean, median, std, p10, p90, count) per signature, in ms,
  with the space hash and a device record; refuses to serve another space or device.
- ``MacsCostModel``: the same interface, cost = multiply-adds (millions) computed analytically;
  a skip costs ``skip_fraction`` (default 1/10) of the cheapest other stacking op of the same shape,
  i.e. 1/10 of a BasicBlock in the ResNet space (the paper's ResNet setting).
- ``ExpectedLatency`` / ``expected_latency``: the differentiable expected cost of eq. 5-7,
  ``C_b = S_b + sum_k p(b->k) (H(b->k) + C_k)``, ``total = stem + first layer + C_0 + classifier``.
  It is the expected cost of a random path of the Markov chain that beta defines (ops drawn by
  softmax(alpha)); computed as one triangular solve ``(I - P) C = r`` over per-mixed-op cost
  tensors precomputed once, so a call is a handful of tensor ops whatever the space size.

Pure PyTorch: no Ray, no MLflow. The profile stage (``jobs.profile``) times the signatures with
``densenas.profiling``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densenas.ops import build_op, canonical_op_name, parse_mbconv
from densenas.space import SearchSpace, load_space

__all__ = [
    "OpSignature",
    "LatencyStats",
    "LatencyTableError",
    "MissingSignaturesError",
    "CostModel",
    "LatencyTable",
    "MacsCostModel",
    "ExpectedLatency",
    "space_signatures",
    "stem_signatures",
    "head_signature",
    "stack_signature",
    "final_signature",
    "classifier_signature",
    "build_signature_module",
    "describe_device",
    "load_cost_model",
    "expected_latency",
    "signature_macs",
    "predict_latency",
]

CLASSIFIER = "classifier"
TABLE_FORMAT = "densenas-latency-table"
TABLE_VERSION = 1
STATISTICS = ("mean", "median", "p10", "p90")


class LatencyTableError(ValueError):
    """A latency table that cannot serve the request (other space, other device, bad document)."""


class MissingSignaturesError(LatencyTableError, KeyError):
    """Signatures the table has no entry for; ``.missing`` lists them."""

    def __init__(self, missing: Sequence["OpSignature"], where: str = "latency table"):
        self.missing = list(missing)
        self.where = where
        shown = ", ".join(s.key for s in self.missing[:8])
        more = f" (+{len(self.missing) - 8} more)" if len(self.missing) > 8 else ""
        super().__init__(
            f"{where} has no entry for {len(self.missing)} signature(s): {shown}{more}; "
            "profile the space again (the profile stage measures space_signatures(space, batch))")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]

    def __reduce__(self):  # crosses Ray process boundaries: rebuild from the fields, not from args
        return type(self), (self.missing, self.where)


# --------------------------------------------------------------------------- signatures
class OpSignature(NamedTuple):
    """What an op computes: name, channels in/out, stride, input resolution, batch size."""

    op: str
    c_in: int
    c_out: int
    stride: int
    resolution: int
    batch: int

    @property
    def key(self) -> str:
        return f"{self.op}:{self.c_in}:{self.c_out}:{self.stride}:{self.resolution}:{self.batch}"

    @classmethod
    def parse(cls, key: str) -> "OpSignature":
        parts = key.split(":")
        if len(parts) != 6:
            raise LatencyTableError(f"bad signature key {key!r}; expected op:c_in:c_out:stride:resolution:batch")
        op = parts[0] if parts[0] == CLASSIFIER else canonical_op_name(parts[0])
        try:
            return cls(op, *(int(p) for p in parts[1:]))
        except ValueError:
            raise LatencyTableError(f"bad signature key {key!r}: the five numbers must be integers") from None

    def with_batch(self, batch: int) -> "OpSignature":
        return self._replace(batch=int(batch))

    def __str__(self) -> str:
        return self.key


def stem_signatures(space: SearchSpace, batch: int) -> list[OpSignature]:
    """The stem conv and the fixed first layer (when the space has one)."""
    sigs = [OpSignature(space.stem.op, space.in_channels, space.stem.out, space.stem.stride,
                        space.input_size, batch)]
    if space.first_layer is not None:
        fl = space.first_layer
        sigs.append(OpSignature(fl.op, space.stem.out, fl.out, fl.stride,
                                space.input_size // space.stem.stride, batch))
    return sigs


def head_signature(space: SearchSpace, op: str, src: int, dst: int, batch: int) -> OpSignature:
    """Head op on edge src->dst, fed the source block's output shape."""
    b_src, b_dst = space.blocks[src], space.blocks[dst]
    stride = b_src.resolution // b_dst.resolution
    return OpSignature(op, b_src.width, b_dst.width, stride, b_src.resolution, batch)


def stack_signature(space: SearchSpace, op: str, block: int, batch: int) -> OpSignature:
    b = space.blocks[block]
    return OpSignature(op, b.width, b.width, 1, b.resolution, batch)


def classifier_signature(c_in: int, resolution: int, num_classes: int, batch: int) -> OpSignature:
    return OpSignature(CLASSIFIER, c_in, num_classes, 1, resolution, batch)


def final_signature(space: SearchSpace, block: int, batch: int, num_classes: int) -> OpSignature:
    """The branch from a final block to the end: its 1x1 conv, or its own classifier without a last conv."""
    b = space.blocks[block]
    if space.last_conv_channels is not None:
        return OpSignature("conv1x1", b.width, space.last_conv_channels, 1, b.resolution, batch)
    return classifier_signature(b.width, b.resolution, num_classes, batch)


def _shared_classifier(space: SearchSpace, batch: int, num_classes: int) -> OpSignature | None:
    """The classifier after the summed final convs (None when each final block has its own)."""
    if space.last_conv_channels is None:
        return None
    return classifier_signature(space.last_conv_channels, space.blocks[space.final_blocks[-1]].resolution,
                                num_classes, batch)


def space_signatures(space: SearchSpace | str | Mapping, batch: int, num_classes: int = 1000) -> list[OpSignature]:
    """Every distinct op signature the space needs, in a stable order (network order, deduplicated)."""
    space = load_space(space)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    sigs: list[OpSignature] = list(stem_signatures(space, batch))
    for b in space.blocks[1:]:
        for (i, j, _) in space.in_edges(b.index):
            sigs += [head_signature(space, op, i, j, batch) for op in space.head_ops]
        if b.n_stacking:
            sigs += [stack_signature(space, op, b.index, batch) for op in space.stacking_ops]
    sigs += [final_signature(space, b, batch, num_classes) for b in space.final_blocks]
    shared = _shared_classifier(space, batch, num_classes)
    if shared is not None:
        sigs.append(shared)
    return list(dict.fromkeys(sigs))


# --------------------------------------------------------------------------- measuring
class _Classifier(nn.Module):
    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_signature_module(sig: OpSignature, bn_affine: bool = True) -> nn.Module:
    """The module a signature describes (for profiling); input shape ``(batch, c_in, r, r)``."""
    if sig.op == CLASSIFIER:
        return _Classifier(sig.c_in, sig.c_out)
    return build_op(sig.op, sig.c_in, sig.c_out, sig.stride, bn_affine)


@dataclass(frozen=True)
class LatencyStats:
    """Robust statistics of repeated timings of one signature, in the table's units (ms)."""

    mean: float
    median: float
    std: float
    p10: float
    p90: float
    count: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> "LatencyStats":
        if not samples:
            raise ValueError("no timing samples")
        xs = sorted(float(s) for s in samples)

        def pct(q: float) -> float:  # linear interpolation, as numpy's default
            pos = q * (len(xs) - 1)
            lo = int(math.floor(pos))
            hi = min(lo + 1, len(xs) - 1)
            return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

        return cls(mean=statistics.fmean(xs), median=statistics.median(xs),
                   std=statistics.pstdev(xs) if len(xs) > 1 else 0.0,
                   p10=pct(0.1), p90=pct(0.9), count=len(xs))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyStats":
        missing = [k for k in ("mean", "median", "std", "p10", "p90", "count") if k not in d]
        if missing:
            raise LatencyTableError(f"latency entry {dict(d)} lacks {missing}")
        return cls(float(d["mean"]), float(d["median"]), float(d["std"]), float(d["p10"]),
                   float(d["p90"]), int(d["count"]))

    def to_dict(self) -> dict:
        return asdict(self)


def describe_device(device: str | torch.device = "cpu", threads: int | None = None) -> dict:
    """A device record for a latency table: kind, model name, threads (CPU), torch version."""
    device = torch.device(device)
    record: dict[str, Any] = {"kind": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        record["name"] = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        record["name"] = name
        record["threads"] = int(threads if threads is not None else torch.get_num_threads())
    return record


# --------------------------------------------------------------------------- cost models
class CostModel(Protocol):
    """What the search needs from a cost source: a cost per signature at its own batch size."""

    units: str
    batch: int

    def lookup(self, sig: OpSignature) -> float: ...

    def check_compatible(self, space: SearchSpace, device: Any = None) -> None: ...


_DEVICE_KEYS = ("kind", "name", "threads")


def _device_record(device: Any) -> dict:
    if device is None:
        return {}
    if isinstance(device, Mapping):
        return dict(device)
    if isinstance(device, torch.device) or (isinstance(device, str) and device.split(":")[0] in ("cpu", "cuda")):
        return describe_device(device)
    return {"name": str(device)}


class LatencyTable:
    """Measured latency per ``OpSignature`` for one space on one device (units: ms).

    ``statistic`` picks what ``lookup`` returns (``median`` by default: robust to the noisy
    neighbours of a shared machine; the paper used the mean).
    """

    def __init__(self, entries: Mapping[OpSignature | str, LatencyStats | Mapping[str, Any]],
                 space_hash: str, device: Mapping[str, Any] | str, units: str = "ms",
                 statistic: str = "median", meta: Mapping[str, Any] | None = None):
        if units != "ms":
            raise LatencyTableError(f"latency tables are in ms, got units={units!r}; convert the entries to ms")
        if statistic not in STATISTICS:
            raise LatencyTableError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        if not entries:
            raise LatencyTableError("a latency table needs at least one entry")
        self.entries: dict[OpSignature, LatencyStats] = {}
        for k, v in entries.items():
            sig = OpSignature.parse(k) if isinstance(k, str) else OpSignature(*k)
            stats = v if isinstance(v, LatencyStats) else LatencyStats.from_dict(v)
            if not (math.isfinite(stats.mean) and stats.mean >= 0 and stats.count >= 1):
                raise LatencyTableError(f"entry {sig.key}: latency must be finite and >= 0 with count >= 1, "
                                        f"got {stats}")
            self.entries[sig] = stats
        batches = sorted({s.batch for s in self.entries})
        if len(batches) != 1:
            raise LatencyTableError(f"a latency table holds one batch size, found {batches}; "
                                    "profile one batch size per table")
        self.batch = batches[0]
        self.space_hash = str(space_hash)
        self.device = _device_record(device)
        self.units, self.statistic = units, statistic
        self.meta = dict(meta or {})

    # lookups
    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, sig: OpSignature) -> bool:
        return sig in self.entries

    def stats(self, sig: OpSignature) -> LatencyStats:
        try:
            return self.entries[sig]
        except KeyError:
            raise MissingSignaturesError([sig]) from None

    def lookup(self, sig: OpSignature) -> float:
        """The table's statistic (ms) for ``sig``; ``MissingSignaturesError`` names a missing one."""
        return getattr(self.stats(sig), self.statistic)

    def missing(self, sigs: Iterable[OpSignature]) -> list[OpSignature]:
        return [s for s in sigs if s not in self.entries]

    def check_compatible(self, space: SearchSpace, device: Any = None, num_classes: int | None = None) -> None:
        """Refuse a table made for another space or device, or one that lacks signatures the space needs.

        Without ``num_classes`` the classifier entries are checked by shape only (any class count).
        """
        space = load_space(space)
        if self.space_hash != space.space_hash():
            raise LatencyTableError(
                f"latency table was made for search space {self.space_hash[:12]}, but this space "
                f"({space.name or 'unnamed'}) is {space.space_hash()[:12]}: a table belongs to the space it was "
                "profiled for; profile this space (profile stage) or use the MACs cost model")
        if device is not None:
            want = _device_record(device)
            diff = [k for k in _DEVICE_KEYS if k in want and k in self.device and want[k] != self.device[k]]
            if diff:
                raise LatencyTableError(
                    "latency table was measured on another device: "
                    + ", ".join(f"{k} {self.device[k]!r} (table) vs {want[k]!r} (requested)" for k in diff)
                    + "; profile the space on this device")
        need = space_signatures(space, self.batch, num_classes or 1)
        if num_classes is None:
            have_cls = {(s.c_in, s.resolution) for s in self.entries if s.op == CLASSIFIER}
            need = [s for s in need if s.op != CLASSIFIER or (s.c_in, s.resolution) not in have_cls]
        missing = self.missing(need)
        if missing:
            raise MissingSignaturesError(missing, where=f"latency table (space {self.space_hash[:12]})")

    # serialisation
    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT, "version": TABLE_VERSION, "units": self.units,
            "statistic": self.statistic, "space_hash": self.space_hash, "device": self.device,
            "batch": self.batch, "meta": self.meta,
            "entries": {s.key: st.to_dict() for s, st in self.entries.items()},
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False)
        if path is not None:
            tmp = Path(f"{path}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "LatencyTable":
        if doc.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"not a latency table (format={doc.get('format')!r}, expected {TABLE_FORMAT!r})")
        if doc.get("version") != TABLE_VERSION:
            raise LatencyTableError(f"latency table version {doc.get('version')!r} is not supported "
                                    f"(this code reads version {TABLE_VERSION})")
        for k in ("space_hash", "device", "entries"):
            if k not in doc:
                raise LatencyTableError(f"latency table lacks {k!r}")
        table = cls(doc["entries"], doc["space_hash"], doc["device"], doc.get("units", "ms"),
                    doc.get("statistic", "median"), doc.get("meta"))
        if type(table) is LatencyTable and table.meta.get("latency_model"):
            # A table with a fitted calibration is served as the latency model (densenas.latency_model).
            from densenas.latency_model import LatencyModel

            return LatencyModel.from_plain(table)
        return table

    @classmethod
    def from_json(cls, source: str | Path) -> "LatencyTable":
        """From a JSON string or a path to a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        return (f"LatencyTable({len(self)} entries, batch={self.batch}, space={self.space_hash[:12]}, "
                f"device={self.device.get('name')!r}, statistic={self.statistic})")


def signature_macs(sig: OpSignature) -> int:
    """Multiply-adds of one image through the op (Conv2d + Linear only, as ``densenas.counting``)."""
    r_in = sig.resolution
    r_out = -(-r_in // sig.stride)  # padding k//2: ceil(r / stride)
    op = sig.op
    if op == CLASSIFIER:
        return sig.c_in * sig.c_out
    if op == "skip":
        return 0
    if op in ("conv3x3", "conv1x1"):
        k = 3 if op == "conv3x3" else 1
        return sig.c_in * sig.c_out * k * k * r_out * r_out
    if op == "basic_block":
        macs = sig.c_in * sig.c_out * 9 * r_out ** 2 + sig.c_out * sig.c_out * 9 * r_out ** 2
        if sig.stride != 1 or sig.c_in != sig.c_out:
            macs += sig.c_in * sig.c_out * r_out ** 2
        return macs
    if op.startswith("mbconv_"):
        k, e = parse_mbconv(op)
        mid = sig.c_in * e
        macs = 0 if e == 1 else sig.c_in * mid * r_in ** 2
        return macs + mid * k * k * r_out ** 2 + mid * sig.c_out * r_out ** 2
    raise ValueError(f"no MACs formula for op {op!r}")


class MacsCostModel:
    """Cost = millions of multiply-adds per image x batch; the ResNet space's default cost model.

    A skip costs ``skip_fraction`` of the cheapest other stacking op of the same shape (the paper's
    ResNet setting: a skip costs 1/10 of a BasicBlock), so that skipping is cheap but not free.
    """

    units = "MMACs"

    def __init__(self, space: SearchSpace | str | Mapping, skip_fraction: float = 0.1, batch: int = 1):
        self.space = load_space(space)
        if not 0 <= skip_fraction <= 1:
            raise ValueError(f"skip_fraction must be in [0, 1], got {skip_fraction}")
        self.skip_fraction, self.batch = float(skip_fraction), int(batch)
        self._others = [o for o in self.space.stacking_ops if o != "skip"]
        self.space_hash = self.space.space_hash()
        self.device = {"kind": "macs"}

    def lookup(self, sig: OpSignature) -> float:
        if sig.op == "skip":
            if not self._others or self.skip_fraction == 0:
                return 0.0
            ref = min(signature_macs(sig._replace(op=o)) for o in self._others)
            return self.skip_fraction * ref * sig.batch / 1e6
        return signature_macs(sig) * sig.batch / 1e6

    def check_compatible(self, space: SearchSpace, device: Any = None, num_classes: int | None = None) -> None:
        """A MACs model fits any device; it must have been built for this space."""
        space = load_space(space)
        if space.space_hash() != self.space_hash:
            raise LatencyTableError(f"MACs cost model was built for space {self.space_hash[:12]}, "
                                    f"not {space.space_hash()[:12]}; build MacsCostModel(space) for this space")

    def __repr__(self) -> str:
        return f"MacsCostModel(space={self.space_hash[:12]}, skip_fraction={self.skip_fraction})"


def load_cost_model(source: str | Path | None, space: SearchSpace, **macs_kwargs: Any) -> CostModel:
    """``None``/``"macs"``: a ``MacsCostModel``; otherwise a latency-table JSON path (checked for the space)."""
    if source is None or str(source) == "macs":
        return MacsCostModel(space, **macs_kwargs)
    if str(source) == "profile":
        raise LatencyTableError("cost 'profile' means the profile stage's latency table: the caller passes it "
                                "(Searcher(..., cost_model=LatencyTable.from_json(path))); standalone, give "
                                "the table's JSON path or 'macs'")
    if not Path(source).exists():
        raise LatencyTableError(f"cost {str(source)!r} is neither 'macs' nor an existing latency-table JSON file")
    table = LatencyTable.from_json(Path(source))
    table.check_compatible(space)
    return table


# --------------------------------------------------------------------------- expected latency
def _mixed_op_sites(net_or_space: Any) -> list[tuple[str, tuple[int, int] | None, int, tuple[str, ...]]]:
    """(kind, edge, block, op_names) per mixed op, in ``SuperNet.mixed_ops`` order."""
    if hasattr(net_or_space, "mixed_ops"):
        return [(m.kind, m.edge, m.block, tuple(m.op_names)) for m in net_or_space.mixed_ops]
    space = load_space(net_or_space)
    sites = []
    for b in space.blocks[1:]:  # the super network's order: per block, heads (nearest first), then stacking
        for (i, j, _) in space.in_edges(b.index):
            sites.append(("head", (i, j), j, space.head_ops))
        for _ in range(b.n_stacking):
            sites.append(("stack", None, b.index, space.stacking_ops))
    return sites


class ExpectedLatency(nn.Module):
    """Differentiable expected cost (eq. 5-7) of a super network under its alphas and betas.

    Built once per (space, cost model, classes): the per-op costs of every mixed op become two
    buffers (heads [E, n_head_ops], stacking layers [L, n_stack_ops]); a call then costs two
    softmaxes, two weighted sums, a segment softmax of beta and one triangular solve.
    """

    def __init__(self, net_or_space: Any, cost_model: CostModel, num_classes: int | None = None):
        super().__init__()
        space = net_or_space.space if hasattr(net_or_space, "space") else load_space(net_or_space)
        if num_classes is None:
            num_classes = getattr(net_or_space, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes is needed for the classifier's cost when a space (not a SuperNet) is given")
        cost_model.check_compatible(space)
        self.space, self.num_classes, self.units = space, int(num_classes), cost_model.units
        batch = cost_model.batch
        sites = _mixed_op_sites(net_or_space)
        n_blocks = len(space.blocks)
        end = space.end_node

        missing: list[OpSignature] = []

        def cost(sig: OpSignature) -> float:
            try:
                return float(cost_model.lookup(sig))
            except MissingSignaturesError as e:
                missing.extend(e.missing)
                return 0.0

        head_idx, stack_idx, head_costs, stack_costs, head_edge, stack_block = [], [], [], [], [], []
        for k, (kind, edge, block, op_names) in enumerate(sites):
            if kind == "head":
                head_idx.append(k)
                head_edge.append(edge)
                head_costs.append([cost(head_signature(space, o, edge[0], edge[1], batch)) for o in op_names])
            else:
                stack_idx.append(k)
                stack_block.append(block)
                stack_costs.append([cost(stack_signature(space, o, block, batch)) for o in op_names])
        fixed = sum(cost(s) for s in stem_signatures(space, batch))
        shared = _shared_classifier(space, batch, self.num_classes)
        if shared is not None:
            fixed += cost(shared)
        final_cost = {b: cost(final_signature(space, b, batch, self.num_classes)) for b in space.final_blocks}
        if missing:
            raise MissingSignaturesError(list(dict.fromkeys(missing)))

        # Flat edge list in beta order (block order, out_edges order): edge e = (src, dst).
        edges = [(i, j) for b in space.blocks for (i, j, _) in space.out_edges(b.index)]
        edge_pos = {e: n for n, e in enumerate(edges)}
        self.n_nodes = n_blocks + 1  # + end node
        self.head_index = head_idx
        self.stack_index = stack_idx
        self.register_buffer("head_costs", torch.tensor(head_costs, dtype=torch.float64).reshape(len(head_idx), -1))
        self.register_buffer("stack_costs", torch.tensor(stack_costs, dtype=torch.float64).reshape(len(stack_idx), -1))
        self.register_buffer("stack_block", torch.tensor(stack_block, dtype=torch.long))
        self.register_buffer("head_edge", torch.tensor([edge_pos[e] for e in head_edge], dtype=torch.long))
        self.register_buffer("edge_src", torch.tensor([e[0] for e in edges], dtype=torch.long))
        self.register_buffer("edge_dst", torch.tensor([e[1] for e in edges], dtype=torch.long))
        # Constant part of each edge's cost (the final conv / per-block classifier on final edges).
        self.register_buffer("edge_const", torch.tensor(
            [final_cost[i] if j == end else 0.0 for (i, j) in edges], dtype=torch.float64))
        self.register_buffer("eye", torch.eye(self.n_nodes, dtype=torch.float64))
        self.fixed = float(fixed)
        self.n_edges = len(edges)

    def edge_probs_flat(self, betas: Sequence[torch.Tensor]) -> torch.Tensor:
        """softmax of each block's beta, concatenated in edge order."""
        flat = torch.cat([b.reshape(-1) for b in betas])
        if flat.numel() != self.n_edges:
            raise ValueError(f"betas hold {flat.numel()} logits but the space has {self.n_edges} edges")
        seg_max = torch.full((self.n_nodes,), -math.inf, dtype=flat.dtype, device=flat.device)
        seg_max = seg_max.scatter_reduce(0, self.edge_src, flat.detach(), reduce="amax")
        ex = torch.exp(flat - seg_max[self.edge_src])
        denom = torch.zeros(self.n_nodes, dtype=flat.dtype, device=flat.device).index_add(0, self.edge_src, ex)
        return ex / denom[self.edge_src]

    def _op_weights(self, a: torch.Tensor, rows: Sequence[int],
                    choices: Sequence[Sequence[int]] | None) -> torch.Tensor:
        """softmax of each row of ``a`` over all its ops, or (``choices``) over that mixed op's sampled ops."""
        if choices is not None:
            mask = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
            for n, k in enumerate(rows):
                mask[n, list(choices[k])] = True
            a = a.masked_fill(~mask, -math.inf)
        return F.softmax(a, dim=1)

    def forward(self, alphas: Sequence[torch.Tensor], betas: Sequence[torch.Tensor],
                choices: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Expected cost (scalar, the cost model's units) for per-mixed-op ``alphas`` and per-block ``betas``.

        ``choices`` (one tuple of op indices per mixed op, as ``SuperNet.sample_choices``): each layer's
        cost is mixed by the softmax over its sampled ops only, the weights its features are mixed
        with in that step (the authors' ``MixedOp`` in JaminFong/DenseNAS ``models/dropped_model.py``).
        The gradient on a sampled pair (a, b) is then ``p_a p_b (lat_a - lat_b)``: the cheaper op of
        the pair always gains. ``None``: the softmax over all ops (the distribution's expected cost).
        """
        if len(alphas) != len(self.head_index) + len(self.stack_index):
            raise ValueError(f"got {len(alphas)} alphas, the super network has "
                             f"{len(self.head_index) + len(self.stack_index)} mixed ops")
        if choices is not None and len(choices) != len(alphas):
            raise ValueError(f"got {len(choices)} choices for {len(alphas)} mixed ops")
        dtype = torch.promote_types(alphas[0].dtype, torch.float32)
        p = self.edge_probs_flat(betas).to(dtype)
        edge_cost = self.edge_const.to(dtype)
        if self.head_index:
            a = torch.stack([alphas[k] for k in self.head_index])
            w = self._op_weights(a.to(dtype), self.head_index, choices)
            h = (w * self.head_costs.to(dtype)).sum(1)
            edge_cost = edge_cost.index_add(0, self.head_edge, h)
        r = torch.zeros(self.n_nodes, dtype=dtype, device=p.device)
        if self.stack_index:
            a = torch.stack([alphas[k] for k in self.stack_index])
            w = self._op_weights(a.to(dtype), self.stack_index, choices)
            s = (w * self.stack_costs.to(dtype)).sum(1)
            r = r.index_add(0, self.stack_block, s)
        r = r.index_add(0, self.edge_src, p * edge_cost)
        P = torch.zeros(self.n_nodes, self.n_nodes, dtype=dtype, device=p.device).index_put(
            (self.edge_src, self.edge_dst), p, accumulate=True)
        C = torch.linalg.solve_triangular(self.eye.to(dtype) - P, r.unsqueeze(1), upper=True).squeeze(1)
        return C[0] + self.fixed

    def edge_costs(self, op_choice: Sequence[int]) -> tuple[float, dict[tuple[int, int], float]]:
        """Costs of a concrete network, per edge: (fixed cost, {(src, dst): cost}).

        ``op_choice`` holds one op index per mixed op (``mixed_ops`` order). An edge's cost is its
        head op plus the stacking layers of its destination block (so a path's cost is ``fixed`` plus
        the sum over its edges, the final edge included).
        """
        src, dst = self.edge_src.tolist(), self.edge_dst.tolist()
        costs = [float(c) for c in self.edge_const.tolist()]
        for n, k in enumerate(self.head_index):
            costs[int(self.head_edge[n])] += float(self.head_costs[n, op_choice[k]])
        block_cost = [0.0] * self.n_nodes
        for n, k in enumerate(self.stack_index):
            block_cost[int(self.stack_block[n])] += float(self.stack_costs[n, op_choice[k]])
        return self.fixed, {(i, j): c + block_cost[j] for i, j, c in zip(src, dst, costs)}

    def path_cost(self, path: Sequence[int], op_choice: Sequence[int]) -> float:
        """Cost of one concrete network: a block path (0 .. final block) and one op index per mixed op."""
        fixed, costs = self.edge_costs(op_choice)
        edges = list(zip(path, list(path[1:]) + [self.space.end_node]))
        unknown = [e for e in edges if e not in costs]
        if path[0] != 0 or unknown:
            raise ValueError(f"{list(path)} is not a block path of the space from block 0 to a final block "
                             f"(no edges {unknown})")
        return fixed + sum(costs[e] for e in edges)


_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def expected_latency(supernet_or_space: Any, alphas: Sequence[torch.Tensor], betas: Sequence[torch.Tensor],
                     cost_model: CostModel, num_classes: int | None = None) -> torch.Tensor:
    """Expected cost (eq. 5-7), differentiable in alphas and betas; the cost tensors are cached per
    (super network or space, cost model), so repeated calls cost only the forward."""
    try:
        per_net = _CACHE.setdefault(supernet_or_space, {})
    except TypeError:  # not weak-referenceable (a dict or a path): no caching
        per_net = {}
    key = (id(cost_model), num_classes)
    model = per_net.get(key)
    if model is None or model.cost_model_ref() is not cost_model:
        model = ExpectedLatency(supernet_or_space, cost_model, num_classes)
        model.cost_model_ref = weakref.ref(cost_model) if _weakrefable(cost_model) else (lambda: cost_model)
        per_net[key] = model
    if model.eye.device != alphas[0].device:
        model.to(alphas[0].device)
    return model(alphas, betas)


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


def predict_latency(arch: Any, table: "LatencyTable | str | Path") -> float:
    """The latency model's prediction (ms) for an architecture document (anything ``load_arch`` takes)
    on the table's device under the table's protocol. See ``densenas.latency_model``."""
    from densenas.latency_model import predict_arch_latency

    if isinstance(table, (str, Path)):
        table = LatencyTable.from_json(table)
    return predict_arch_latency(arch, table)


if __name__ == "__main__":  # python -m densenas.latency predict --table T --arch A.json
    import sys

    from densenas.latency_model import cli_main

    sys.exit(cli_main())
