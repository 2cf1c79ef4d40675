"""In-memory worker data (jobs.data, ``data_loading: memory``): each rank reads its own disjoint rows
once, batch order and augmentation are reproducible from (seed, epoch, rank, stream), the batched
transforms agree with the per-image torchvision ones. No Ray."""
import numpy as np
import pytest
import torch

from cluster.storage import open_store
import imagedata as D
from jobs import data as J
from jobs.context import StageContext
from jobs.split import SplitConfig
from jobs.split import run as split_run


def _split(cfg, store) -> dict:
    """The split stage run alone into ``store``; its manifest."""
    return split_run(cfg, None, StageContext.standalone(store, "split")).model_dump()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("split")))
    manifest = _split(SplitConfig(classes=4, max_per_class=40, test_max_per_class=10, val_fraction=0.25,
                                  shard_size=50, seed=1, executor="local"), store)
    return manifest, store


def test_ranks_read_disjoint_rows_that_cover_the_split(split):
    manifest, store = split
    rows = [J.read_worker_rows(manifest, ["train", "val"], store, r, 3) for r in range(3)]
    every, _ = J.read_worker_rows(manifest, ["train", "val"], store, 0, 1)
    assert sum(len(r[0]) for r in rows) == len(every) == manifest["counts"]["train"] + manifest["counts"]["val"]
    assert sorted(b for r in rows for b in r[0]) == sorted(every)
    assert not set(rows[0][0]) & set(rows[1][0])
    with pytest.raises(ValueError, match="rank 2"):
        J.read_worker_rows(manifest, ["train"], store, 2, 2)


def test_eval_stream_matches_torchvision_eval_transform(split):
    manifest, store = split
    ws = J.load_worker_split(manifest, ["val"], store, rank=0, world=2, augment=False, input_size=16, channels=1)
    raw, labels = J.read_worker_rows(manifest, ["val"], store, 0, 2)
    mean, std = J.manifest_normalization(manifest, 1)
    tf = D.eval_transform(16, 1, mean=mean, std=std)
    ref = torch.stack([tf(D.image_to_tensor(D.decode_image(b, 1))) for b in raw])
    # torchvision resizes uint8 (rounding to whole grey levels); the batched path stays in float
    assert ws.images.shape == ref.shape and (ws.images - ref).abs().max() < 2.5 / 255 / min(std)
    assert torch.equal(ws.labels, torch.as_tensor(labels))
    x, y = next(ws.batches(8, seed=0, shuffle=False))
    assert torch.equal(x, ws.images[:8]) and torch.equal(y, ws.labels[:8])


def test_training_batches_are_reproducible_per_epoch_rank_and_stream(split):
    manifest, store = split
    ws = J.load_worker_split(manifest, ["train"], store, rank=1, world=2, augment=True, input_size=16, channels=3)

    def epoch(e, rank=1, stream="train"):
        return list(ws.batches(16, J.stream_seed(7, e, rank, stream), shuffle=True, drop_last=True))

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert len(a) == len(ws) // 16 and a[0][0].shape == (16, 3, 16, 16) and a[0][0].dtype == torch.float32
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert len({J.stream_seed(7, 1, 1, "train"), J.stream_seed(7, 1, 0, "train"), J.stream_seed(7, 1, 1, "val"),
                J.stream_seed(8, 1, 1, "train")}) == 4
    # every row once per epoch (drop_last keeps whole batches)
    seen = torch.cat([y for _, y in epoch(3)])
    assert len(seen) == 16 * (len(ws) // 16)


def test_batched_augmentation_has_torchvision_statistics(split):
    manifest, store = split
    mean, std = J.manifest_normalization(manifest, 1)
    ws = J.load_worker_split(manifest, ["train"], store, rank=0, world=1, augment=True, input_size=16, channels=1)
    raw, _ = J.read_worker_rows(manifest, ["train"], store, 0, 1)
    torch.manual_seed(0)
    tf = D.train_transform(16, 1, mean=mean, std=std)
    ref = torch.stack([tf(D.image_to_tensor(D.decode_image(b, 1))) for b in raw for _ in range(4)])
    ours = torch.cat([x for e in range(4) for x, _ in ws.batches(40, J.stream_seed(0, e, 0, "t"), shuffle=True)])
    assert abs(float(ours.mean() - ref.mean())) < 0.1 and abs(float(ours.std() - ref.std())) < 0.1


def test_crop_boxes_stay_inside_and_follow_the_scale_range():
    gen = torch.Generator().manual_seed(0)
    boxes = J.random_resized_boxes(2000, 28, 28, (0.35, 1.0), gen)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 28).all() and (boxes[:, 3] <= 28).all()
    area = w * h / 28 / 28
    assert area.min() > 0.3 and area.max() <= 1.0 and 0.55 < float(area.mean()) < 0.75
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.45


@pytest.mark.parametrize("size", [32, 16])
def test_crop_resize_is_roi_align_then_flip(size):
    """The grid_sample path (no box larger than the output) and the roi_align path (some larger) both give
    torchvision's roi_align(aligned=True, sampling_ratio=-1) with the flipped images mirrored."""
    from torchvision.ops import roi_align

    gen = torch.Generator().manual_seed(3)
    x = torch.rand(12, 2, 28, 28, generator=gen)
    boxes = J.random_resized_boxes(12, 28, 28, (0.35, 1.0), gen)
    flip = torch.rand(12, generator=gen) < 0.5
    assert flip.any() and not flip.all()
    rois = torch.cat([torch.arange(12, dtype=torch.float32).unsqueeze(1), boxes], dim=1)
    ref = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    ref = torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref)
    got = J.crop_resize(x, boxes, size, flip)
    assert got.shape == (12, 2, size, size)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_images_of_unequal_sizes_are_brought_to_one_square():
    rng = np.random.default_rng(0)
    raw = [D.encode_png(rng.integers(0, 255, (h, w), dtype=np.uint8)) for h, w in ((20, 30), (40, 25), (32, 32))]
    x = J._decode_rows(raw, 1, 16)
    assert x.shape == (3, 1, 18, 18) and x.dtype == torch.uint8


def test_bad_mode_is_a_named_error(split):
    manifest, store = split
    with pytest.raises(D.DataError, match="data_loading"):
        J.DataSpec("disk", manifest, store, 16, 1)
