"""Retraining a derived network: the recipe pieces, accuracy above chance on Fashion-MNIST, top-1/top-5,
TorchScript + ONNX exports that agree with PyTorch, checkpoint state round trip; and (Ray) the stage."""
import io

import numpy as np
import pytest
import torch

import imagedata as D
from densenas.arch import build_model
from densenas.derive import derive
from densenas.retrain import (TrainRecipe, build_optimizer, build_scheduler, check_exports, evaluate, export_onnx,
                              export_torchscript, load_retrain_state, measure_latency, retrain_state_dict,
                              state_from_bytes, state_to_bytes, topk_correct, train_epoch)
from densenas.supernet import SuperNet

CLASSES = 4


def _arch():
    torch.manual_seed(0)
    return derive(SuperNet("micro_mbconv", num_classes=CLASSES)).arch


def _data(n_per_class, split="train"):
    ds = D.load_embedded("fashion_mnist")
    images, labels = (ds.train_images, ds.train_labels) if split == "train" else (ds.test_images, ds.test_labels)
    idx = np.concatenate([np.flatnonzero(labels == c)[:n_per_class] for c in range(CLASSES)])
    x = torch.from_numpy(images[idx]).float().unsqueeze(1) / 255.0
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", antialias=True)
    return (x - 0.3) / 0.35, torch.from_numpy(labels[idx]).long()


def _batches(x, y, bs, seed):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + bs]], y[order[i:i + bs]]) for i in range(0, len(y) - bs + 1, bs)]


def test_recipe_defaults_are_the_papers():
    r = TrainRecipe()
    assert (r.epochs, r.batch_size, r.lr, r.momentum, r.weight_decay, r.label_smoothing) == (240, 1024, 0.5, 0.9, 4e-5, 0.1)
    with pytest.raises(ValueError, match="lr_min"):
        TrainRecipe(lr=0.1, lr_min=0.2)


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), (1, 5)) == {1: 1, 5: 3}
    assert topk_correct(logits, torch.tensor([1, 0, 1]), (1, 2)) == {1: 2, 2: 3}


