"""The retrain stage: train the derived network from scratch on Ray Train, test it, time it, export it.

``run(RetrainConfig, RetrainInputs(arch, split, split_store, latency_table), ctx) -> RetrainOutput``

- the network is ``densenas.arch.build_model(arch, num_classes)`` from the architecture JSON;
- real DDP (``ray.train.torch.prepare_model``): one bucketed gradient all-reduce per step; BatchNorm
  running statistics averaged across ranks after every epoch (``sync_bn_statistics``), so every rank
  holds the same network (``workers/rank-N.json`` records its sha256 per epoch) and rank 0's
  checkpoint, which the driver tests and exports, carries the synchronised statistics;
- data: the split's search-train + search-val shards (the full training data, both augmented) and
  the held-out test shards, each worker its own disjoint rows (``data_loading: memory``: read and
  decoded once, see ``jobs.data``; ``ray_data``: streamed every epoch); the global batch is split
  over the workers (gloo on CPU, NCCL on GPU);
- recipe (``densenas.retrain.TrainRecipe``): the paper's SGD momentum 0.9, weight decay 4e-5, label
  smoothing 0.1, cosine schedule as defaults (paper: 240 epochs, batch 1024, lr 0.5);
- checkpoints every epoch (Ray Train storage = ``ctx.checkpoint_store``, ``latest.json`` pointer),
  ``FailureConfig(max_failures)``, resume after a dead job -- as the search stage does;
- after the last epoch every rank evaluates its test shard, counts are all-reduced: top-1 / top-5;
- the driver then measures the real latency on the profile device (batch of the latency table, eval,
  ``no_grad``, ``densenas.profiling``'s timing; a Ray task with one GPU for ``cuda``), exports
  TorchScript and ONNX, checks both against the PyTorch outputs, and stores everything.

Outputs (in ``ctx.store``): ``model.pt`` (state dict), ``model.ts``, ``model.onnx``, ``arch.json``,
``retrain_record.jsonl``, ``metrics.json``.
"""
from __future__ import annotations

import io
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from densenas.retrain import TrainRecipe
from jobs.context import StageContext, StageOutput
from jobs.resources import check_resources
from jobs.split import SplitOutput
from jobs.shm_allreduce import SharedMemoryAllReduce, shared_memory_mean_hook
from jobs.train import (META_FILE, TrainJobResources, allreduce_mean, allreduce_sum, broadcast_module,
                        capped_batches, keep_freed_memory, latest_checkpoint, load_checkpoint_file, node_id,
                        numeric_metrics, publish_latest, report_checkpoint, steps_per_worker, tensors_digest,
                        threads_for_cpus, torch_trainer, fit_resuming)
from jobs.epochs import (EpochCurves, describe_retrain, log_curves_from_driver, retrain_epoch_metrics,
                         stage_tracking_or_unrouted)
from jobs.registry import log_retrained_model

__all__ = ["RetrainConfig", "RetrainInputs", "RetrainOutput", "run", "latency_setup", "sync_bn_statistics",
           "weights_digest"]

STATE_FILE = "retrain_state.pt"


class RetrainConfig(TrainJobResources, TrainRecipe):
    """The ``retrain`` section: the training recipe (paper defaults) plus how the Train job runs and
    how the result is measured."""

    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks)")
    measure_latency: bool = Field(True, description="time the trained network on the profile device")
    latency_device: str | None = Field(None, description="'cpu' / 'cuda'; None: the latency table's device, else cpu")
    latency_batch: int | None = Field(None, ge=1, description="None: the latency table's batch, else 1")
    latency_threads: int | None = Field(None, ge=1, description="CPU threads; None: the table's, else 1")
    latency_warmup: int = Field(10, ge=0)
    latency_repeats: int = Field(50, ge=1)
    export: bool = Field(True, description="write TorchScript and ONNX files and check them")
    log_model: bool = Field(True, description="with tracking on: log the trained net as an MLflow model and "
                                              "register a version")
    seed: int = 0


