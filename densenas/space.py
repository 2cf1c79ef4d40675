"""The densely connected search space of DenseNAS: blocks of growing width and their routing edges.

A space is data (YAML / dict, the format of ``shared/reference/imagenet_search_space.yaml`` plus
``input_size``, ``in_channels`` and ``cost``) turned into a validated block graph:

- block 0 is the fixed block: the stem output, after the fixed first layer when there is one
  (MBConv space: 16@112; ResNet space, which has no first layer: the stem output 32@112);
- searchable blocks 1..N come from ``widths`` / ``resolutions`` / ``stage_ids`` / ``stacking_layers``;
  the fixed block is stage 0;
- edge rule: block i feeds each of the next m blocks j while stage(j) <= stage(i) + 1 and
  resolution(i) / resolution(j) is 1 or 2, stopping at the first j that breaks either; the head
  layer on edge i->j has stride resolution(i) / resolution(j); block 0 feeds only block 1;
- the blocks of the last stage (``final_blocks``) each feed the last 1x1 conv through their own
  branch. That branch is an edge too: ``(b, end_node, 1)`` with ``end_node == len(blocks)``.
  It is an outgoing edge of b for beta (so a final block that also feeds later final blocks
  chooses between them and ending), and it is where a path ends.

With this convention the MBConv ImageNet space has the paper's numbers: 16 searchable blocks,
54 edges (51 head edges between blocks + 3 final-conv edges), 15,456 block paths, and
633 architecture scalars = 39 stacking layers x 7 ops + 51 head edges x 6 ops + 54 betas.

``head_edges`` are the edges between blocks (each carries one head mixed op); ``final_edges``
the edges into ``end_node``. ``SpaceError`` names the offending field and the reason.

CLI: ``python -m densenas.space stats SOURCE [--json]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import yaml

from densenas.ops import canonical_op_name

__all__ = [
    "SpaceError",
    "BlockSpec",
    "LayerSpec",
    "SearchSpace",
    "load_space",
    "spaces_dir",
    "list_presets",
]

# Fields a space document must have, may have, and may carry as metadata (ignored by the graph).
_REQUIRED = ("stem", "widths", "resolutions", "stage_ids", "stacking_layers", "connections_m",
             "stacking_ops", "head_ops", "input_size", "in_channels")
_OPTIONAL = ("first_layer", "last_conv_channels", "cost")
_METADATA = ("name", "description", "facts", "published", "notes")
COST_KINDS = ("latency", "macs")


class SpaceError(ValueError):
    """An invalid search-space document; ``.field`` names the offending field."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"search space field {field!r}: {reason}")


class BlockSpec(NamedTuple):
    """One routing block: its output width and resolution, stage id and number of stacking layers."""

    index: int
    width: int
    resolution: int
    stage: int
    n_stacking: int


@dataclass(frozen=True)
class LayerSpec:
    """A fixed layer (stem or first layer): op name, output channels, stride."""

    op: str
    out: int
    stride: int

    def to_dict(self) -> dict:
        return {"op": self.op, "out": self.out, "stride": self.stride}


def spaces_dir() -> Path:
    """configs/spaces/ of the repository the densenas package lives in."""
    import densenas

    return Path(densenas.__file__).resolve().parents[1] / "configs" / "spaces"


def list_presets() -> list[str]:
    return sorted(p.stem for p in spaces_dir().glob("*.yaml"))


