"""The search stage: DenseNAS super-network search as a Ray Train (DDP) job.

``run(SearchJobConfig, SearchInputs(space, split, split_store, cost_model, warmup_store), ctx) -> SearchOutput``

Each Train worker runs ``densenas.search.Searcher`` unchanged. Data parallelism, DDP semantics:

- every rank builds the super network from the same seed and then takes rank 0's tensors
  (broadcast), so all start identical;
- the global batch ``search.batch_size`` is split evenly over the workers; each worker reads its own
  disjoint rows of the split stage's Parquet shards: by default once, into memory, with batch order
  and augmentation seeded by (seed, epoch, rank, stream) (``data_loading: memory``, see
  ``jobs.data``), or streamed through Ray Data every epoch (``data_loading: ray_data``);
- ``Searcher(grad_sync=...)`` all-reduces (mean) the weight gradients of every weight step and the
  architecture gradients of every architecture step (one flat buffer per step, gloo on CPU, NCCL on
  GPU); the sampled ops of a step come from a generator seeded by (seed, epoch, step), identical on
  every rank without communication; every rank takes the same number of steps (capped from the
  manifest's counts). So every rank holds identical weights, alpha and beta after every step, and
  every rank derives the same architecture.

Checkpoints: once per epoch rank 0 reports the full ``Searcher.state_dict()`` as a Ray Train
checkpoint (``checkpoint_dir_name=epoch-NNNN``) into ``ctx.checkpoint_store`` (Ray Train's
``storage_path`` is that store: S3 or a local directory), then publishes ``latest.json`` (a pointer:
run name, directory, epoch) there. ``FailureConfig(max_failures)``: a worker that dies mid-epoch
makes Ray Train restart the group, and the loop resumes from ``ray.train.get_checkpoint()``. When
the whole job died, the next ``run`` on the same checkpoint store reads ``latest.json`` and continues
from it (a new Train run).

Warm-up cache: the weights-only warm-up does not depend on lambda / tau / the cost model, so its
end state is published to ``inputs.warmup_store`` (``warmup_state.pt`` then ``_complete.json`` last); a
later search with only lambda/tau changed starts from it instead of re-training the warm-up.
``warm_up(cfg, inputs, ctx)`` trains only that part (the sweep's shared warm-up).

Metrics: every epoch's record goes to ``ray.train.report`` (numbers only) and, from rank 0, to the
stage's MLflow run through ``jobs.epochs.EpochCurves`` (cluster.tracking; step = epoch, each once).

Outputs (in ``ctx.store``): ``search_state.pt`` (final state), ``search_record.jsonl`` (per-epoch
records), ``derived.json`` / ``arch.json`` (the derived network), ``arch_params.json`` (alpha and
beta as lists, with op names and edges, for the derive stage), ``workers/rank-N.json`` (per-rank
node id and alpha/beta digest).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from densenas.search import SearchConfig
from jobs.context import CACHE_COMPLETE, StageContext, StageOutput, resolve_space
from jobs.console import verbose
from jobs.epochs import (EVOLUTION, EpochCurves, describe_search, finish_search_pictures, save_arch_snapshot,
                         search_epoch_metrics, stage_tracking_or_unrouted, log_curves_from_driver)
from jobs.resources import check_resources
from jobs.split import SplitOutput
from jobs.train import (META_FILE, TrainJobResources, broadcast_module, capped_batches, gradient_mean,
                        keep_freed_memory, latest_checkpoint, load_checkpoint_file, node_id, numeric_metrics,
                        publish_latest, report_checkpoint, steps_per_worker, tensors_digest, threads_for_cpus,
                        torch_trainer, fit_resuming)

__all__ = [
    "SearchJobConfig",
    "SearchInputs",
    "SearchOutput",
    "FailureInjection",
    "run",
    "warm_up",
]

STATE_FILE = "search_state.pt"
WARMUP_STATE = "warmup_state.pt"
PLACEMENTS = "placements"   # stage store folder: one JSON per worker (re)start


class SearchJobConfig(TrainJobResources, SearchConfig):
    """The ``search`` section: densenas' ``SearchConfig`` (schedule, optimizers, lambda, tau, cost)
    and how the Ray Train job runs (``TrainJobResources``), one flat model as written in YAML."""


class FailureInjection(BaseModel):
    """Fault drill (tests, chaos checks): worker ``rank`` calls ``os._exit(1)`` before weight step
    ``step`` of epoch ``epoch`` -- once: ``marker`` (a file path every worker can see) is created first
    and, when it exists, nothing happens."""

    model_config = ConfigDict(extra="forbid")
    rank: int = 1
    epoch: int = 1
    step: int = 0
    marker: str


# --------------------------------------------------------------------------- the worker loop
def _search_worker(config: dict) -> None:
    """Ray Train loop of one rank (runs in a worker process)."""
    import ray.train
    import ray.train.torch

    from densenas.search import Searcher
    from densenas.supernet import SuperNet
    from jobs.data import open_worker_streams

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(config["threads"])
    keep_freed_memory()
    streams = open_worker_streams(config["data"], rank, world)
    job = SearchJobConfig.model_validate(config["job"])
    search = job
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.manual_seed(search.seed)
    net = SuperNet(config["space"], num_classes=config["num_classes"])
    log = (lambda m: print(f"[search rank 0] {m}", flush=True)) if rank == 0 and verbose() else None
    grad_sync = gradient_mean(list(net.parameters()), job.shared_memory_allreduce, device,
                              log=lambda m: print(f"[search] {m}", flush=True))
    searcher = Searcher(net, search, config["cost_model"], steps_per_epoch=config["steps"], device=device,
                        grad_sync=grad_sync, log=log)
    ckpt_store, stage_store, warm_store = config["ckpt_store"], config["stage_store"], config["warmup_store"]
    data, source = load_checkpoint_file(STATE_FILE, ckpt_store, config["pointer"])
    if data is None and config["warmup_ready"]:
        data, source = warm_store.get_bytes(WARMUP_STATE), f"warm-up cache {warm_store.uri_for(WARMUP_STATE)}"
    if data is not None:
        searcher.load_state_dict(torch.load(io.BytesIO(data), map_location=device, weights_only=False))
        if rank == 0:
            print(f"[search] resumed at epoch {searcher.epoch} from {source}", flush=True)
    broadcast_module(net)
    # One record per (re)start of this rank: where it ran and from which epoch. The per-rank file
    # below is overwritten by each attempt; these keep the history (e.g. a worker group restarted on
    # the remaining nodes after a node was lost).
    stage_store.put_json(f"{PLACEMENTS}/{time.time_ns()}-rank-{rank}.json", {
        "rank": rank, "world": world, "node_id": node_id(), "start_epoch": searcher.epoch, "time": time.time()})
    fail = FailureInjection.model_validate(config["fail"]) if config.get("fail") else None
    curves = EpochCurves(config.get("tracking"), search_epoch_metrics, rank, stage="search", total=search.epochs,
                         start=searcher.epoch, describe=describe_search)
    curves.catch_up(searcher.history)

    def on_step(step: int) -> None:
        if fail and rank == fail.rank and searcher.epoch == fail.epoch and step == fail.step:
            if not os.path.exists(fail.marker):
                Path(fail.marker).write_text(f"rank {rank} exited at epoch {fail.epoch} step {step}\n")
                print(f"[search rank {rank}] failure drill: exiting at epoch {fail.epoch} step {step}", flush=True)
                os._exit(1)

    digests, epoch_ends = [], []   # epoch_ends: wall-clock end of each epoch (bench/bench_overhead.py)
    while searcher.epoch < config["until_epoch"]:
        train = capped_batches(streams.batches("train", config["batch"], searcher.epoch, drop_last=True,
                                               device=device), config["steps"], on_step)
        val = capped_batches(streams.batches("val", config["val_batch"], searcher.epoch, drop_last=True,
                                             device=device), config["val_steps"])
        record = searcher.run_epoch(train, val)
        epoch = searcher.epoch
        arch = [p.detach().cpu() for p in searcher.arch_params]
        digests.append({"epoch": epoch, "arch_sha256": tensors_digest(arch)})
        epoch_ends.append({"epoch": epoch, "time": time.time()})
        stage_store.put_json(f"workers/rank-{rank}.json", {
            "rank": rank, "world": world, "node_id": node_id(), "epoch": epoch, "digests": digests,
            "epoch_ends": epoch_ends,
            "alphas": [a.detach().cpu().tolist() for a in searcher.alphas],
            "betas": [b.detach().cpu().tolist() for b in searcher.betas]})
        metrics = numeric_metrics(record)
        if rank == 0:
            if warm_store is not None and epoch == search.warmup_epochs and not warm_store.exists(CACHE_COMPLETE):
                buf = io.BytesIO()
                torch.save(searcher.state_dict(), buf)
                warm_store.put_bytes(WARMUP_STATE, buf.getvalue())
                warm_store.publish_json(CACHE_COMPLETE, {"epoch": epoch, "time": time.time(),
                                                         "steps_per_epoch": config["steps"]})
                print(f"[search] published the warm-up state (epoch {epoch}) to {warm_store.uri_for('')}", flush=True)
            buf = io.BytesIO()
            torch.save(searcher.state_dict(), buf)
            dir_name = f"epoch-{epoch:04d}"
            report_checkpoint(metrics, {STATE_FILE: buf.getvalue(),
                                         META_FILE: json.dumps({"epoch": epoch}).encode()}, dir_name)
            publish_latest(ckpt_store, config["run_name"], dir_name, epoch, [STATE_FILE, META_FILE])
            save_arch_snapshot(stage_store, record, net)
            curves.log(record)
        else:
            ray.train.report(metrics)
    curves.close()


# --------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class SearchInputs:
    space: Any                               # a SearchSpace, or anything resolve_space takes
    split: SplitOutput
    split_store: Any                         # the store the split's shard keys are relative to
    cost_model: Any                          # LatencyTable / MacsCostModel (jobs.profile.resolve_cost_model)
    warmup_store: Any = None                 # the shared warm-up cache entry; None: no cache
    drill: FailureInjection | None = None    # fault drill (tests)


class SearchOutput(StageOutput):
    """The searched state, its per-epoch records, the derived network and alpha/beta (keys in the
    search's store), the last checkpoint and where each rank ran."""

    state_key: str
    records_key: str
    derived_key: str
    arch_key: str | None
    arch_params_key: str
    derived: dict[str, Any]
    epochs: int
    checkpoint: str
    placements: list[dict[str, Any]]
    workers: list[dict[str, Any]]


def run(cfg: SearchJobConfig, inputs: SearchInputs, ctx: StageContext) -> SearchOutput:
    """Run the search as a Ray Train job (Ray must be initialised): outputs in ``ctx.store``,
    checkpoints and the ``latest.json`` pointer in ``ctx.checkpoint_store``."""
    space, num_classes, steps, unrouted, seconds = _fit(cfg, inputs, ctx, cfg.epochs)
    out = _finish(cfg, space, inputs.cost_model, num_classes, steps, ctx.checkpoint_store, ctx.store, seconds, ctx)
    if unrouted:   # MLflow was down when the stage started: its workers could not log the epochs
        log_curves_from_driver(ctx, [json.loads(line) for line in ctx.store.get_bytes("search_record.jsonl").decode()
                                     .splitlines() if line.strip()], search_epoch_metrics)
    return out


def warm_up(cfg: SearchJobConfig, inputs: SearchInputs, ctx: StageContext) -> Any:
    """Train only the weights-only warm-up, the first ``warmup_epochs`` epochs of ``run`` (same net,
    data order and cosine schedule), and publish it to ``inputs.warmup_store``, which a later ``run``
    with any lambda / tau starts from. A warm-up there of this job's shape is reused as is; one of
    another shape (another worker count, e.g. the search stage's) is kept for its owner and this one
    goes beside it, in ``workers-<n>``. Returns the store that holds it."""
    store = inputs.warmup_store
    if store is None or cfg.warmup_epochs == 0:
        raise ValueError("warm_up needs inputs.warmup_store and search.warmup_epochs > 0")
    steps = _steps(cfg, inputs.split)[1]
    if store.exists(CACHE_COMPLETE) and not _warmup_fits(store, steps, cfg.warmup_epochs):
        store = store.child(f"workers-{cfg.workers}")
    if _warmup_fits(store, steps, cfg.warmup_epochs):
        ctx.progress(f"warm-up: reusing the cached warm-up at {store.uri_for('')}")
        return store
    _fit(cfg, dataclasses.replace(inputs, warmup_store=store), ctx, cfg.warmup_epochs)
    if not _warmup_fits(store, steps, cfg.warmup_epochs):
        raise RuntimeError(f"the warm-up finished but published nothing to {store.uri_for('')}; see the worker logs")
    return store


def _steps(job: SearchJobConfig, split: SplitOutput) -> tuple[int, int]:
    """(batch per worker, weight steps per epoch) of this job on this split."""
    return steps_per_worker(int(split.counts["train"]), job.workers, job.batch_size)


def _warmup_fits(store: Any, steps: int, warmup_epochs: int) -> bool:
    """A complete warm-up in ``store`` made with these steps per epoch and warm-up epochs."""
    if store is None or not store.exists(CACHE_COMPLETE):
        return False
    info = store.get_json(CACHE_COMPLETE)
    return int(info.get("steps_per_epoch", steps)) == steps and int(info.get("epoch", -1)) == warmup_epochs


def _fit(job: SearchJobConfig, inputs: SearchInputs, ctx: StageContext, until_epoch: int
         ) -> tuple[Any, int, int, bool, float]:
    """The search's Train job, run (or resumed) up to ``until_epoch``: (space, classes, steps per epoch,
    whether MLflow was unrouted at the start, seconds)."""
    from cluster.storage import ray_storage
    from jobs.data import DataSpec, Stream, trainer_datasets

    search, store, say = job, ctx.store, ctx.progress
    space, split, cost_model = resolve_space(inputs.space), inputs.split, inputs.cost_model
    ckpt_store, warm_store = ctx.checkpoint_store, inputs.warmup_store
    counts = split.counts
    num_classes = split.num_classes
    batch, steps = _steps(job, split)
    val_batch, val_steps = steps_per_worker(int(counts["val"]), job.workers,
                                            search.arch_batch_size or search.batch_size)
    if steps < 1 or val_steps < 1:
        raise ValueError(f"the split has {counts['train']} search-train / {counts['val']} search-val images: "
                         f"not one batch per worker for {job.workers} workers; lower workers or add data")
    request = job.request()
    check_resources(request, reserve=job.reserve(), what="search stage")

    pointer = latest_checkpoint(ckpt_store)
    warm_ready = search.warmup_epochs > 0 and _warmup_fits(warm_store, steps, search.warmup_epochs)
    if search.warmup_epochs > 0 and not warm_ready and warm_store is not None and warm_store.exists(CACHE_COMPLETE):
        info = warm_store.get_json(CACHE_COMPLETE)
        say(f"search: warm-up cache at {warm_store.uri_for('')} was made with steps_per_epoch="
            f"{info.get('steps_per_epoch')}, epoch {info.get('epoch')}; this search needs {steps}, "
            f"{search.warmup_epochs}: not reused")
    if pointer is not None:
        say(f"search: resuming from {ckpt_store.uri_for(pointer['dir'])} (epoch {pointer['epoch']})")
    else:
        store.delete_prefix(PLACEMENTS)   # a fresh search: earlier runs' placements are not its history
        store.delete_prefix(EVOLUTION)
        if warm_ready:
            say(f"search: starting from the cached warm-up ({search.warmup_epochs} epochs) at "
                f"{warm_store.uri_for('')}")

    run_name = f"search-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage_path, storage_fs = ray_storage(ckpt_store)
    tracking, unrouted = stage_tracking_or_unrouted(ctx)
    loop_config = {
        "job": job.dump(), "space": space.to_dict(), "num_classes": num_classes, "cost_model": cost_model,
        "steps": steps, "batch": batch, "val_steps": val_steps, "val_batch": val_batch, "until_epoch": until_epoch,
        "threads": threads_for_cpus(job.cpus_per_worker), "ckpt_store": ckpt_store, "stage_store": store,
        "warmup_store": warm_store if search.warmup_epochs > 0 else None, "warmup_ready": warm_ready,
        "pointer": pointer, "run_name": run_name, "tracking": tracking,
        "fail": inputs.drill.model_dump() if inputs.drill is not None else None,
        "data": DataSpec(job.data_loading, split.model_dump(mode="json"), inputs.split_store, space.input_size,
                         space.in_channels, seed=search.seed,
                         streams={"train": Stream(("train",), augment=True, shuffle=True),
                                  "val": Stream(("val",), augment=False, shuffle=True)}),
    }
    datasets = trainer_datasets(loop_config["data"])

    def trainer(pointer, name):
        return torch_trainer(_search_worker, loop_config | {"pointer": pointer, "run_name": name}, request,
                             use_gpu=job.use_gpu, run_name=name, storage=(storage_path, storage_fs),
                             max_failures=job.max_failures, datasets=datasets,
                             report_poll_s=job.report_poll_s)

    what = "search" if until_epoch == search.epochs else f"search warm-up (epochs 1-{until_epoch})"
    say(f"{what}: {job.workers} worker(s) x {request.per_worker()}, {search.epochs} epochs "
        f"({search.warmup_epochs} warm-up), {steps} weight steps/epoch at {batch}/worker, "
        f"{search.arch_steps_per_epoch or val_steps} arch steps/epoch; checkpoints in {ckpt_store.uri_for(run_name)}")
    t0 = time.time()
    fit_resuming(trainer, ckpt_store, run_name, what="search", say=say)
    return space, num_classes, steps, unrouted, time.time() - t0


def _finish(job: SearchJobConfig, space, cost_model, num_classes: int, steps: int, ckpt_store, store,
            seconds: float, ctx: StageContext) -> SearchOutput:
    """Load the last checkpoint on the driver, derive, write the stage's outputs."""
    from densenas.search import Searcher
    from densenas.supernet import SuperNet

    pointer = latest_checkpoint(ckpt_store)
    if pointer is None:
        raise RuntimeError(f"the search finished without a checkpoint in {ckpt_store.uri_for('')}; see the worker logs")
    state_bytes = ckpt_store.get_bytes(f"{pointer['dir']}/{STATE_FILE}", verify=False)
    searcher = Searcher(SuperNet(space, num_classes=num_classes), job, cost_model, steps_per_epoch=steps,
                        device="cpu", log=None)
    searcher.load_state_dict(torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=False))
    if searcher.epoch != job.epochs:
        raise RuntimeError(f"the last checkpoint is at epoch {searcher.epoch}, expected {job.epochs}")
    d = searcher.derive()
    store.put_bytes(STATE_FILE, state_bytes)
    store.put_bytes("search_record.jsonl", "".join(json.dumps(r) + "\n" for r in searcher.history).encode())
    derived = d.to_dict() | {"space_hash": space.space_hash(), "num_classes": num_classes}
    store.put_json("derived.json", derived)
    if d.arch is not None:
        store.put_bytes("arch.json", d.arch.to_json().encode())
    net = searcher.net
    store.put_json("arch_params.json", {
        "space_hash": space.space_hash(),
        "alphas": [{"kind": m.kind, "block": m.block, "edge": list(m.edge) if m.kind == "head" else None,
                    "op_names": list(m.op_names), "alpha": m.alpha.detach().tolist()} for m in net.mixed_ops],
        "betas": [b.detach().tolist() for b in net.betas],
        "edge_probs": {f"{i}-{j}": float(p.detach()) for (i, j), p in net.edge_probs().items()},
        "target_latency": job.target_latency, "target_tolerance": job.target_tolerance,
    })
    ranks = sorted(k for k in store.list("workers") if k.endswith(".json"))
    workers = [store.get_json(k) for k in ranks]
    placements = sorted((store.get_json(k) for k in store.list(PLACEMENTS) if k.endswith(".json")),
                        key=lambda r: (r["time"], r["rank"]))
    last = searcher.history[-1] if searcher.history else {}
    metrics = {k: v for k, v in numeric_metrics(last).items()
               if k in ("val_acc", "train_acc", "val_loss", "train_loss", "expected_latency", "predicted_latency",
                        "alpha_entropy", "beta_entropy", "derived_path_prob", "lambda", "arch_steps", "macs",
                        "params")}
    metrics.update(epochs=float(searcher.epoch), search_seconds=round(seconds, 2))
    finish_search_pictures(store, ctx)
    ctx.progress(f"search: done in {seconds:.1f}s; derived path {d.path}: {d.official}")
    return SearchOutput(
        state_key=STATE_FILE, records_key="search_record.jsonl", derived_key="derived.json",
        arch_key="arch.json" if d.arch is not None else None, arch_params_key="arch_params.json",
        derived=derived, metrics=metrics, epochs=searcher.epoch,
        checkpoint=ckpt_store.uri_for(pointer["dir"]),
        node_ids=sorted({w["node_id"] for w in workers} | {r["node_id"] for r in placements}),
        placements=[{k: r[k] for k in ("rank", "world", "node_id", "start_epoch")} for r in placements],
        workers=[{"rank": w["rank"], "node_id": w["node_id"], "epoch": w["epoch"],
                  "arch_sha256": w["digests"][-1]["arch_sha256"] if w["digests"] else None} for w in workers],
    )
