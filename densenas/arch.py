"""A DenseNAS architecture as data (a versioned JSON document), and the network built from it.

The document::

    {"format": "densenas-arch", "version": 1,
     "input_size": 224, "in_channels": 3,
     "stem": {"op": "conv3x3", "out": 16, "stride": 2},
     "blocks": [{"in": 16, "out": 16, "stride": 1, "head_op": "mbconv_k3_e1", "stacking_ops": []},
                {"in": 16, "out": 24, "stride": 2, "head_op": "mbconv_k3_e3", "stacking_ops": []}, ...],
     "last_conv": {"op": "conv1x1", "out": 1984},          # or null: no 1x1 conv before pooling
     "num_classes": 1000,
     "metadata": {"name": ..., "source": ..., ...}}        # free-form, JSON-serialisable

The first block is the fixed first layer of the MBConv spaces (16 -> 16, ``mbconv_k3_e1``); the
others are the routing blocks on the derived path. A block is its head layer (changes width, has
the block's stride) followed by its stacking layers (stride 1, width ``out``). Op names are stored
canonical (``densenas.ops``); the authors' spellings are accepted on input.

Three other forms:

- the authors' release string (``to_official`` / ``from_official``):
  ``[[in, out], head_op, [stacking...], n, stride]`` per block joined by ``|``, then
  ``[[c, 1984], 'conv1_1']`` for the last conv. The stem is not in it: it is a 3x3 conv, stride 2,
  whose width is the first entry's ``in`` (keywords of ``from_official`` change that). The arXiv-2019
  release has no ``conv1_1`` entry but a 1x1 conv appended by its builder:
  ``from_official(s, last_conv_channels=1728)``.
- ``one_line()``, compact and human: ``16-k3e1 | 24:s2 k3e3 | 48:s2 k7e6 k7e3 | ... | 1984``.
- the built network, ``build_model(arch)`` -> ``DenseNASNet`` (stem -> blocks -> last 1x1 conv ->
  global average pool -> Linear); ``model.arch`` is its document and ``Arch.from_model(model)``
  reads the document back from the modules themselves.

Presets (``densenas/presets/<name>.json``) are the published networks of
``shared/reference/published_archs.yaml``, generated from the authors' strings by
``python -m densenas.arch make-presets <published_archs.yaml>``. ``load_arch(source)`` takes an
``Arch``, a dict, a JSON string or path, an authors' string or a preset name.

Equality of two ``Arch`` ignores ``metadata``: equal documents build the same network.

CLI: ``python -m densenas.arch stats SOURCE [--json]``, ``convert SOURCE --to json|official|one-line``,
``presets``, ``make-presets REFERENCE_YAML``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from densenas.ops import build_op, canonical_op_name

__all__ = [
    "ARCH_FORMAT",
    "ARCH_VERSION",
    "ArchError",
    "StemSpec",
    "ArchBlock",
    "LastConvSpec",
    "Arch",
    "DenseNASNet",
    "build_model",
    "load_arch",
    "arch_from_derivation",
    "arch_stats",
    "presets_dir",
    "list_presets",
    "make_presets",
    "official_op_name",
    "MOBILENET_V2_OFFICIAL",
]

ARCH_FORMAT = "densenas-arch"
ARCH_VERSION = 1

# MobileNetV2 1.0 (Sandler et al. 2018, table 2: t, c, n, s) written in the authors' string format:
# stem 32 (stride 2), then one entry per (t, c, n, s) row -- head = the row's first layer with its
# stride, stacking = the n - 1 repeats -- and the 1x1 conv to 1280 before pooling.
MOBILENET_V2_OFFICIAL = (
    "[[32, 16], 'mbconv_k3_t1', [], 0, 1]|"
    "[[16, 24], 'mbconv_k3_t6', ['mbconv_k3_t6'], 1, 2]|"
    "[[24, 32], 'mbconv_k3_t6', ['mbconv_k3_t6', 'mbconv_k3_t6'], 2, 2]|"
    "[[32, 64], 'mbconv_k3_t6', ['mbconv_k3_t6', 'mbconv_k3_t6', 'mbconv_k3_t6'], 3, 2]|"
    "[[64, 96], 'mbconv_k3_t6', ['mbconv_k3_t6', 'mbconv_k3_t6'], 2, 1]|"
    "[[96, 160], 'mbconv_k3_t6', ['mbconv_k3_t6', 'mbconv_k3_t6'], 2, 2]|"
    "[[160, 320], 'mbconv_k3_t6', [], 0, 1]|"
    "[[320, 1280], 'conv1_1']"
)


class ArchError(ValueError):
    """An invalid architecture document; ``.field`` names the offending field (``blocks[2].in``)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"arch field {field!r}: {reason}")


