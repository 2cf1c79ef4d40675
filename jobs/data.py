"""Ray Data readers for the split stage's shards: store -> decode + augmentation -> Train workers.

    datasets = train_datasets(manifest, store, input_size=32, channels=3)
    trainer = TorchTrainer(loop, datasets=datasets, ...)      # Ray splits them across workers

    # inside the training loop, on each worker:
    for images, labels in worker_batches("train", batch_size=64):
        ...

``shard_dataset`` streams the manifest's Parquet shards with ``ray.data.read_parquet`` through the
store's pyarrow filesystem (S3 or local), decodes the PNG bytes and applies the paper's
augmentation (``imagedata.train_transform``: RandomResizedCrop + flip; ``eval_transform``:
resize + centre crop) in ``map_batches``, producing ``{"image": float32 [B, C, H, W], "label":
int64 [B]}``. Each Train worker reads only its own shard via ``ray.train.get_dataset_shard``.

In-memory worker data (``data_loading: memory``, the Train stages' default): a ``DataSpec`` travels
in the loop config; each worker calls ``open_worker_streams(spec, streams, rank, world)``, which
reads its own disjoint rows (``rank::world``) of the split's shards once, decodes them to uint8
tensors and applies the evaluation transform once; every epoch it then iterates batches whose order
and augmentation come from a generator seeded by (seed, epoch, rank, stream), so a restarted worker
repeats exactly the epoch it lost. Training augmentation (RandomResizedCrop + flip) runs on whole
batches of tensors (``crop_resize`` crops and resizes every image of a batch in one call). Nothing is
re-read or re-decoded per epoch, and no CPUs need to be kept free for decode tasks. ``ray_data`` keeps
the streaming Ray Data reader above (data larger than worker memory).
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

import imagedata as D
from imagedata import DataError

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


def shard_paths(manifest: Mapping, split: str, store) -> tuple[object, list[str]]:
    """(pyarrow filesystem, paths) of a split's shards in ``store``."""
    shards = manifest.get("shards", {})
    if split not in shards:
        raise DataError(f"split {split!r} is not in the manifest (it has {sorted(shards)})")
    if not shards[split]:
        raise DataError(f"split {split!r} has no shards (counts: {manifest.get('counts')}); "
                        "re-run the split with more images per class")
    fs, base = store.pyarrow_fs()
    base = base.rstrip("/")
    return fs, [f"{base}/{s['key']}" if base else s["key"] for s in shards[split]]


def manifest_normalization(manifest: Mapping, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The dataset's mean/std from the manifest (search-train pixels), adapted to ``channels``."""
    norm = manifest.get("normalization") or {}
    return D.normalization(manifest.get("dataset"), channels, norm.get("mean"), norm.get("std"))


@functools.lru_cache(maxsize=8)
def _transform(train: bool, input_size: int, channels: int, mean: tuple, std: tuple):
    make = D.train_transform if train else D.eval_transform
    return make(input_size, channels, mean=mean, std=std)


def decode_and_transform(batch: dict, *, train: bool, input_size: int, channels: int, stored_channels: int,
                         mean: tuple, std: tuple) -> dict:
    """A ``map_batches`` function: PNG bytes -> augmented, normalised float32 NCHW."""
    tf = _transform(train, input_size, channels, tuple(mean), tuple(std))
    images = [tf(D.image_to_tensor(D.decode_image(bytes(raw), stored_channels))) for raw in batch[IMAGE_COLUMN]]
    return {"image": torch.stack(images).numpy(), "label": np.asarray(batch[LABEL_COLUMN], dtype=np.int64)}


def shard_dataset(manifest: Mapping, split: str, store, train: bool, input_size: int,
                  channels: int | None = None, batch_size: int = 256, override_num_blocks: int | None = None):
    """A Ray Data ``Dataset`` of one split (``train`` | ``val`` | ``test``), decoded and transformed.

    ``channels``: what the model wants (defaults to the stored channels); grey data is repeated
    to 3 channels and RGB turned to grey as needed. Augmentation is random per epoch for
    ``train=True``; evaluation transforms are deterministic.
    """
    import ray

    fs, paths = shard_paths(manifest, split, store)
    stored = int(manifest.get("channels", 1))
    channels = channels or stored
    mean, std = manifest_normalization(manifest, channels)
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=[IMAGE_COLUMN, LABEL_COLUMN],
                               override_num_blocks=override_num_blocks)
    return ds.map_batches(decode_and_transform, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs=dict(train=train, input_size=input_size, channels=channels,
                                         stored_channels=stored, mean=tuple(mean), std=tuple(std)))


