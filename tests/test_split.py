"""The split stage (jobs/split.py) on a real artifact store, and the Ray Data readers (jobs/data.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagedata import DataError, ParquetShardDataset, eval_transform
from jobs.context import StageContext
from jobs.split import MANIFEST_KEY, SplitConfig, verify_shards
from jobs.split import run as split_run


def _split(cfg, store) -> dict:
    """The split stage run alone into ``store``; its manifest."""
    return split_run(cfg, None, StageContext.standalone(store, "split")).model_dump()

# cluster/storage.py is written by another engineer; skip (not fail) until it is in the tree.
open_store = pytest.importorskip("cluster.storage", reason="cluster/storage.py not there yet").open_store

SMALL = dict(classes=3, max_per_class=40, test_max_per_class=10, shard_size=25, executor="local")


def _store(tmp_path, name):
    return open_store(str(tmp_path / name))


def _rows(manifest, store, split):
    fs, base = store.pyarrow_fs()
    return ParquetShardDataset.from_manifest(manifest, split, filesystem=fs, base_path=base)


def make_tree(root: Path, classes=("cat", "dog", "emu"), per_class=12, val_per_class=0, corrupt=()):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in classes if n else ():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(d / f"{c}{i:02d}.png")
    for rel in corrupt:
        (root / rel).write_bytes(b"\xff\xd8\xff this is not a jpeg")
    return root


def test_embedded_split_counts_round_trip_and_reproducibility(tmp_path):
    store = _store(tmp_path, "a")
    m = _split(SplitConfig(seed=5, **SMALL), store)
    assert m["num_classes"] == 3 and m["classes"] == sorted(m["classes"]) and m["channels"] == 1
    assert m["counts"] == {"train": 3 * 32, "val": 3 * 8, "test": 3 * 10}
    for split in ("train", "val", "test"):
        assert sum(m["counts_per_class"][split].values()) == m["counts"][split]
        assert sum(s["rows"] for s in m["shards"][split]) == m["counts"][split]
        ds = _rows(m, store, split)
        assert len(ds) == m["counts"][split] and set(ds.labels.tolist()) == {0, 1, 2}
    assert verify_shards(m, store) == []
    assert store.get_json(MANIFEST_KEY)["shards"] == m["shards"]
    image, label = _rows(m, store, "train")[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    # Same config, another store: byte-identical shards. Another seed: another split.
    again = _split(SplitConfig(seed=5, **SMALL), _store(tmp_path, "b"))
    assert [s["sha256"] for s in again["shards"]["train"]] == [s["sha256"] for s in m["shards"]["train"]]
    other = _split(SplitConfig(seed=6, **SMALL), _store(tmp_path, "c"))
    assert other["classes"] != m["classes"] or (
        [s["sha256"] for s in other["shards"]["train"]] != [s["sha256"] for s in m["shards"]["train"]])


def test_folder_split_skips_corrupt_files_and_uses_val_as_test(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=12, val_per_class=4, corrupt=["train/dog/dog03.png"])
    store = _store(tmp_path, "out")
    m = _split(SplitConfig(source="folder", root=str(root), classes=["emu", "dog"], val_fraction=0.25,
                           shard_size=5, executor="local"), store)
    assert m["classes"] == ["dog", "emu"] and m["channels"] == 3
    assert m["num_skipped"] == 1 and m["skipped"][0]["source_id"] == "train/dog/dog03.png"
    assert "not a jpeg" not in m["skipped"][0]["reason"] and "dog03" in m["skipped"][0]["reason"]
    # 12 per class -> 3 val + 9 train, minus the one corrupt dog wherever it fell; test = ROOT/val.
    assert m["counts"]["train"] + m["counts"]["val"] == 2 * 12 - 1
    assert m["counts_per_class"]["test"] == {"dog": 4, "emu": 4}
    test_ids = {sid for sid in _source_ids(m, store, "test")}
    assert all(s.startswith("val/") for s in test_ids)
    assert len(m["normalization"]["mean"]) == 3
    x, _ = _rows(m, store, "test")[0]
    assert x.shape == (3, 20, 30)


def _source_ids(manifest, store, split):
    import pyarrow.parquet as pq

    fs, base = store.pyarrow_fs()
    out = []
    for s in manifest["shards"][split]:
        out += pq.read_table(f"{base}/{s['key']}", columns=["source_id"], filesystem=fs).column(0).to_pylist()
    return out


def test_folder_class_choice_and_held_out_fraction(tmp_path):
    root = make_tree(tmp_path / "tree", classes=("c3", "c1", "c2", "c0"), per_class=10)
    cfg = dict(source="folder", root=str(root), classes=2, seed=1, test_fraction=0.2, shard_size=100,
               executor="local")
    a = _split(SplitConfig(**cfg), _store(tmp_path, "a"))
    b = _split(SplitConfig(**cfg), _store(tmp_path, "b"))
    assert a["classes"] == b["classes"] and len(a["classes"]) == 2
    assert a["counts"] == {"train": 2 * 6, "val": 2 * 2, "test": 2 * 2}
    assert sorted(_source_ids(a, _store(tmp_path, "a"), "test")) == sorted(_source_ids(b, _store(tmp_path, "b"), "test"))
    assert not set(_source_ids(a, _store(tmp_path, "a"), "test")) & set(_source_ids(a, _store(tmp_path, "a"), "train"))


def test_shards_source_resplits_existing_shards(tmp_path):
    first = _split(SplitConfig(seed=5, **SMALL), _store(tmp_path, "a"))
    src_uri = str(tmp_path / "a")
    m = _split(SplitConfig(source="shards", shards_uri=src_uri, classes=2, val_fraction=0.5, seed=2,
                           shard_size=100, executor="local"), _store(tmp_path, "b"))
    assert set(m["classes"]) <= set(first["classes"]) and len(m["classes"]) == 2
    assert m["counts"]["train"] + m["counts"]["val"] == 2 * 40 and m["counts"]["test"] == 2 * 10
    assert m["dataset"] == first["dataset"] and m["channels"] == 1


@pytest.mark.parametrize("setup, cfg, match", [
    (None, dict(root="missing"), "does not exist"),
    ("empty", dict(), "class 'zzz' is empty"),
    ("small", dict(), "class 'tiny' has 1 images: too few"),
    (None, dict(classes=9), "asked for 9 classes but the dataset has only 3"),
    (None, dict(classes=["cat", "yak"]), "yak"),
])
def test_named_errors(tmp_path, setup, cfg, match):
    root = make_tree(tmp_path / "tree", per_class=5)
    if setup == "empty":
        (root / "train" / "zzz").mkdir()
    if setup == "small":
        make_tree(root, classes=("tiny",), per_class=1)
    cfg = {"source": "folder", "root": str(root), "executor": "local", **cfg}
    if cfg["root"] == "missing":
        cfg["root"] = str(tmp_path / "missing")
    with pytest.raises(DataError, match=match):
        _split(SplitConfig(**cfg), _store(tmp_path, "out"))


def test_no_manifest_when_a_class_loses_all_its_train_images(tmp_path):
    root = make_tree(tmp_path / "tree", classes=("ok", "bad"), per_class=3)
    for i in range(3):
        (root / "train" / "bad" / f"bad{i:02d}.png").write_bytes(b"corrupt")
    store = _store(tmp_path, "out")
    with pytest.raises(DataError, match=r"classes \['bad'\] have no train images"):
        _split(SplitConfig(source="folder", root=str(root), val_fraction=0.34, test_fraction=0.0,
                           executor="local"), store)
    assert not store.exists(MANIFEST_KEY)


def test_config_rejects_unknown_and_inconsistent_fields():
    with pytest.raises(ValueError, match="extra"):
        SplitConfig(sorce="embedded")
    with pytest.raises(ValueError, match="needs root"):
        SplitConfig(source="folder")


# --------------------------------------------------------------------------------------------
# Ray: encoding as tasks that write to the store themselves; Ray Data read of the shards.
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(300)  # ~25 s on a quiet 2-core machine; 130 s seen at load average 40
def test_ray_tasks_encode_and_ray_data_reads(tmp_path, ray_session):
    from jobs.data import iter_batches, shard_dataset

    root = make_tree(tmp_path / "tree", per_class=10, corrupt=["train/cat/cat01.png"])
    store = _store(tmp_path, "out")
    m = _split(SplitConfig(source="folder", root=str(root), classes=3, test_fraction=0.2, shard_size=6,
                           executor="ray"), store)
    assert m["num_skipped"] == 1 and verify_shards(m, store) == []
    assert sum(m["counts"].values()) == 29
    ds = shard_dataset(m, "train", store, train=True, input_size=16, channels=1)
    shapes, labels = [], []
    for x, y in iter_batches(ds, batch_size=8):
        shapes.append(tuple(x.shape))
        labels += y.tolist()
        assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert shapes[0] == (8, 1, 16, 16) and len(labels) == m["counts"]["train"] and set(labels) == {0, 1, 2}
    # The evaluation path is deterministic and matches the single-process reader.
    val = shard_dataset(m, "val", store, train=False, input_size=16, channels=1)
    ray_first = next(iter_batches(val, batch_size=64))[0]
    from jobs.data import manifest_normalization

    mean, std = manifest_normalization(m, 1)
    local = _rows(m, store, "val")
    local.transform = eval_transform(16, 1, mean=mean, std=std)
    ray_sorted = sorted(ray_first.flatten(1).sum(1).tolist())
    local_sorted = sorted(local[i][0].sum().item() for i in range(len(local)))
    assert np.allclose(ray_sorted, local_sorted, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Through the real S3 server (SeaweedFS) when the storage engineer's fixture module exists.
# --------------------------------------------------------------------------------------------

try:
    from tests.fixtures_stack import *  # noqa: F401,F403 -- registers its fixtures in this module
    _HAVE_STACK = True
except ImportError:
    _HAVE_STACK = False

_S3_FIXTURES = ("s3_store", "seaweed_store", "s3_uri", "seaweed_s3_uri")


@pytest.mark.timeout(180)
@pytest.mark.skipif(not _HAVE_STACK, reason="tests/fixtures_stack.py (the S3 server fixture) is not there yet")
def test_shards_round_trip_through_s3(request):
    names = [n for n in _S3_FIXTURES if n in request.fixturenames or n in globals()]
    if not names:
        pytest.skip(f"tests/fixtures_stack.py offers none of {_S3_FIXTURES}")
    store = request.getfixturevalue(names[0])
    if isinstance(store, str):
        store = open_store(store)
    store = store.child("test_split_s3")
    m = _split(SplitConfig(seed=5, **SMALL), store)
    assert verify_shards(m, store) == []
    assert store.get_json(MANIFEST_KEY)["counts"] == m["counts"]
    assert len(_rows(m, store, "val")) == m["counts"]["val"]