# --------------------------------------------------------------------------- field checks
def _int(value: Any, fld: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArchError(fld, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ArchError(fld, f"must be >= {minimum}, got {value}")
    return value


def _stride(value: Any, fld: str) -> int:
    s = _int(value, fld)
    if s not in (1, 2):
        raise ArchError(fld, f"must be 1 or 2, got {s}")
    return s


def _op(value: Any, fld: str) -> str:
    try:
        return canonical_op_name(value)
    except ValueError as e:
        raise ArchError(fld, str(e)) from None


def _mapping(value: Any, fld: str, required: Sequence[str], optional: Sequence[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ArchError(fld, f"must be a mapping with keys {list(required)}, got {value!r}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ArchError(fld, f"missing {', '.join(missing)} (expected keys {list(required) + list(optional)})")
    extra = sorted(set(value) - set(required) - set(optional))
    if extra:
        raise ArchError(fld, f"unknown keys {extra} (expected keys {list(required) + list(optional)})")
    return value


def official_op_name(name: str) -> str:
    """Canonical op name -> the authors' spelling (``mbconv_k3_e6`` -> ``mbconv_k3_t6``, ``conv1x1`` -> ``conv1_1``)."""
    op = canonical_op_name(name)
    if op.startswith("mbconv_"):
        return re.sub(r"_e(\d+)$", r"_t\1", op)
    return {"skip": "skip_connect", "conv1x1": "conv1_1"}.get(op, op)


def _short_op(name: str) -> str:
    m = re.match(r"^mbconv_k(\d+)_e(\d+)$", name)
    return f"k{m.group(1)}e{m.group(2)}" if m else name


# --------------------------------------------------------------------------- the document
@dataclass(frozen=True)
class StemSpec:
    """The first conv: op (``conv3x3``), output channels, stride."""

    op: str
    out: int
    stride: int

    @classmethod
    def from_dict(cls, d: Any, fld: str = "stem") -> "StemSpec":
        d = _mapping(d, fld, ("op", "out", "stride"))
        return cls(_op(d["op"], f"{fld}.op"), _int(d["out"], f"{fld}.out"), _stride(d["stride"], f"{fld}.stride"))

    def to_dict(self) -> dict:
        return {"op": self.op, "out": self.out, "stride": self.stride}


@dataclass(frozen=True)
class ArchBlock:
    """One block: a head layer ``c_in -> c_out`` at ``stride``, then stacking layers at ``c_out``, stride 1."""

    c_in: int
    c_out: int
    stride: int
    head_op: str
    stacking_ops: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Any, fld: str = "block") -> "ArchBlock":
        d = _mapping(d, fld, ("in", "out", "stride", "head_op"), ("stacking_ops",))
        stacking = d.get("stacking_ops", [])
        if not isinstance(stacking, (list, tuple)):
            raise ArchError(f"{fld}.stacking_ops", f"must be a list of op names, got {stacking!r}")
        return cls(
            c_in=_int(d["in"], f"{fld}.in"),
            c_out=_int(d["out"], f"{fld}.out"),
            stride=_stride(d["stride"], f"{fld}.stride"),
            head_op=_op(d["head_op"], f"{fld}.head_op"),
            stacking_ops=tuple(_op(o, f"{fld}.stacking_ops[{k}]") for k, o in enumerate(stacking)),
        )

    def to_dict(self) -> dict:
        return {"in": self.c_in, "out": self.c_out, "stride": self.stride, "head_op": self.head_op,
                "stacking_ops": list(self.stacking_ops)}

    @property
    def ops(self) -> tuple[str, ...]:
        return (self.head_op, *self.stacking_ops)


@dataclass(frozen=True)
class LastConvSpec:
    """The conv before pooling (``conv1x1``) and its output channels; stride 1."""

    op: str
    out: int

    @classmethod
    def from_dict(cls, d: Any, fld: str = "last_conv") -> "LastConvSpec":
        d = _mapping(d, fld, ("op", "out"))
        return cls(_op(d["op"], f"{fld}.op"), _int(d["out"], f"{fld}.out"))

    def to_dict(self) -> dict:
        return {"op": self.op, "out": self.out}


def _coerce(value: Any, kind: type, fld: str) -> Any:
    return value if isinstance(value, kind) else kind.from_dict(value, fld)


@dataclass(frozen=True)
class Arch:
    """A DenseNAS network as data. Construct directly (dicts and lists are accepted and validated), or
    with ``from_json`` / ``from_dict`` / ``from_official`` / ``load_arch``. ``metadata`` is not compared."""

    stem: StemSpec
    blocks: tuple[ArchBlock, ...]
    last_conv: LastConvSpec | None = None
    input_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise fields in place once, then validate the whole.
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("stem", _coerce(self.stem, StemSpec, "stem"))
        if isinstance(self.blocks, (str, bytes)) or not isinstance(self.blocks, Iterable):
            raise ArchError("blocks", f"must be a list of blocks, got {self.blocks!r}")
        set_("blocks", tuple(_coerce(b, ArchBlock, f"blocks[{k}]") for k, b in enumerate(self.blocks)))
        if self.last_conv is not None:
            set_("last_conv", _coerce(self.last_conv, LastConvSpec, "last_conv"))
        _int(self.input_size, "input_size")
        _int(self.in_channels, "in_channels")
        _int(self.num_classes, "num_classes")
        if self.metadata is None:
            set_("metadata", {})
        if not isinstance(self.metadata, Mapping):
            raise ArchError("metadata", f"must be a mapping, got {self.metadata!r}")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as e:
            raise ArchError("metadata", f"must be JSON-serialisable ({e})") from None
        set_("metadata", dict(self.metadata))
        self._check_chain()

    def _check_chain(self) -> None:
        if not self.blocks:
            raise ArchError("blocks", "must hold at least one block")
        width = self.stem.out
        for k, b in enumerate(self.blocks):
            where = "stem.out" if k == 0 else f"blocks[{k - 1}].out"
            if b.c_in != width:
                raise ArchError(f"blocks[{k}].in", f"is {b.c_in} but the layer before it ({where}) outputs {width}")
            if b.head_op == "skip" and (b.stride != 1 or b.c_in != b.c_out):
                raise ArchError(f"blocks[{k}].head_op", f"skip cannot change width or stride "
                                                        f"({b.c_in}->{b.c_out}, stride {b.stride}); use a conv op")
            width = b.c_out

    # ------------------------------------------------------------------ derived facts
    @property
    def name(self) -> str | None:
        return self.metadata.get("name")

    @property
    def total_stride(self) -> int:
        s = self.stem.stride
        for b in self.blocks:
            s *= b.stride
        return s

    @property
    def num_layers(self) -> int:
        """Layers inside the blocks (heads + stacking layers)."""
        return sum(len(b.ops) for b in self.blocks)

    @property
    def feature_channels(self) -> int:
        """Channels entering the classifier."""
        return self.last_conv.out if self.last_conv is not None else self.blocks[-1].c_out

    def replace(self, **changes: Any) -> "Arch":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": ARCH_FORMAT,
            "version": ARCH_VERSION,
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "stem": self.stem.to_dict(),
            "blocks": [b.to_dict() for b in self.blocks],
            "last_conv": None if self.last_conv is None else self.last_conv.to_dict(),
            "num_classes": self.num_classes,
            "metadata": dict(self.metadata),
        }

    def to_json(self, indent: int | None = 2) -> str:
        if indent is None:
            return json.dumps(self.to_dict(), separators=(",", ":"))
        # One block per line: readable diffs without a line per op; metadata indented as usual.
        pad = " " * indent
        lines = []
        for key, value in self.to_dict().items():
            if key == "blocks":
                rows = ",\n".join(f"{pad * 2}{json.dumps(b)}" for b in value)
                text = f"[\n{rows}\n{pad}]"
            elif key == "metadata":
                text = json.dumps(value, indent=indent).replace("\n", "\n" + pad)
            else:
                text = json.dumps(value)
            lines.append(f"{pad}{json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_dict(cls, doc: Any) -> "Arch":
        if not isinstance(doc, Mapping):
            raise ArchError("<document>", f"must be a JSON object, got {type(doc).__name__}")
        fmt = doc.get("format")
        if fmt != ARCH_FORMAT:
            raise ArchError("format", f"must be {ARCH_FORMAT!r}, got {fmt!r} (is this an architecture document? "
                                      "a search-space YAML goes to densenas.space.load_space)")
        version = _int(doc.get("version"), "version")
        if version > ARCH_VERSION:
            raise ArchError("version", f"document version {version} is newer than this code reads "
                                       f"({ARCH_VERSION}); upgrade densenas")
        known = ("format", "version", "input_size", "in_channels", "stem", "blocks", "last_conv",
                 "num_classes", "metadata")
        missing = [k for k in ("input_size", "in_channels", "stem", "blocks", "last_conv") if k not in doc]
        if missing:
            raise ArchError(missing[0], "missing (an architecture document needs input_size, in_channels, stem, "
                                        "blocks and last_conv; last_conv may be null)")
        extra = sorted(set(doc) - set(known))
        if extra:
            raise ArchError(extra[0], f"unknown key(s) {extra}; valid keys: {list(known)}")
        if not isinstance(doc["blocks"], list):
            raise ArchError("blocks", f"must be a list of blocks, got {doc['blocks']!r}")
        return cls(
            stem=StemSpec.from_dict(doc["stem"]),
            blocks=tuple(ArchBlock.from_dict(b, f"blocks[{k}]") for k, b in enumerate(doc["blocks"])),
            last_conv=None if doc["last_conv"] is None else LastConvSpec.from_dict(doc["last_conv"]),
            input_size=doc["input_size"],
            in_channels=doc["in_channels"],
            num_classes=doc.get("num_classes", 1000),
            metadata=doc.get("metadata") or {},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "Arch":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArchError("<document>", f"not valid JSON: {e}") from None
        return cls.from_dict(doc)

    # ------------------------------------------------------------------ the authors' string
    def to_official(self) -> str:
        """The authors' release encoding. Stem, input size, classes and metadata are not part of it."""
        parts = []
        for b in self.blocks:
            stack = ", ".join(f"'{official_op_name(o)}'" for o in b.stacking_ops)
            parts.append(f"[[{b.c_in}, {b.c_out}], '{official_op_name(b.head_op)}', [{stack}], "
                         f"{len(b.stacking_ops)}, {b.stride}]")
        if self.last_conv is not None:
            parts.append(f"[[{self.blocks[-1].c_out}, {self.last_conv.out}], '{official_op_name(self.last_conv.op)}']")
        return "|".join(parts)

    @classmethod
    def from_official(cls, text: str, *, input_size: int = 224, in_channels: int = 3, num_classes: int = 1000,
                      stem_op: str = "conv3x3", stem_stride: int = 2, last_conv_channels: int | None = None,
                      last_conv_op: str = "conv1x1", metadata: Mapping[str, Any] | None = None) -> "Arch":
        """Parse the authors' string (safely: ``ast.literal_eval`` per entry, never ``eval``).

        ``last_conv_channels`` adds a 1x1 conv when the string has no ``conv1_1`` entry (the arXiv-2019
        release appended one in its builder); it is an error to give it when the string has one.
        """
        if not isinstance(text, str) or not text.strip():
            raise ArchError("<official>", f"expected the authors' '|'-joined string, got {text!r}")
        entries = [e.strip() for e in text.strip().strip("|").split("|")]
        blocks: list[ArchBlock] = []
        last_conv: LastConvSpec | None = None
        for k, raw in enumerate(entries):
            fld = f"official[{k}]"
            if last_conv is not None:
                raise ArchError(fld, f"entry {raw!r} follows the last-conv entry; the last conv must come last")
            try:
                entry = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                raise ArchError(fld, f"cannot parse {raw!r} as a Python literal ({type(e).__name__}); expected "
                                     "[[in, out], head_op, [stacking_ops...], n, stride]") from None
            if not isinstance(entry, (list, tuple)):
                raise ArchError(fld, f"expected a list, got {raw!r}")
            channels = entry[0] if entry else None
            if (not isinstance(channels, (list, tuple)) or len(channels) != 2):
                raise ArchError(f"{fld}[0]", f"expected [in, out] channels, got {channels!r}")
            c_in, c_out = (_int(c, f"{fld}[0][{i}]") for i, c in enumerate(channels))
            if len(entry) == 2:  # [[c, 1984], 'conv1_1']
                op = _op(entry[1], f"{fld}[1]")
                if op != "conv1x1":
                    raise ArchError(f"{fld}[1]", f"a two-item entry is the last conv ('conv1_1'), got {entry[1]!r}")
                if not blocks:
                    raise ArchError(fld, "the last-conv entry needs at least one block before it")
                if c_in != blocks[-1].c_out:
                    raise ArchError(f"{fld}[0][0]", f"is {c_in} but the last block outputs {blocks[-1].c_out}")
                last_conv = LastConvSpec(op, c_out)
                continue
            if len(entry) != 5:
                raise ArchError(fld, f"expected [[in, out], head_op, [stacking_ops...], n, stride] "
                                     f"(5 items) or [[c, out], 'conv1_1'], got {len(entry)} items: {raw!r}")
            _, head, stacking, n, stride = entry
            if not isinstance(stacking, (list, tuple)):
                raise ArchError(f"{fld}[2]", f"stacking ops must be a list, got {stacking!r}")
            n = _int(n, f"{fld}[3]", minimum=0)
            if n != len(stacking):
                raise ArchError(f"{fld}[3]", f"says {n} stacking layers but the list holds {len(stacking)}")
            blocks.append(ArchBlock(
                c_in=c_in, c_out=c_out, stride=_stride(stride, f"{fld}[4]"), head_op=_op(head, f"{fld}[1]"),
                stacking_ops=tuple(_op(o, f"{fld}[2][{i}]") for i, o in enumerate(stacking)),
            ))
        if not blocks:
            raise ArchError("<official>", "holds no block entries")
        if last_conv_channels is not None:
            if last_conv is not None:
                raise ArchError("last_conv_channels", f"given ({last_conv_channels}) but the string already ends "
                                                      f"with a last-conv entry to {last_conv.out}")
            last_conv = LastConvSpec(_op(last_conv_op, "last_conv_op"), _int(last_conv_channels, "last_conv_channels"))
        stem = StemSpec(_op(stem_op, "stem_op"), blocks[0].c_in, _stride(stem_stride, "stem_stride"))
        return cls(stem=stem, blocks=tuple(blocks), last_conv=last_conv, input_size=input_size,
                   in_channels=in_channels, num_classes=num_classes, metadata=dict(metadata or {}))

    # ------------------------------------------------------------------ human form
    def one_line(self) -> str:
        """``16-k3e1 | 24:s2 k3e3 | 48:s2 k7e6 k7e3 | ... | 1984``: width, ``s2`` when the block
        downsamples, its ops (head first); a non-default stem is shown as ``32/s2``; the last conv width last."""
        parts = []
        stem = str(self.stem.out) if (self.stem.op, self.stem.stride) == ("conv3x3", 2) else \
            f"{self.stem.out}/{_short_op(self.stem.op)}/s{self.stem.stride}"
        for k, b in enumerate(self.blocks):
            ops = " ".join(_short_op(o) for o in b.ops)
            if k == 0 and b.c_out == b.c_in and b.stride == 1:
                parts.append(f"{stem}-{ops}")
                continue
            if k == 0:
                parts.append(stem)
            parts.append(f"{b.c_out}:{'s2 ' if b.stride == 2 else ''}{ops}")
        if self.last_conv is not None:
            parts.append(str(self.last_conv.out) if self.last_conv.op == "conv1x1" else
                         f"{self.last_conv.out}:{_short_op(self.last_conv.op)}")
        return " | ".join(parts)

    def __str__(self) -> str:
        return self.one_line()

    # ------------------------------------------------------------------ from other things
    @classmethod
    def from_model(cls, model: nn.Module, input_size: int | None = None) -> "Arch":
        """Read the document back from a ``DenseNASNet``'s modules (their ``.spec``), not from ``model.arch``."""
        try:
            stem_spec = model.stem.spec
            block_specs = [[layer.spec for layer in block] for block in model.blocks]
            last = model.last_conv.spec if model.last_conv is not None else None
            classifier: nn.Linear = model.classifier
        except AttributeError as e:
            raise ArchError("<model>", f"not a DenseNASNet (stem/blocks/last_conv/classifier of densenas.ops "
                                       f"modules): {e}") from None
        blocks = []
        for k, specs in enumerate(block_specs):
            head, *stacking = specs
            for s in stacking:
                if s.stride != 1 or s.c_in != head.c_out or s.c_out != head.c_out:
                    raise ArchError(f"blocks[{k}]", f"stacking layer {s} is not {head.c_out}->{head.c_out} stride 1")
            blocks.append(ArchBlock(head.c_in, head.c_out, head.stride, head.op, tuple(s.op for s in stacking)))
        known = getattr(model, "arch", None)
        if input_size is None:
            input_size = known.input_size if isinstance(known, Arch) else 224
        return cls(stem=StemSpec(stem_spec.op, stem_spec.c_out, stem_spec.stride), blocks=tuple(blocks),
                   last_conv=None if last is None else LastConvSpec(last.op, last.c_out),
                   input_size=input_size, in_channels=stem_spec.c_in, num_classes=classifier.out_features,
                   metadata=dict(known.metadata) if isinstance(known, Arch) else {})

    @classmethod
    def from_path(cls, space: Any, block_path: Sequence[int], head_ops: Sequence[str],
                  stacking_ops: Sequence[Sequence[str]], num_classes: int = 1000,
                  metadata: Mapping[str, Any] | None = None) -> "Arch":
        """A network of a search space: ``block_path`` (block indices, block 0 first), one head op per edge
        on the path, one list of stacking ops per block after block 0 (``skip`` entries are dropped)."""
        path = list(block_path)
        if len(head_ops) != len(path) - 1 or len(stacking_ops) != len(path) - 1:
            raise ArchError("<path>", f"a path of {len(path)} blocks needs {len(path) - 1} head ops and "
                                      f"{len(path) - 1} stacking lists, got {len(head_ops)} and {len(stacking_ops)}")
        blocks = []
        for (i, j), head, stack in zip(zip(path, path[1:]), head_ops, stacking_ops):
            bi, bj = space.blocks[i], space.blocks[j]
            blocks.append({"c_in": bi.width, "c_out": bj.width, "stride": bi.resolution // bj.resolution,
                           "head": head, "stack": [o for o in stack if canonical_op_name(o) != "skip"]})
        return arch_from_derivation(space, blocks, num_classes=num_classes, metadata=metadata)


def arch_from_derivation(space: Any, blocks: Sequence[Mapping[str, Any]], num_classes: int = 1000,
                         metadata: Mapping[str, Any] | None = None) -> Arch:
    """The ``Arch`` of a derived network of ``space`` (a ``densenas.space.SearchSpace``).

    ``blocks``: the path's blocks after block 0, each ``{c_in, c_out, stride, head, stack}`` (as
    ``densenas.derive`` makes them). The space gives the stem, the fixed first layer (the first
    block of the document when the space has one), the last conv and the input.
    """
    first = []
    if space.first_layer is not None:
        fl = space.first_layer
        first.append(ArchBlock(space.stem.out, fl.out, fl.stride, fl.op, ()))
    derived = []
    for k, b in enumerate(blocks):
        try:
            derived.append(ArchBlock(int(b["c_in"]), int(b["c_out"]), int(b["stride"]),
                                     _op(b["head"], f"derived[{k}].head"),
                                     tuple(_op(o, f"derived[{k}].stack") for o in b.get("stack", ()))))
        except KeyError as e:
            raise ArchError(f"derived[{k}]", f"missing {e.args[0]!r} (expected c_in, c_out, stride, head, stack)") \
                from None
    last = None if space.last_conv_channels is None else LastConvSpec("conv1x1", int(space.last_conv_channels))
    meta = {"source": "derived", "space": getattr(space, "name", None)}
    if hasattr(space, "space_hash"):
        meta["space_hash"] = space.space_hash()
    meta.update(metadata or {})
    return Arch(stem=StemSpec(space.stem.op, space.stem.out, space.stem.stride), blocks=tuple(first + derived),
                last_conv=last, input_size=space.input_size, in_channels=space.in_channels,
                num_classes=num_classes, metadata=meta)


# --------------------------------------------------------------------------- the network
class DenseNASNet(nn.Module):
    """stem -> blocks (head layer, then stacking layers) -> [last 1x1 conv] -> global avg pool -> [dropout] -> Linear.

    ``.arch`` is the document it was built from (with the classifier's ``num_classes``).
    """

    def __init__(self, arch: Arch, num_classes: int | None = None, dropout: float = 0.0, bn_affine: bool = True):
        super().__init__()
        num_classes = arch.num_classes if num_classes is None else _int(num_classes, "num_classes")
        self.arch = arch if num_classes == arch.num_classes else arch.replace(num_classes=num_classes)
        self.stem = build_op(arch.stem.op, arch.in_channels, arch.stem.out, arch.stem.stride, bn_affine)
        self.blocks = nn.Sequential(*[
            nn.Sequential(build_op(b.head_op, b.c_in, b.c_out, b.stride, bn_affine),
                          *[build_op(o, b.c_out, b.c_out, 1, bn_affine) for o in b.stacking_ops])
            for b in arch.blocks
        ])
        last = arch.last_conv
        self.last_conv = None if last is None else build_op(last.op, arch.blocks[-1].c_out, last.out, 1, bn_affine)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(arch.feature_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MobileNetV2 / timm initialisation: He (fan_out) convs, BN 1/0, Linear N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return x if self.last_conv is None else self.last_conv(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(arch: Any, num_classes: int | None = None, dropout: float = 0.0, bn_affine: bool = True) -> DenseNASNet:
    """Build the network of ``arch`` (anything ``load_arch`` takes). ``num_classes`` defaults to the
    document's (1000 for the presets). Works under ``with torch.device("meta"):`` for counting."""
    return DenseNASNet(load_arch(arch), num_classes=num_classes, dropout=dropout, bn_affine=bn_affine)


# --------------------------------------------------------------------------- presets and loading
def presets_dir() -> Path:
    return Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.json"))


def load_arch(source: Any) -> Arch:
    """An ``Arch`` from an ``Arch``, a dict, a JSON string, a JSON file path, an authors' string or a preset name."""
    if isinstance(source, Arch):
        return source
    if isinstance(source, Mapping):
        return Arch.from_dict(source)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise ArchError("<source>", f"expected an Arch, dict, JSON, path, authors' string or preset name, "
                                    f"got {type(source).__name__}")
    text = source.strip()
    if text.startswith("{"):
        return Arch.from_json(text)
    if text.startswith("["):
        return Arch.from_official(text)
    preset = presets_dir() / f"{text}.json"
    if re.fullmatch(r"[A-Za-z0-9_.\-]+", text) and preset.exists():
        return Arch.from_json(preset.read_text())
    path = Path(text)
    if path.exists():
        try:
            return Arch.from_json(path.read_text())
        except ArchError as e:
            raise ArchError(e.field, f"{e.reason} (in {path})") from None
    raise ArchError("<source>", f"{text[:80]!r} is not a file, a preset ({', '.join(list_presets())}), JSON or "
                                "an authors' string")


def make_presets(reference: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``<name>.json`` for every network of ``published_archs.yaml`` from its authors' string
    (``mobilenet_v2_1_0`` from ``MOBILENET_V2_OFFICIAL``), with the reference's numbers as metadata."""
    import yaml

    ref = yaml.safe_load(Path(reference).read_text())
    out = Path(out_dir) if out_dir is not None else presets_dir()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, entry in ref.items():
        official = entry.get("official")
        source = f"shared/reference/published_archs.yaml: {name}.official"
        if official is None:
            if name != "mobilenet_v2_1_0":
                raise ArchError(name, "has no 'official' string and no built-in encoding")
            official, source = MOBILENET_V2_OFFICIAL, "MobileNetV2 1.0 (Sandler et al. 2018, table 2)"
        official = re.sub(r"\s*\|\s*", "|", official.strip())
        meta: dict[str, Any] = {"name": name, "source": source, "official": official}
        for key in ("paper", "recount", "note"):
            if key in entry:
                meta[key] = entry[key]
        if "last_conv_channels" in entry:  # appended by the release's builder, not in its string
            meta["official_last_conv_channels"] = entry["last_conv_channels"]
        arch = Arch.from_official(official, last_conv_channels=entry.get("last_conv_channels"), metadata=meta)
        path = out / f"{name}.json"
        path.write_text(arch.to_json())
        written.append(path)
    return written


def arch_stats(arch: Any, num_classes: int | None = None) -> dict:
    """Parameters and MACs (batch 1, the arch's input size) of the network, and its forms."""
    from densenas.counting import count_macs, count_params

    arch = load_arch(arch)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = build_model(arch, num_classes=num_classes)
    return {
        "name": arch.name,
        "input_size": arch.input_size,
        "in_channels": arch.in_channels,
        "num_classes": model.arch.num_classes,
        "params": count_params(model),
        "macs": count_macs(model, arch.input_size, arch.in_channels),
        "layers": arch.num_layers,
        "one_line": arch.one_line(),
        "official": arch.to_official(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenas.arch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stats", help="parameters, MACs (at the arch's input size), one-line form")
    st.add_argument("source", help="JSON path, JSON, authors' string or preset (" + ", ".join(list_presets()) + ")")
    st.add_argument("--num-classes", type=int, default=None, help="classifier width (default: the document's)")
    st.add_argument("--json", action="store_true", help="print JSON")
    cv = sub.add_parser("convert", help="print the architecture in another form")
    cv.add_argument("source")
    cv.add_argument("--to", choices=("json", "official", "one-line"), default="json")
    sub.add_parser("presets", help="list the preset names")
    mk = sub.add_parser("make-presets", help="regenerate densenas/presets/*.json from published_archs.yaml")
    mk.add_argument("reference", help="path to shared/reference/published_archs.yaml")
    mk.add_argument("--out", default=None, help="output folder (default: densenas/presets)")
    args = parser.parse_args(argv)
    try:
        if args.command == "presets":
            print("\n".join(list_presets()))
        elif args.command == "make-presets":
            for p in make_presets(args.reference, args.out):
                print(f"wrote {p}")
        elif args.command == "convert":
            arch = load_arch(args.source)
            print({"json": arch.to_json, "official": arch.to_official, "one-line": arch.one_line}[args.to]().rstrip())
        else:
            stats = arch_stats(args.source, args.num_classes)
            if args.json:
                print(json.dumps(stats, indent=2))
            else:
                print(f"name        {stats['name'] or '-'}")
                print(f"input       {stats['in_channels']}x{stats['input_size']}x{stats['input_size']}, "
                      f"{stats['num_classes']} classes")
                print(f"params      {stats['params']:,} ({stats['params'] / 1e6:.3f} M)")
                print(f"MACs        {stats['macs']:,} ({stats['macs'] / 1e6:.2f} M, batch 1)")
                print(f"layers      {stats['layers']}")
                print(f"arch        {stats['one_line']}")
    except (ArchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so Arch is one class.
    from densenas.arch import main as _main

    sys.exit(_main())