def latency_setup(cfg: RetrainConfig, table: Any = None) -> dict:
    """The measurement protocol of the retrain stage's latency (``densenas.latency_model``): the latency
    table's own when it records one -- so the measured number is comparable with the model's prediction
    -- else the config's. An explicit ``latency_device/batch/threads`` that contradicts the table's
    protocol is refused (``ProtocolMismatchError``) before any training, not silently compared."""
    from densenas.latency_model import MeasurementProtocol, ProtocolMismatchError, table_protocol

    asked = {k: v for k, v in (("device", cfg.latency_device), ("batch", cfg.latency_batch),
                               ("threads", cfg.latency_threads)) if v is not None}
    if table is not None and (getattr(table, "device", None) or {}).get("protocol"):
        proto = table_protocol(table)
        diff = [f"retrain.latency_{k}={v!r} vs the table's {getattr(proto, k)!r}" for k, v in asked.items()
                if v != getattr(proto, k)]
        if diff:
            raise ProtocolMismatchError(f"{'; '.join(diff)}: the measured latency would not be comparable with the "
                                        "latency model's prediction; unset retrain.latency_* to measure under the "
                                        "table's protocol")
        return proto.to_dict()
    device = asked.get("device") or ((getattr(table, "device", None) or {}).get("kind")) or "cpu"
    return MeasurementProtocol(device=device, batch=asked.get("batch") or getattr(table, "batch", None) or 1,
                               threads=(asked.get("threads") or 1) if device == "cpu" else None,
                               warmup=cfg.latency_warmup, repeats=cfg.latency_repeats).to_dict()