def _int(value: Any, field: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpaceError(field, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpaceError(field, f"must be >= {minimum}, got {value}")
    return value


def _int_list(value: Any, field: str, minimum: int | None = None) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise SpaceError(field, f"must be a list of integers, got {type(value).__name__}")
    return [_int(v, f"{field}[{k}]", minimum) for k, v in enumerate(value)]


def _op(value: Any, field: str) -> str:
    try:
        return canonical_op_name(value)
    except ValueError as e:
        raise SpaceError(field, str(e)) from None


def _layer(value: Any, field: str) -> LayerSpec:
    if not isinstance(value, Mapping):
        raise SpaceError(field, f"must be a mapping {{op, out, stride}}, got {value!r}")
    missing = [k for k in ("op", "out", "stride") if k not in value]
    if missing:
        raise SpaceError(field, f"missing {', '.join(missing)} (expected {{op, out, stride}})")
    extra = sorted(set(value) - {"op", "out", "stride"})
    if extra:
        raise SpaceError(field, f"unknown keys {extra} (expected {{op, out, stride}})")
    stride = _int(value["stride"], f"{field}.stride", 1)
    if stride not in (1, 2):
        raise SpaceError(f"{field}.stride", f"must be 1 or 2, got {stride}")
    return LayerSpec(_op(value["op"], f"{field}.op"), _int(value["out"], f"{field}.out", 1), stride)


class SearchSpace:
    """A validated DenseNAS search space and its block graph. Build with ``load_space``."""

    def __init__(self, doc: Mapping[str, Any], name: str | None = None):
        if not isinstance(doc, Mapping):
            raise SpaceError("<document>", f"must be a mapping, got {type(doc).__name__}")
        missing = [k for k in _REQUIRED if k not in doc]
        if missing:
            raise SpaceError(missing[0], f"missing (required fields: {', '.join(_REQUIRED)})")
        unknown = sorted(set(doc) - set(_REQUIRED) - set(_OPTIONAL) - set(_METADATA))
        if unknown:
            raise SpaceError(unknown[0], f"unknown field (known: {', '.join(_REQUIRED + _OPTIONAL)})")
        self.name = name or doc.get("name")

        self.input_size = _int(doc["input_size"], "input_size", 1)
        self.in_channels = _int(doc["in_channels"], "in_channels", 1)
        self.cost = doc.get("cost", "latency") or "latency"
        if self.cost not in COST_KINDS:
            raise SpaceError("cost", f"must be one of {COST_KINDS}, got {self.cost!r}")
        self.stem = _layer(doc["stem"], "stem")
        self.first_layer = None if doc.get("first_layer") is None else _layer(doc["first_layer"], "first_layer")
        lcc = doc.get("last_conv_channels")
        self.last_conv_channels = None if lcc is None else _int(lcc, "last_conv_channels", 1)
        self.connections_m = _int(doc["connections_m"], "connections_m", 1)

        for field in ("stacking_ops", "head_ops"):
            ops = doc[field]
            if not isinstance(ops, (list, tuple)) or not ops:
                raise SpaceError(field, f"must be a non-empty list of op names, got {ops!r}")
        self.stacking_ops = tuple(_op(o, f"stacking_ops[{k}]") for k, o in enumerate(doc["stacking_ops"]))
        self.head_ops = tuple(_op(o, f"head_ops[{k}]") for k, o in enumerate(doc["head_ops"]))
        for field, ops in (("stacking_ops", self.stacking_ops), ("head_ops", self.head_ops)):
            if len(set(ops)) != len(ops):
                raise SpaceError(field, f"lists an op twice: {list(ops)}")
            bad = [o for o in ops if o in ("conv3x3", "conv1x1")]
            if bad:
                raise SpaceError(field, f"{bad[0]} is a fixed layer, not a searchable op")
        if "skip" in self.head_ops:
            raise SpaceError("head_ops", "skip cannot be a head op: a head layer changes width/stride")

        widths = _int_list(doc["widths"], "widths", 1)
        resolutions = _int_list(doc["resolutions"], "resolutions", 1)
        stage_ids = _int_list(doc["stage_ids"], "stage_ids", 1)
        stacking = _int_list(doc["stacking_layers"], "stacking_layers", 0)
        if not widths:
            raise SpaceError("widths", "needs at least one searchable block")
        for field, lst in (("resolutions", resolutions), ("stage_ids", stage_ids), ("stacking_layers", stacking)):
            if len(lst) != len(widths):
                raise SpaceError(field, f"has {len(lst)} entries but widths has {len(widths)}; "
                                        "give one entry per searchable block")

        # Block 0: the fixed block after the stem (and first layer).
        fixed_stride = self.stem.stride * (self.first_layer.stride if self.first_layer else 1)
        if self.input_size % fixed_stride:
            raise SpaceError("input_size", f"{self.input_size} is not divisible by the stem/first-layer "
                                           f"stride {fixed_stride}")
        res0 = self.input_size // fixed_stride
        width0 = self.first_layer.out if self.first_layer else self.stem.out
        blocks = [BlockSpec(0, width0, res0, 0, 0)]
        for k, (w, r, s, n) in enumerate(zip(widths, resolutions, stage_ids, stacking)):
            blocks.append(BlockSpec(k + 1, w, r, s, n))
        for b in blocks[1:]:
            prev = blocks[b.index - 1]
            where = "block 0 (the fixed block)" if prev.index == 0 else f"widths[{prev.index - 1}]"
            if b.width < prev.width:
                raise SpaceError(f"widths[{b.index - 1}]", f"width {b.width} shrinks from {prev.width} "
                                                           f"of {where}; widths must not decrease")
            if prev.resolution % b.resolution or prev.resolution // b.resolution not in (1, 2):
                field = "input_size" if prev.index == 0 else f"resolutions[{b.index - 1}]"
                raise SpaceError(field, f"resolution {prev.resolution} -> {b.resolution} between blocks "
                                        f"{prev.index} and {b.index}: consecutive blocks must keep or "
                                        "halve the resolution (ratio 1 or 2); check input_size, strides "
                                        "and resolutions")
            if b.stage < prev.stage:
                raise SpaceError(f"stage_ids[{b.index - 1}]", f"stage {b.stage} after stage {prev.stage}; "
                                                              "stage ids must not decrease")
        self.blocks: tuple[BlockSpec, ...] = tuple(blocks)
        self.end_node = len(blocks)
        last_stage = blocks[-1].stage
        self.final_blocks: tuple[int, ...] = tuple(b.index for b in blocks if b.stage == last_stage)

        # Edges: the dense rule between blocks, then one final-conv edge per final block.
        head_edges = [(0, 1, blocks[0].resolution // blocks[1].resolution)]
        for bi in blocks[1:]:
            for j in range(bi.index + 1, min(bi.index + self.connections_m, len(blocks) - 1) + 1):
                bj = blocks[j]
                ratio, rem = divmod(bi.resolution, bj.resolution)
                if bj.stage > bi.stage + 1 or rem or ratio not in (1, 2):
                    break
                head_edges.append((bi.index, j, ratio))
        self.head_edges: tuple[tuple[int, int, int], ...] = tuple(sorted(head_edges))
        self.final_edges: tuple[tuple[int, int, int], ...] = tuple((b, self.end_node, 1) for b in self.final_blocks)
        self.edges: tuple[tuple[int, int, int], ...] = tuple(sorted(self.head_edges + self.final_edges))
        self._in = {j: sorted((e for e in self.edges if e[1] == j), key=lambda e: -e[0])
                    for j in range(len(blocks) + 1)}
        self._out = {i: sorted(e for e in self.edges if e[0] == i) for i in range(len(blocks))}

        # Every block must be on some path from block 0 to the end.
        reached = {0}
        for (i, j, _) in self.head_edges:  # sorted by src: a single forward sweep suffices
            if i in reached:
                reached.add(j)
        ends = {self.end_node}
        for (i, j, _) in reversed(self.edges):
            if j in ends:
                ends.add(i)
        for b in blocks:
            if b.index not in reached:
                raise SpaceError(f"stage_ids[{b.index - 1}]", f"block {b.index} ({b.width}@{b.resolution}, "
                                 f"stage {b.stage}) is reached by no path: no earlier block within "
                                 f"connections_m={self.connections_m} is at stage >= {b.stage - 1} with "
                                 "resolution ratio 1 or 2")
        for b in blocks:
            if b.index not in ends:
                raise SpaceError(f"stage_ids[{max(b.index - 1, 0)}]", f"block {b.index} ({b.width}@{b.resolution}, "
                                 f"stage {b.stage}) reaches no end (the final stage {last_stage}) within "
                                 f"connections_m={self.connections_m}")

    # ----------------------------------------------------------------- graph queries
    @property
    def num_blocks(self) -> int:
        """Searchable blocks (block 0 excluded)."""
        return len(self.blocks) - 1

    def in_edges(self, j: int) -> list[tuple[int, int, int]]:
        """Edges into block j (or into ``end_node``), nearest predecessor first."""
        return list(self._in[j])

    def out_edges(self, i: int) -> list[tuple[int, int, int]]:
        """Edges out of block i in destination order; for a final block the last is (i, end_node, 1)."""
        return list(self._out[i])

    def num_paths(self) -> int:
        """Number of block paths from block 0 to an end (counted, not enumerated)."""
        count = {self.end_node: 1}
        for i in range(len(self.blocks) - 1, -1, -1):
            count[i] = sum(count[j] for (_, j, _) in self._out[i])
        return count[0]

    def iter_paths(self) -> Iterator[tuple[int, ...]]:
        """Block paths (block indices, from 0 to a final block), in lexicographic order."""
        def walk(path: list[int]) -> Iterator[tuple[int, ...]]:
            for (_, j, _) in self._out[path[-1]]:
                if j == self.end_node:
                    yield tuple(path)
                else:
                    path.append(j)
                    yield from walk(path)
                    path.pop()
        yield from walk([0])

    def paths(self) -> list[tuple[int, ...]]:
        """Every block path from block 0 to an end block (ImageNet MBConv: 15,456)."""
        return list(self.iter_paths())

    def num_arch_parameters(self) -> int:
        """Architecture scalars: alphas of every head edge and stacking layer, plus one beta per edge."""
        n_stack = sum(b.n_stacking for b in self.blocks)
        return n_stack * len(self.stacking_ops) + len(self.head_edges) * len(self.head_ops) + len(self.edges)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """The canonical document (op names canonical, no metadata); ``load_space`` round-trips it."""
        searchable = self.blocks[1:]
        return {
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "cost": self.cost,
            "stem": self.stem.to_dict(),
            "first_layer": self.first_layer.to_dict() if self.first_layer else None,
            "widths": [b.width for b in searchable],
            "resolutions": [b.resolution for b in searchable],
            "stage_ids": [b.stage for b in searchable],
            "stacking_layers": [b.n_stacking for b in searchable],
            "connections_m": self.connections_m,
            "last_conv_channels": self.last_conv_channels,
            "stacking_ops": list(self.stacking_ops),
            "head_ops": list(self.head_ops),
        }

    def space_hash(self) -> str:
        """sha256 of the canonical JSON of ``to_dict()`` (the name is a label and is not hashed)."""
        return self._hash

    @cached_property
    def _hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self._hash)

    def __repr__(self) -> str:
        return (f"SearchSpace(name={self.name!r}, blocks={self.num_blocks}, edges={len(self.edges)}, "
                f"input={self.in_channels}x{self.input_size}, hash={self._hash[:12]})")

    def stats(self, num_classes: int = 1000, count_params: bool = True) -> dict:
        """Counts for reports: blocks, edges, paths, architecture scalars, super-network weights."""
        out: dict[str, Any] = {
            "name": self.name,
            "space_hash": self.space_hash(),
            "searchable_blocks": self.num_blocks,
            "edges": len(self.edges),
            "head_edges": len(self.head_edges),
            "final_edges": len(self.final_edges),
            "stacking_layers": sum(b.n_stacking for b in self.blocks),
            "distinct_block_paths": self.num_paths(),
            "architecture_scalars": self.num_arch_parameters(),
        }
        if count_params:
            import torch

            from densenas.supernet import SuperNet

            # Built on the meta device: shapes only, no memory, no init time.
            with torch.device("meta"):
                net = SuperNet(self, num_classes=num_classes, bn_affine=False)
            out["num_classes"] = num_classes
            out["supernet_params"] = sum(p.numel() for p in net.weight_parameters())
        return out


def load_space(source: str | Path | Mapping[str, Any] | SearchSpace) -> SearchSpace:
    """A ``SearchSpace`` from a YAML path, a dict, or a preset name (``configs/spaces/<name>.yaml``)."""
    if isinstance(source, SearchSpace):
        return source
    if isinstance(source, Mapping):
        return SearchSpace(source)
    if not isinstance(source, (str, Path)):
        raise SpaceError("<source>", f"expected a YAML path, dict or preset name, got {type(source).__name__}")
    path = Path(source)
    if not path.suffix and not path.exists():
        preset = spaces_dir() / f"{source}.yaml"
        if not preset.exists():
            raise SpaceError("<source>", f"no preset named {str(source)!r}; presets: {', '.join(list_presets())} "
                                         "(or give a YAML path or a dict)")
        path = preset
    if not path.exists():
        raise SpaceError("<source>", f"file {str(path)!r} does not exist")
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, Mapping):
        raise SpaceError("<document>", f"{path} must hold a mapping of space fields")
    return SearchSpace(doc, name=doc.get("name") or path.stem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenas.space", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stats", help="blocks, edges, paths, architecture scalars, super-network weights")
    st.add_argument("source", help="YAML path or preset name (" + ", ".join(list_presets()) + ")")
    st.add_argument("--num-classes", type=int, default=100)
    st.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        space = load_space(args.source)
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = space.stats(num_classes=args.num_classes)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        width = max(len(k) for k in stats)
        for k, v in stats.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so SearchSpace is one class.
    from densenas.space import main as _main

    sys.exit(_main())