def test_short_retrain_beats_chance_and_exports_agree(tmp_path):
    torch.manual_seed(0)
    x, y = _data(150)
    tx, ty = _data(50, "test")
    recipe = TrainRecipe(epochs=4, batch_size=32, lr=0.1)
    model = build_model(_arch(), num_classes=CLASSES)
    opt = build_optimizer(model, recipe)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[1]["params"]  # BN/bias: no decay
    steps = len(y) // recipe.batch_size
    sched = build_scheduler(opt, recipe, steps)
    for epoch in range(recipe.epochs):
        r = train_epoch(model, _batches(x, y, recipe.batch_size, epoch), opt, sched, recipe)
        assert r["steps"] == steps
    assert opt.param_groups[0]["lr"] < 0.01  # cosine reached (near) its floor
    result = evaluate(model, _batches(tx, ty, 50, 0))
    assert result["n"] == len(ty) and result["top1"] > 0.5 and result["top5"] == 1.0  # 4 classes: top-5 is all

    example = tx[:3]
    ts = export_torchscript(model, example, tmp_path / "m.ts")
    info = export_onnx(model, example, tmp_path / "m.onnx")
    check = check_exports(model, example, ts, info["path"])
    assert check["torchscript_max_abs_diff"] < 1e-4 and check["onnx_max_abs_diff"] < 1e-3, check
    lat = measure_latency(model, (1, 1, 16, 16), warmup=2, repeats=5, threads=1)
    assert lat["median"] > 0 and lat["units"] == "ms" and lat["device"]["kind"] == "cpu"

    # Checkpoint state round trip: a fresh model + optimizer continue where the first stopped.
    state = state_from_bytes(state_to_bytes(retrain_state_dict(model, opt, sched, 4, 4 * steps, [{"epoch": 4}])))
    model2 = build_model(_arch(), num_classes=CLASSES)
    opt2 = build_optimizer(model2, recipe)
    sched2 = build_scheduler(opt2, recipe, steps)
    restored = load_retrain_state(state, model2, opt2, sched2)
    assert restored["epoch"] == 4 and sched2.last_epoch == sched.last_epoch
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retrain_stage_on_ray_train_one_and_two_ddp_workers(tmp_path):
    """The stage with 1 worker, then real DDP with 2 on the same data: both ranks hold the same
    weights (BatchNorm statistics included) after every epoch, and the test accuracy is within noise
    of the 1-worker run."""
    ray = pytest.importorskip("ray")
    from cluster.storage import open_store
    from jobs.retrain import RetrainConfig
    from jobs.split import SplitConfig
    from tests.standalone import run_retrain, run_split

    split_store = open_store(str(tmp_path / "split"))
    manifest = run_split(SplitConfig(classes=CLASSES, max_per_class=100, test_max_per_class=50, val_fraction=0.2,
                                     shard_size=1000, seed=1, executor="local"), split_store)
    ray.init(num_cpus=2, include_dashboard=False)
    outs, stores = {}, {}
    try:
        for workers in (1, 2):
            stores[workers] = store = open_store(str(tmp_path / f"retrain-{workers}"))
            cfg = RetrainConfig(epochs=3, batch_size=32, lr=0.1, workers=workers, cpus_per_worker=1,
                                latency_repeats=5, latency_warmup=2, export=workers == 2,
                                measure_latency=workers == 2)
            outs[workers] = run_retrain(cfg, _arch().to_json(), manifest, split_store, store)
    finally:
        ray.shutdown()
    one, two = outs[1]["metrics"], outs[2]["metrics"]
    assert one["epochs"] == two["epochs"] == 3 and one["test_top1"] > 0.5 and two["test_top1"] > 0.5, (one, two)
    # 200 test images: the standard error of a difference of two accuracies near 0.8 is about 0.04
    assert abs(one["test_top1"] - two["test_top1"]) <= 0.12, (one["test_top1"], two["test_top1"])
    r0, r1 = (stores[2].get_json(f"workers/rank-{r}.json") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and [d["epoch"] for d in r0["digests"]] == [1, 2, 3]
    assert r0["digests"] == r1["digests"], "the ranks' weights differ"
    assert [w["weights_sha256"] for w in outs[2]["workers"]] == [r0["digests"][-1]["weights_sha256"]] * 2
    # the exported network is rank 0's, with the synchronised statistics
    from jobs.retrain import weights_digest
    model = build_model(_arch(), num_classes=CLASSES)
    model.load_state_dict(torch.load(io.BytesIO(stores[2].get_bytes("model.pt"))))
    assert weights_digest(model) == r0["digests"][-1]["weights_sha256"]
    assert two["torchscript_max_abs_diff"] < 1e-4 and two["onnx_max_abs_diff"] < 1e-3
    assert outs[2]["measured_latency_ms"] > 0 and outs[2]["node_ids"]
    for key in ("model.pt", "model.ts", "model.onnx", "arch.json", "retrain_record.jsonl", "metrics.json"):
        assert stores[2].exists(key), key


def test_bn_statistics_sync_without_a_process_group_is_a_no_op():
    from jobs.retrain import sync_bn_statistics, weights_digest

    model = build_model(_arch(), num_classes=CLASSES)
    model.train()
    model(torch.randn(8, 1, 16, 16))
    before = weights_digest(model)
    sync_bn_statistics(model)
    assert weights_digest(model) == before


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_latency_on_cuda_uses_cuda_events():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = build_model(_arch(), num_classes=CLASSES)
    lat = measure_latency(model, (8, 1, 16, 16), device="cuda", warmup=5, repeats=20)
    assert lat["device"]["kind"] == "cuda" and lat["device"]["name"] and 0 < lat["median"] < 100


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_search_on_nccl_gpu_worker(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ray = pytest.importorskip("ray")
    from cluster.storage import open_store
    from jobs.search import SearchJobConfig
    from jobs.split import SplitConfig
    from tests.standalone import run_search, run_split

    split_store = open_store(str(tmp_path / "split"))
    manifest = run_split(SplitConfig(classes=CLASSES, max_per_class=60, test_max_per_class=10, executor="local"),
                         split_store)
    ray.init(include_dashboard=False)
    try:
        workers = min(2, torch.cuda.device_count())
        job = SearchJobConfig.model_validate({"workers": workers, "cpus_per_worker": 1, "use_gpu": True,
                                              "max_failures": 0, "epochs": 2, "warmup_epochs": 1, "batch_size": 16})
        store = open_store(str(tmp_path / "search"))
        out = run_search(job, "micro_mbconv", manifest, split_store, store)
    finally:
        ray.shutdown()
    assert out["epochs"] == 2 and len({w["arch_sha256"] for w in out["workers"]}) == 1