# --------------------------------------------------------------------------- DDP helpers
@torch.no_grad()
def sync_bn_statistics(module: torch.nn.Module) -> None:
    """Average every BatchNorm's running mean and variance across the process group (in place).

    The running statistics are exponential averages of the batch statistics, so their mean over
    ranks is the same average of the global batch means (equal per-rank batches); the variance
    misses only the spread of the ranks' batch means. Without a process group: nothing to do."""
    stats = [t for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for t in (m.running_mean, m.running_var) if t is not None]
    allreduce_mean(stats)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of the module's state dict (parameters and buffers, in order): equal on every rank
    that holds the same network."""
    return tensors_digest(t for t in module.state_dict().values())


# --------------------------------------------------------------------------- the worker loop
def _retrain_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from densenas.arch import build_model
    from densenas.retrain import (build_optimizer, build_scheduler, evaluate, load_retrain_state,
                                  retrain_state_dict, state_from_bytes, state_to_bytes, train_epoch)
    from jobs.data import open_worker_streams

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(config["threads"])
    keep_freed_memory()
    streams = open_worker_streams(config["data"], rank, world)
    cfg = RetrainConfig.model_validate(config["cfg"])
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(config["arch"], num_classes=config["num_classes"], dropout=cfg.dropout).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, config["steps"])
    epoch, step, history = 0, 0, []
    data, source = load_checkpoint_file(STATE_FILE, config["ckpt_store"], config["pointer"])
    if data is not None:
        restored = load_retrain_state(state_from_bytes(data, device), model, optimizer, scheduler)
        epoch, step, history = restored["epoch"], restored["step"], restored["history"]
        if rank == 0:
            print(f"[retrain] resumed at epoch {epoch} from {source}", flush=True)
    # DDP (one bucketed gradient all-reduce per step; rank 0's parameters broadcast at wrapping). Each
    # rank keeps its own BatchNorm running statistics while training (no per-step buffer broadcast);
    # they are averaged across ranks after every epoch, before evaluation and the checkpoint.
    ddp = ray.train.torch.prepare_model(model, move_to_device=False,
                                        parallel_strategy_kwargs={"broadcast_buffers": False})
    broadcast_module(model)
    shm = (SharedMemoryAllReduce.for_params(model.parameters(), device, lambda m: print(f"[retrain] {m}", flush=True))
           if cfg.shared_memory_allreduce else None)
    if shm is not None:   # DDP's buckets through /dev/shm, not gloo
        ddp.register_comm_hook(shm, shared_memory_mean_hook)
    curves = EpochCurves(config.get("tracking"), retrain_epoch_metrics, rank, stage="retrain", total=cfg.epochs,
                         start=epoch, describe=describe_retrain)
    curves.catch_up(history)
    weights_sha, epoch_ends = [], []   # epoch_ends: wall-clock end of each epoch (bench/bench_overhead.py)
    while epoch < cfg.epochs:
        batches = capped_batches(streams.batches("train", config["batch"], epoch, drop_last=True, device=device),
                                 config["steps"])
        r = train_epoch(ddp, batches, optimizer, scheduler, cfg, device)
        sync_bn_statistics(model)
        epoch, step = epoch + 1, step + r["steps"]
        weights_sha.append({"epoch": epoch, "weights_sha256": weights_digest(model)})
        epoch_ends.append({"epoch": epoch, "time": time.time(), "train_seconds": r["seconds"],
                           "train_cpu_seconds": r["cpu_seconds"], "train_page_faults": r["page_faults"]})
        stats = allreduce_sum(torch.tensor([r["loss"] * r["n"], r["acc"] * r["n"], r["n"]], dtype=torch.float64))
        record = {"epoch": epoch, "step": step, "lr": r["lr"], "train_loss": float(stats[0] / stats[2]),
                  "train_acc": float(stats[1] / stats[2]), "seconds": r["seconds"],
                  "img_per_s": float(stats[2]) / max(r["seconds"], 1e-9)}
        if epoch == cfg.epochs:  # the held-out test set, once, at the end; every rank its shard
            test = evaluate(model, streams.batches("test", config["batch"], epoch, device=device), device,
                            reduce=allreduce_sum)
            record.update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"], test_n=test["n"])
        history.append(record)
        if rank == 0:
            state = retrain_state_dict(model, optimizer, scheduler, epoch, step, history,
                                       extra={"node_id": node_id(), "world": world})
            dir_name = f"epoch-{epoch:04d}"
            report_checkpoint(numeric_metrics(record), {STATE_FILE: state_to_bytes(state),
                                                        META_FILE: json.dumps({"epoch": epoch}).encode()}, dir_name)
            publish_latest(config["ckpt_store"], config["run_name"], dir_name, epoch, [STATE_FILE, META_FILE])
            curves.log(record)
        else:
            ray.train.report(numeric_metrics(record))
        config["stage_store"].put_json(f"workers/rank-{rank}.json", {"rank": rank, "world": world,
                                                                      "node_id": node_id(), "epoch": epoch,
                                                                      "digests": weights_sha,
                                                                      "epoch_ends": epoch_ends})
    curves.close()


def _measure_in_task(model_bytes: bytes, arch: Any, num_classes: int, protocol: dict) -> dict:
    from densenas.arch import build_model
    from densenas.latency_model import measure_net_latency

    model = build_model(arch, num_classes=num_classes)
    model.load_state_dict(torch.load(io.BytesIO(model_bytes), map_location="cpu"))
    return measure_net_latency(model, protocol)


# --------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class RetrainInputs:
    arch: Any                  # an Arch, its JSON / dict, a path or a preset name
    split: SplitOutput
    split_store: Any           # the store the split's shard keys are relative to
    latency_table: Any = None  # the profile stage's LatencyTable: its protocol times the net, its model predicts it


class RetrainOutput(StageOutput):
    """The trained network (state dict, TorchScript, ONNX, architecture; keys in the retrain store),
    its test accuracy and measured latency."""

    model_key: str
    arch_key: str
    records_key: str
    checkpoint: str
    workers: list[dict[str, Any]]
    measured_latency: dict[str, Any] | None = None
    measured_latency_ms: float | None = None
    predicted_latency_ms: float | None = None
    latency_error_pct: float | None = None
    torchscript_key: str | None = None
    onnx_key: str | None = None
    onnx_exporter: str | None = None
    export_check: dict[str, Any] | None = None
    registered_model: Any = None


def run(cfg: RetrainConfig, inputs: RetrainInputs, ctx: StageContext) -> RetrainOutput:
    """Retrain ``inputs.arch`` on the split's training data as a Ray Train job; test, time and export it."""
    import ray

    from cluster.storage import ray_storage
    from densenas.arch import build_model, load_arch
    from densenas.retrain import check_exports, export_onnx, export_torchscript, state_from_bytes
    from jobs.data import DataSpec, Stream, trainer_datasets

    latency_table, store, ckpt_store, say = inputs.latency_table, ctx.store, ctx.checkpoint_store, ctx.progress
    protocol = latency_setup(cfg, latency_table) if cfg.measure_latency else None  # refuses a mismatch up front
    split = inputs.split
    arch = load_arch(inputs.arch)
    num_classes = split.num_classes
    arch = arch.replace(num_classes=num_classes) if arch.num_classes != num_classes else arch
    counts = split.counts
    rows = int(counts["train"]) + int(counts["val"])
    batch, steps = steps_per_worker(rows, cfg.workers, cfg.batch_size)
    if steps < 1:
        raise ValueError(f"{rows} training images cannot make one batch per worker for {cfg.workers} workers")
    if not split.shards.get("test"):
        raise ValueError("the split has no held-out test shards; set data.test_fraction / test_max_per_class > 0")
    request = cfg.request()
    check_resources(request, reserve=cfg.reserve(), what="retrain stage")
    pointer = latest_checkpoint(ckpt_store)
    if pointer is not None:
        say(f"retrain: resuming from {ckpt_store.uri_for(pointer['dir'])} (epoch {pointer['epoch']})")
    else:
        store.delete_prefix("workers")   # a fresh run: no other run's per-rank records

    size, channels = arch.input_size, arch.in_channels
    data = DataSpec(cfg.data_loading, split.model_dump(mode="json"), inputs.split_store, size, channels, seed=cfg.seed,
                    streams={"train": Stream(("train", "val"), augment=True, shuffle=True),
                             "test": Stream(("test",), augment=False, shuffle=False)})
    run_name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage_path, storage_fs = ray_storage(ckpt_store)
    tracking, unrouted = stage_tracking_or_unrouted(ctx)
    loop_config = {"cfg": cfg.model_dump(mode="json"), "arch": arch.to_dict(), "num_classes": num_classes,
                   "steps": steps, "batch": batch, "threads": threads_for_cpus(cfg.cpus_per_worker),
                   "ckpt_store": ckpt_store, "stage_store": store, "pointer": pointer, "run_name": run_name,
                   "tracking": tracking, "data": data}
    datasets = trainer_datasets(data)

    def trainer(pointer, name):
        return torch_trainer(_retrain_worker, loop_config | {"pointer": pointer, "run_name": name}, request,
                             use_gpu=cfg.use_gpu, run_name=name, storage=(storage_path, storage_fs),
                             max_failures=cfg.max_failures, datasets=datasets,
                             report_poll_s=cfg.report_poll_s)

    say(f"retrain: {arch.one_line()} | {cfg.workers} worker(s) x {request.per_worker()}, {cfg.epochs} epochs, "
        f"{steps} steps/epoch at {batch}/worker, lr {cfg.lr}")
    t0 = time.time()
    fit_resuming(trainer, ckpt_store, run_name, what="retrain", say=say)
    seconds = time.time() - t0

    pointer = latest_checkpoint(ckpt_store)
    state = state_from_bytes(ckpt_store.get_bytes(f"{pointer['dir']}/{STATE_FILE}", verify=False))
    if int(state["epoch"]) != cfg.epochs:
        raise RuntimeError(f"the last retrain checkpoint is at epoch {state['epoch']}, expected {cfg.epochs}")
    model = build_model(arch, num_classes=num_classes)
    model.load_state_dict(state["model"])
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    store.put_bytes("model.pt", buf.getvalue())
    store.put_bytes("arch.json", arch.to_json().encode())
    history = state["history"]
    if unrouted:   # MLflow was down when the stage started: its workers could not log the epochs
        log_curves_from_driver(ctx, history, retrain_epoch_metrics)
    store.put_bytes("retrain_record.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    last = history[-1]
    metrics = {"test_top1": last["test_top1"], "test_top5": last["test_top5"], "test_loss": last["test_loss"],
               "train_loss": last["train_loss"], "train_acc": last["train_acc"], "epochs": float(state["epoch"]),
               "retrain_seconds": round(seconds, 2),
               "train_img_per_s": sum(r["img_per_s"] for r in history) / len(history)}
    workers = sorted((store.get_json(k) for k in store.list("workers") if k.endswith(".json")),
                     key=lambda w: w["rank"])
    out: dict[str, Any] = {"model_key": "model.pt", "arch_key": "arch.json", "records_key": "retrain_record.jsonl",
                           "checkpoint": ckpt_store.uri_for(pointer["dir"]),
                           "node_ids": sorted({w["node_id"] for w in workers}),
                           "workers": [{"rank": w["rank"], "node_id": w["node_id"], "epoch": w["epoch"],
                                        "weights_sha256": (w.get("digests") or [{}])[-1].get("weights_sha256")}
                                       for w in workers]}

    if cfg.measure_latency:
        resources = ({"num_gpus": 1, "num_cpus": 1} if protocol["device"] == "cuda"
                     else {"num_cpus": min(float(protocol["threads"]), ray.cluster_resources().get("CPU", 1.0))})
        say(f"retrain: measuring latency under the {'table' if latency_table is not None else 'config'}'s protocol ("
            + ", ".join(f"{k} {protocol[k]}" for k in ("device", "batch", "threads", "dtype", "memory_format", "timer",
                                                        "statistic")) + ")")
        # scheduling_strategy DEFAULT: not inside a caller's placement group (a Tune trial's holds only
        # its driver's CPUs), so the timing task gets the CPUs the protocol asks for.
        lat = ray.get(ray.remote(**resources, scheduling_strategy="DEFAULT")(_measure_in_task).remote(
            buf.getvalue(), arch.to_dict(), num_classes, protocol), timeout=600)
        out["measured_latency"] = lat
        out["measured_latency_ms"] = metrics["measured_latency_ms"] = lat["value"]
        predicted = (arch.metadata or {}).get("predicted_cost")
        if latency_table is not None:  # the latency model's prediction of this net (as derive's path cost)
            from densenas.latency import LatencyTableError, predict_latency

            try:
                predicted = predict_latency(arch, latency_table)
            except LatencyTableError as e:
                say(f"retrain: the latency table cannot predict this net ({e})")
        if predicted is not None and (latency_table is not None or (arch.metadata or {}).get("cost_units") == "ms"):
            out["predicted_latency_ms"] = metrics["predicted_latency_ms"] = float(predicted)
            out["latency_error_pct"] = metrics["latency_error_pct"] = 100 * (predicted - lat["value"]) / lat["value"]

    if cfg.export:
        example = torch.randn(2, channels, size, size)
        with tempfile.TemporaryDirectory(prefix="densenas-export-") as d:
            ts = export_torchscript(model, example, Path(d) / "model.ts")
            onnx_info = export_onnx(model, example, Path(d) / "model.onnx")
            check = check_exports(model, example, ts, onnx_info["path"])
            store.put_file("model.ts", ts)
            store.put_file("model.onnx", onnx_info["path"])
        out.update(torchscript_key="model.ts", onnx_key="model.onnx", onnx_exporter=onnx_info["exporter"],
                   export_check=check)
        metrics.update(torchscript_max_abs_diff=check["torchscript_max_abs_diff"],
                       onnx_max_abs_diff=check["onnx_max_abs_diff"])
    out["metrics"] = metrics
    if cfg.log_model:
        out["registered_model"] = log_retrained_model(ctx, model, arch, store, metrics,
                                                      torch.randn(2, channels, size, size))
    store.put_json("metrics.json", out)
    say(f"retrain: test top-1 {metrics['test_top1']:.3f} top-5 {metrics['test_top5']:.3f} in {seconds:.1f}s")
    return RetrainOutput.model_validate(out)
