"""Benchmark: how fast the data readers feed images, against an in-memory tensor dataset.

    python bench/bench_data.py [--per-class 300] [--input-size 32] [--no-ray]

Splits the embedded Fashion-MNIST (10 classes, ``--per-class`` images each) into Parquet shards in
a temporary local store, then times one pass over the search-train split with:

* ``TensorImageDataset`` (uint8 tensors in memory -- the upper bound),
* ``ParquetShardDataset`` (same images, PNG-decoded from the shards),
* each with the training augmentation (RandomResizedCrop + flip) and the evaluation transform,
  through a single-process ``DataLoader``,
* and the Ray Data reader (``jobs.data.shard_dataset`` -> ``iter_torch_batches``) on a local Ray
  with 2 CPUs, training augmentation.

Writes docs/benchmarks/data.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.storage import open_store  # noqa: E402
import imagedata as D  # noqa: E402
from jobs.context import StageContext  # noqa: E402
from jobs.split import SplitConfig  # noqa: E402
from jobs.split import run as split_run  # noqa: E402


def _images_per_s(make_iter, n_images: int, repeats: int = 3) -> float:
    """Best of ``repeats`` full passes; ``make_iter()`` gives a fresh iterable per pass."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        seen = 0
        for x, _y in make_iter():
            seen += x.shape[0]
        best = min(best, time.perf_counter() - t0)
        assert seen == n_images, (seen, n_images)
    return n_images / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "data.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    size, bs = a.input_size, a.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(tmp)
        t0 = time.perf_counter()
        m = split_run(SplitConfig(classes=10, max_per_class=a.per_class, val_fraction=0.2, test_max_per_class=10,
                                  shard_size=1000, executor="local"), None, StageContext.standalone(store)).model_dump()
        split_s = time.perf_counter() - t0
        n = m["counts"]["train"]
        print(f"split: {n} train images in {split_s:.1f} s", flush=True)
        fs, base = store.pyarrow_fs()
        mean, std = tuple(m["normalization"]["mean"]), tuple(m["normalization"]["std"])
        shard_ds = D.ParquetShardDataset.from_manifest(m, "train", filesystem=fs, base_path=base)
        # The same images in memory, decoded once.
        images = torch.stack([D.image_to_tensor(D.decode_image(b, 1))[0] for b in shard_ds.images])
        tensor_ds = D.TensorImageDataset(images, shard_ds.labels)
        for name, tf in (("train aug", D.train_transform(size, 1, mean=mean, std=std)),
                         ("eval", D.eval_transform(size, 1, mean=mean, std=std))):
            for label, ds in (("TensorImageDataset (memory)", tensor_ds), ("ParquetShardDataset (PNG shards)", shard_ds)):
                ds.transform = tf
                loader = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=0)
                ips = _images_per_s(lambda: loader, n)
                rows.append((label, name, "1 process", ips))
                print(f"{label:34s} {name:9s} {ips:8.0f} img/s", flush=True)
        if not a.no_ray:
            import ray

            from jobs.data import iter_batches, shard_dataset

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                ds = shard_dataset(m, "train", store, train=True, input_size=size, channels=1)
                ips = _images_per_s(lambda: iter_batches(ds, bs), n)  # the 1st pass also warms up Ray
                rows.append(("Ray Data shard_dataset", "train aug", "local Ray, 2 CPUs", ips))
                print(f"Ray Data: {ips:.0f} img/s", flush=True)
            finally:
                ray.shutdown()

    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = [r[3] for r in rows if r[0].startswith("Tensor") and r[1] == "train aug"][0]
    lines = [
        "## Data readers (bench/bench_data.py)\n",
        f"Machine: {cpu}, {os.cpu_count()} cores (shared with other "
        f"engineers' jobs: consecutive runs differed by up to 3x), torch {torch.__version__}, torch threads 1.",
        f"Command: `python bench/bench_data.py --per-class {a.per_class} --input-size {size}`",
        f"Data: Fashion-MNIST, 10 classes, {n} search-train images (28x28 grey PNG in Parquet shards of 1000 rows, "
        f"local store), output {size}x{size}x1, batch {bs}; best of 3 passes (the first Ray Data pass also starts its workers). Split stage: {split_s:.1f} s "
        "(local executor, including reading the 60k+10k idx files).\n",
        "| reader | transform | where | images/s | vs memory (train aug) |",
        "|---|---|---|---:|---:|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:,.0f} | {r[3] / mem:.2f}x |" for r in rows]
    lines.append("\nRay Data's pass includes its per-epoch start-up (planning, launching read and map tasks), which "
                 "dominates on a few thousand 28 px images; its advantage is streaming from S3 to several Train "
                 "workers, not single-machine speed. For scale: a mobilenet_v2 training step at 32 px consumes "
                 "about 360 img/s on this machine (platform notes).")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