def train_datasets(manifest: Mapping, store, input_size: int, channels: int | None = None,
                   splits: Sequence[str] = ("train", "val")) -> dict:
    """``{"train": augmented, "val": evaluation-transformed}`` for ``TorchTrainer(datasets=...)``.
    A split named ``train`` is augmented; every other one gets the evaluation transform."""
    return {s: shard_dataset(manifest, s, store, train=(s == "train"), input_size=input_size, channels=channels)
            for s in splits}


def worker_batches(split: str, batch_size: int, *, local_shuffle_buffer_size: int | None = None,
                   drop_last: bool = False, device: torch.device | str | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Inside a Ray Train worker: (images, labels) batches of this worker's shard of ``split``."""
    import ray.train

    shard = ray.train.get_dataset_shard(split)
    if shard is None:
        raise DataError(f"no dataset {split!r} was given to the trainer; pass train_datasets(...) as datasets=")
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, device=device,
                                          local_shuffle_buffer_size=local_shuffle_buffer_size):
        yield batch["image"], batch["label"]


def iter_batches(dataset, batch_size: int, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of a Ray Dataset outside Train (driver-side evaluation, tests)."""
    for batch in dataset.iter_torch_batches(batch_size=batch_size, drop_last=drop_last):
        yield batch["image"], batch["label"]


# --------------------------------------------------------------------------- in-memory worker data
DATA_LOADING_MODES = ("memory", "ray_data")
# Images of unequal sizes are brought to one square side at load time (shorter side resized to
# input_size / EVAL_CROP_FRACTION, centre square) so a worker can hold them as one tensor.
EVAL_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class Stream:
    """One named batch stream of a Train worker: the splits it reads, whether it is augmented
    (training transform) and whether its order is shuffled every epoch."""

    splits: tuple[str, ...]
    augment: bool
    shuffle: bool


@dataclass
class DataSpec:
    """What a Train worker needs to open its data (picklable; goes into the loop config)."""

    mode: str
    manifest: Mapping
    store: Any
    input_size: int
    channels: int
    seed: int = 0
    streams: dict = field(default_factory=dict)   # name -> Stream

    def __post_init__(self) -> None:
        if self.mode not in DATA_LOADING_MODES:
            raise DataError(f"data_loading must be one of {DATA_LOADING_MODES}, got {self.mode!r}")


def stream_seed(seed: int, epoch: int, rank: int, stream: str) -> int:
    """The generator seed of one (run seed, epoch, rank, stream): the same every run and restart."""
    words = [int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(rank) & 0xFFFFFFFF,
             zlib.crc32(stream.encode())]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _decode_rows(raw: Sequence[bytes], stored_channels: int, input_size: int) -> torch.Tensor:
    """PNG/JPEG bytes -> uint8 [N, C, H, W]; unequal sizes are brought to one square side."""
    arrays = [np.asarray(D.decode_image(bytes(b), stored_channels), dtype=np.uint8) for b in raw]
    if not arrays:
        return torch.zeros(0, stored_channels, input_size, input_size, dtype=torch.uint8)
    if len({a.shape for a in arrays}) > 1:
        from PIL import Image

        side = int(round(input_size / EVAL_CROP_FRACTION))
        squared = []
        for a in arrays:
            img = Image.fromarray(a)
            w, h = img.size
            scale = side / min(w, h)
            img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - side) // 2, (h - side) // 2
            squared.append(np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.uint8))
        arrays = squared
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def read_worker_rows(manifest: Mapping, splits: Sequence[str], store, rank: int, world: int
                     ) -> tuple[list[bytes], np.ndarray]:
    """(image bytes, labels) of this worker's rows: rows ``rank::world`` of the splits' shards in
    manifest order, so the ranks' rows are disjoint and together cover every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    tables = []
    for split in splits:
        fs, paths = shard_paths(manifest, split, store)
        tables.extend(pq.read_table(p, columns=[IMAGE_COLUMN, LABEL_COLUMN], filesystem=fs) for p in paths)
    table = pa.concat_tables(tables)
    mine = table.take(pa.array(np.arange(rank, table.num_rows, world)))
    return mine.column(IMAGE_COLUMN).to_pylist(), np.array(mine.column(LABEL_COLUMN).to_numpy(), dtype=np.int64)


def random_resized_boxes(n: int, height: int, width: int, scale: tuple[float, float], gen: torch.Generator,
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """[n, 4] crop boxes (x1, y1, x2, y2, pixel edges) drawn as torchvision's RandomResizedCrop draws
    them (area fraction in ``scale``, log-uniform aspect ``ratio``, ``attempts`` tries, then a
    centre crop clamped to ``ratio``), for a whole batch at once."""
    area = float(height * width)
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = torch.exp(log_ratio)
    u = torch.rand(n, 2, generator=gen)
    # The rest in numpy float32: the same IEEE operations as torch's, a few microseconds each instead of
    # torch's per-op dispatch (a quarter of a batch's augmentation time at batch 32, measured).
    t, a, u = target.numpy(), aspect.numpy(), u.numpy()
    w = np.round(np.sqrt(t * a))
    h = np.round(np.sqrt(t / a))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = ok.any(1)
    first = ok.argmax(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    rows = np.arange(n)
    cw = np.where(found, w[rows, first], np.float32(fw))
    ch = np.where(found, h[rows, first], np.float32(fh))
    top = np.where(found, np.floor(u[:, 0] * (height - ch + 1)), np.float32((height - fh) // 2))
    left = np.where(found, np.floor(u[:, 1] * (width - cw + 1)), np.float32((width - fw) // 2))
    return torch.from_numpy(np.stack([left, top, left + cw, top + ch], axis=1).astype(np.float32))


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Each image's box (x1, y1, x2, y2, pixel edges) resized to ``size`` x ``size`` by bilinear sampling, as
    ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)`` does, and mirrored where ``flip``.

    When no box is larger than the output (as for 28-pixel digits cropped to 32), roi_align takes one
    sample per output pixel: the same as ``grid_sample`` with border clamping at the same points, which
    is 2x faster on a batch of 32 and flips for free by reversing the sample order (same values up to float
    rounding, measured 1e-6). Larger boxes go to roi_align, which averages several samples per pixel.
    """
    n, _, h, w = x.shape
    if bool(((boxes[:, 2] - boxes[:, 0]) > size).any() or ((boxes[:, 3] - boxes[:, 1]) > size).any()):
        from torchvision.ops import roi_align

        rois = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1), boxes], dim=1)
        out = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    steps = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    steps_x = torch.where(flip.unsqueeze(1), 1 - steps, steps)
    # sample points in pixel coordinates (pixel centres at i + 0.5 - 0.5), then grid_sample's [-1, 1]
    px = boxes[:, 0:1] - 0.5 + steps_x * (boxes[:, 2:3] - boxes[:, 0:1])
    py = boxes[:, 1:2] - 0.5 + steps * (boxes[:, 3:4] - boxes[:, 1:2])
    gx, gy = (2 * px + 1) / w - 1, (2 * py + 1) / h - 1
    grid = torch.stack([gx.unsqueeze(1).expand(n, size, size), gy.unsqueeze(2).expand(n, size, size)], dim=-1)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class WorkerSplit:
    """One worker's rows of a stream, held as tensors: uint8 [N, C, H, W] when augmented per epoch,
    else the evaluation-transformed float32 [N, C, size, size] (computed once)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray, *, augment: bool, input_size: int,
                 channels: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] | None = None):
        self.augment = augment
        self.input_size = int(input_size)
        self.to_channels = D.ToChannels(channels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = scale or D._default_scale(input_size)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.int64)
        self.images = images.contiguous() if augment else self._eval_transform(images)

    def __len__(self) -> int:
        return len(self.labels)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return (self.to_channels(x) - self.mean) / self.std

    def _eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to input_size / 0.875, centre crop input_size, normalise (batched)."""
        if len(images) == 0:
            return torch.zeros(0, self.mean.shape[1], self.input_size, self.input_size)
        x = images.float().div_(255)
        h, w = x.shape[-2:]
        short = int(round(self.input_size / EVAL_CROP_FRACTION))
        size = (short, max(1, int(short * w / h))) if h <= w else (max(1, int(short * h / w)), short)
        out = []
        for chunk in x.split(1024):
            r = torch.nn.functional.interpolate(chunk, size=size, mode="bilinear", antialias=True, align_corners=False)
            top = int(round((size[0] - self.input_size) / 2.0))
            left = int(round((size[1] - self.input_size) / 2.0))
            out.append(self._finish(r[..., top:top + self.input_size, left:left + self.input_size].clamp_(0, 1)))
        return torch.cat(out).contiguous()

    def augment_batch(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """RandomResizedCrop + horizontal flip + normalisation of a uint8 batch, on tensors."""
        n, _, h, w = images.shape
        boxes = random_resized_boxes(n, h, w, self.scale, gen)
        flip = torch.rand(n, generator=gen) < 0.5
        return self._finish(crop_resize(images.float().div_(255), boxes, self.input_size, flip))

    def batches(self, batch_size: int, seed: int, *, shuffle: bool, drop_last: bool = False,
                device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in an order (and with augmentation) drawn from a generator seeded by ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        n = len(self)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        end = n - batch_size + 1 if drop_last else n
        for i in range(0, max(end, 0), batch_size):
            idx = order[i:i + batch_size]
            x = self.images[idx]
            x = self.augment_batch(x, gen) if self.augment else x
            y = self.labels[idx]
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y


def load_worker_split(manifest: Mapping, splits: Sequence[str], store, *, rank: int, world: int, augment: bool,
                      input_size: int, channels: int | None = None) -> WorkerSplit:
    """This worker's disjoint rows of ``splits``, read and decoded once (see ``WorkerSplit``)."""
    stored = int(manifest.get("channels", 1))
    channels = channels or stored
    mean, std = manifest_normalization(manifest, channels)
    raw, labels = read_worker_rows(manifest, splits, store, rank, world)
    return WorkerSplit(_decode_rows(raw, stored, input_size), labels, augment=augment, input_size=input_size,
                       channels=channels, mean=mean, std=std)


class WorkerStreams:
    """A Train worker's named batch streams, from memory (``WorkerSplit``) or from Ray Data."""

    def __init__(self, spec: DataSpec, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.splits: dict[str, WorkerSplit] = {}
        if spec.mode == "memory":
            for name, s in spec.streams.items():
                self.splits[name] = load_worker_split(spec.manifest, s.splits, spec.store, rank=rank, world=world,
                                                      augment=s.augment, input_size=spec.input_size,
                                                      channels=spec.channels)

    def rows(self, name: str) -> int | None:
        return len(self.splits[name]) if name in self.splits else None

    def batches(self, name: str, batch_size: int, epoch: int, *, drop_last: bool = False,
                device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.spec.mode == "ray_data":
            return worker_batches(name, batch_size, drop_last=drop_last, device=device)
        stream = self.spec.streams[name]
        return self.splits[name].batches(batch_size, stream_seed(self.spec.seed, epoch, self.rank, name),
                                         shuffle=stream.shuffle, drop_last=drop_last, device=device)


def open_worker_streams(spec: DataSpec, rank: int, world: int) -> WorkerStreams:
    """Inside a Train worker: its streams (memory mode reads and decodes its rows here, once)."""
    return WorkerStreams(spec, rank, world)


def trainer_datasets(spec: DataSpec) -> dict | None:
    """``TorchTrainer(datasets=...)`` for ``ray_data`` mode (one Ray Dataset per stream), else None."""
    if spec.mode != "ray_data":
        return None
    out = {}
    for name, s in spec.streams.items():
        parts = [shard_dataset(spec.manifest, split, spec.store, train=s.augment, input_size=spec.input_size,
                               channels=spec.channels) for split in s.splits]
        out[name] = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return out
