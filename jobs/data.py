"""Ray Data readers for the split stage's shards: store -> decode + augmentation -> Train workers.

    datasets = train_datasets(manifest, store, input_size=32, channels=3)
    trainer = TorchTrainer(loop, datasets=datasets, ...)      # Ray splits them across workers

    # inside the training loop, on each worker:
    for images, labels in worker_batches("train", batch_size=64):
        ...

``shard_dataset`` streams the manifest's Parquet shards with ``ray.data.read_parquet`` through the
store's pyarrow filesystem (S3 or local), decodes the PNG bytes and applies the paper's
augmentation (``densenas.data.train_transform``: RandomResizedCrop + flip; ``eval_transform``:
resize + centre crop) in ``map_batches``, producing ``{"image": float32 [B, C, H, W], "label":
int64 [B]}``. Each Train worker reads only its own shard via ``ray.train.get_dataset_shard``.
"""
from __future__ import annotations

import functools
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from densenas import data as D
from densenas.data import DataError

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
