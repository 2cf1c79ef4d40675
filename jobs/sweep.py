"""The sweep stage: Ray Tune over the latency trade-off (lambda, tau) of DenseNAS, sharing one warm-up.

    run(SweepConfig(...), SweepInputs(space, split, split_store, search, cost_model, ...), ctx) -> SweepOutput

How it runs (all on Ray):

1. **Warm-up, once.** The weights-only warm-up does not depend on lambda / tau, so the driver trains
   it once (a Ray Train job of the same shape as every trial's search: same workers, batch and
   steps per epoch, same seed, the search's full cosine schedule) and publishes it to the warm-up
   cache (``warmup_state.pt``, then ``_complete.json``) in exactly the format ``jobs.search`` reads.
   An existing complete cache entry (the pipeline's ``ctx.caches["warmup"]``, shared with the search
   stage) is reused as is.
2. **Trials.** ``Tuner`` runs a *function trainable* (``tune.with_resources(fn, {"cpu": 0.01})``: the
   trial driver only waits) per grid / random point. A trial:
   a. runs the search stage, ``jobs.search.run`` (a ``TorchTrainer``), with this
      trial's lambda / tau, starting from the warm-up cache (so only the search epochs are trained);
   b. derives the network (``jobs.derive.derive_to_store``: Viterbi path + argmax ops), once per
      latency budget when ``latency_budgets`` is set (plus the unbudgeted one);
   c. evaluates every derived network in a second ``TorchTrainer``: a short retrain from scratch
      (``evaluation: retrain``) or the super network restricted to the derived path
      (``evaluation: supernet``), then times the built network (measured latency, batch 1,
      one thread); the worker's reports reach Tune through ``TuneReportCallback``.
   Each trial writes ``trials/<key>/result.json`` last; a trial restarted after it finished only
   re-reports it. Resources per trial and ``max_concurrent`` come from the config and are checked
   against the cluster first (an impossible request fails at once instead of waiting forever).
3. **Output.** The Pareto front over every derived network (accuracy max, measured latency min,
   ``densenas.pareto``): ``trials.csv`` / ``trials.parquet`` (every candidate, ``pareto`` flag),
   ``pareto.csv`` / ``pareto.parquet`` (the front), ``pareto.png`` (every trial, front highlighted,
   points labelled lambda/tau) and ``pareto_archs/<key>.json`` (the architecture of each front
   network), in the store and as artifacts of the MLflow parent run.

MLflow: a parent run for the sweep (nested under the pipeline's stage run when there is one) and a
nested run per trial (params lambda / tau / budget, the trial's metrics). The experiment is created
by the driver (a trial cannot create it). Tracking problems are printed, never fatal.

Resume: with ``ctx.resume`` (the pipeline's ``--resume``) it calls
``Tuner.restore(path, trainable=..., resume_unfinished=True, resume_errored=True)``: finished trials
are not run again; an interrupted trial's search continues from its own latest checkpoint.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from densenas.pareto import non_dominated_mask
from densenas.search import SearchConfig
from jobs.context import CACHE_COMPLETE, StageContext, StageOutput, resolve_space
from jobs.split import SplitOutput
from jobs.train import numeric_metrics

__all__ = ["SweepConfig", "SweepInputs", "SweepOutput", "TrialFailureDrill", "SweepError", "run", "sweep_points",
           "trial_key",
           "measure_latency_ms"]

TRIAL_RESULT = "result.json"
WARMUP_STATE = "warmup_state.pt"     # the names jobs.search reads
EXPERIMENT = "sweep"
CPU = torch.device("cpu")


class SweepError(RuntimeError):
    """The sweep cannot run or did not finish; the message says what to do."""


class TrialFailureDrill(BaseModel):
    """Fault drill (tests): the trial with this index raises once, as it starts
    (``marker``, a path every process sees, is created first; when it exists nothing happens)."""

    model_config = ConfigDict(extra="forbid")
    index: int = Field(1, ge=0)
    marker: str


class SweepConfig(BaseModel):
    """The ``sweep`` section."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="run the sweep stage in a full pipeline run")
    mode: Literal["grid", "random"] = Field("grid", description="grid: lambdas x taus; random: num_samples draws")
    lambdas: list[float] = Field(default_factory=lambda: [0.05, 0.15, 0.5], description="grid values of lambda")
    taus: list[float] = Field(default_factory=lambda: [15.0], description="grid values of tau (> 1)")
    num_samples: int = Field(4, ge=1, description="random mode: how many (lambda, tau) points")
    lambda_range: tuple[float, float] = Field((0.01, 1.0), description="random mode: log-uniform lambda range")
    tau_range: tuple[float, float] = Field((5.0, 30.0), description="random mode: uniform tau range")
    latency_budgets: list[float] = Field(default_factory=list,
                                         description="also derive the best path within each budget (cost units)")
    evaluation: Literal["retrain", "supernet"] = Field("retrain", description="retrain the derived net briefly, "
                                                       "or evaluate the super network on the derived path")
    retrain_epochs: int = Field(3, ge=0, description="retrain epochs (0 means evaluation: supernet)")
    retrain_batch_size: int = Field(64, ge=1)
    retrain_lr: float = Field(0.05, gt=0)
    recipe: dict[str, Any] = Field(default_factory=dict, description="further densenas.retrain.TrainRecipe fields "
                                   "of the evaluation's retrain (as the retrain section; default: its defaults)")
    accuracy_split: Literal["test", "val"] = Field("test", description="where accuracy is measured")
    search_epochs: int | None = Field(None, ge=1, description="override search.epochs for the trials")
    max_concurrent: int = Field(1, ge=1, description="trials at once")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers of each trial's search / evaluation")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per Train worker (fractions let trials share cores)")
    trial_driver_cpus: float = Field(0.01, gt=0, description="CPUs of the trial function itself (it only waits)")
    data_cpus: float = Field(1.0, ge=0, description="CPUs kept free for Ray Data's decode tasks")
    max_failures: int = Field(0, ge=0, description="Tune retries of a failed trial")
    latency_repeats: int = Field(30, ge=3, description="timed forward passes per measured latency")
    seed: int = 0
    fail_trial: TrialFailureDrill | None = None

    @model_validator(mode="after")
    def _ranges(self) -> "SweepConfig":
        if any(v < 0 for v in self.lambdas):
            raise ValueError(f"lambdas must be >= 0, got {self.lambdas}")
        if any(v <= 1 for v in self.taus):
            raise ValueError(f"taus must be > 1 (tau is the base of the latency log), got {self.taus}")
        if self.mode == "grid" and (not self.lambdas or not self.taus):
            raise ValueError("grid mode needs at least one lambda and one tau")
        lo, hi = self.lambda_range
        if not 0 < lo <= hi:
            raise ValueError(f"lambda_range must be 0 < low <= high (log-uniform), got {self.lambda_range}")
        lo, hi = self.tau_range
        if not 1 < lo <= hi:
            raise ValueError(f"tau_range must be 1 < low <= high, got {self.tau_range}")
        if any(b <= 0 for b in self.latency_budgets):
            raise ValueError(f"latency_budgets must be > 0, got {self.latency_budgets}")
        return self

    def train_recipe(self) -> Any:
        """The evaluation's ``densenas.retrain.TrainRecipe``: the retrain stage's recipe (label smoothing,
        no decay on BN/bias, cosine per step, ...) with the sweep's epochs, batch and lr."""
        from densenas.retrain import TrainRecipe

        return TrainRecipe.model_validate({**self.recipe, "epochs": max(1, self.retrain_epochs),
                                           "batch_size": self.retrain_batch_size, "lr": self.retrain_lr})

    @property
    def evaluation_mode(self) -> str:
        return "supernet" if self.evaluation == "supernet" or self.retrain_epochs == 0 else "retrain"


# --------------------------------------------------------------------------- points
def trial_key(lam: float, tau: float) -> str:
    """A store-safe, stable name of a (lambda, tau) point: ``l0.15_t15``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"l{lam:.6g}_t{tau:.6g}")


def sweep_points(cfg: SweepConfig) -> list[dict]:
    """The trials' (lambda, tau) points, in a stable order, each with its index and key."""
    if cfg.mode == "grid":
        pts = [(float(l), float(t)) for l in cfg.lambdas for t in cfg.taus]
    else:
        rng = random.Random(cfg.seed)
        (l0, l1), (t0, t1) = cfg.lambda_range, cfg.tau_range
        pts = [(round(math.exp(rng.uniform(math.log(l0), math.log(l1))), 6), round(rng.uniform(t0, t1), 4))
               for _ in range(cfg.num_samples)]
    seen, out = set(), []
    for lam, tau in pts:
        key = trial_key(lam, tau)
        if key in seen:
            continue
        seen.add(key)
        out.append({"index": len(out), "key": key, "lambda": lam, "tau": tau})
    return out


def _budget_key(budget: float | None) -> str:
    return "free" if budget is None else re.sub(r"[^A-Za-z0-9_.-]", "_", f"b{budget:.6g}")


# --------------------------------------------------------------------------- latency
@torch.no_grad()
def measure_latency_ms(model: torch.nn.Module, input_size: int, in_channels: int, repeats: int = 30,
                       warmup: int = 5) -> float:
    """Median wall time (ms) of one inference forward at batch 1 (``densenas.profiling.time_module``,
    eval mode, no autograd) with the current thread settings."""
    import statistics

    from densenas.profiling import time_module

    return float(statistics.median(time_module(model, torch.randn(1, in_channels, input_size, input_size), "cpu",
                                               warmup, repeats)))


# --------------------------------------------------------------------------- Ray Train loops
def _warmup_worker(config: dict) -> None:
    """The weights-only warm-up as jobs.search trains it (same seed, net, schedule, data order), stopped
    at ``warmup_epochs`` and published to the warm-up cache by rank 0."""
    import ray.train
    import ray.train.torch

    from densenas.search import SearchConfig, Searcher
    from densenas.supernet import SuperNet
    from jobs.data import worker_batches
    from jobs.train import allreduce_mean, broadcast_module, capped_batches

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(config["threads"])
    search = SearchConfig.model_validate(config["search"])
    torch.manual_seed(search.seed)
    net = SuperNet(config["space"], num_classes=config["num_classes"])
    log = (lambda m: print(f"[sweep warm-up] {m}", flush=True)) if rank == 0 else None
    searcher = Searcher(net, search, config["cost_model"], steps_per_epoch=config["steps"], device="cpu",
                        grad_sync=allreduce_mean if world > 1 else None, log=log)
    broadcast_module(net)
    while searcher.epoch < search.warmup_epochs:
        searcher.run_epoch(
            capped_batches(worker_batches("train", config["batch"], drop_last=True, device=CPU), config["steps"]),
            capped_batches(worker_batches("val", config["val_batch"], drop_last=True, device=CPU), config["val_steps"]))
    metrics = {"epoch": float(searcher.epoch)}
    last = searcher.history[-1] if searcher.history else {}
    metrics.update({k: float(v) for k, v in last.items() if k in ("train_acc", "val_acc", "train_loss")
                    and isinstance(v, (int, float))})
    if rank == 0:
        buf = io.BytesIO()
        torch.save(searcher.state_dict(), buf)
        warm = config["warmup_store"]
        warm.put_bytes(WARMUP_STATE, buf.getvalue())
        warm.publish_json(CACHE_COMPLETE, {"epoch": searcher.epoch, "time": time.time(),
                                           "steps_per_epoch": config["steps"], "made_by": "sweep"})
    ray.train.report(metrics)


def _evaluate_worker(config: dict) -> None:
    """Accuracy of one derived network (short retrain, or the super network on the derived path),
    then its measured latency; one ``ray.train.report`` per epoch (Tune sees them via the callback)."""
    import ray.train

    from densenas.arch import Arch, build_model
    from jobs.data import worker_batches

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    arch = Arch.from_dict(config["arch"])
    split, static = config["accuracy_split"], dict(config["static"])

    def accuracy(forward) -> float:
        correct = total = 0
        with torch.no_grad():
            for x, y in worker_batches(split, config["batch"], device=CPU):
                correct += int((forward(x).argmax(1) == y).sum())
                total += int(y.numel())
        return correct / max(total, 1)

    if config["mode"] == "retrain":
        # The retrain stage's recipe and code (densenas.retrain), so a sweep accuracy and a retrain
        # accuracy of the same network and epochs mean the same thing.
        from densenas.retrain import TrainRecipe, build_optimizer, build_scheduler, train_epoch
        from jobs.train import capped_batches

        recipe = TrainRecipe.model_validate(config["recipe"])
        model = build_model(arch, num_classes=config["num_classes"], dropout=recipe.dropout)
        opt = build_optimizer(model, recipe)
        sched = build_scheduler(opt, recipe, config["steps"])
        epochs = recipe.epochs
        for epoch in range(epochs):
            r = train_epoch(model, capped_batches(worker_batches("train", recipe.batch_size, drop_last=True,
                                                                 device=CPU), config["steps"]),
                            opt, sched, recipe)
            acc = accuracy(model.eval())
            metrics = {**static, "epoch": epoch + 1, "train_loss": r["loss"], "accuracy": acc}
            if epoch == epochs - 1:
                metrics["measured_latency_ms"] = _latency(arch, config)
                config["result_store"].put_json("metrics.json", metrics)   # before the report: the trial reads it
            ray.train.report(metrics)
        return
    # Super-network evaluation: the searched weights, one op per layer (argmax), the path's edges only.
    from densenas.supernet import SuperNet

    state = torch.load(io.BytesIO(config["supernet_state"]), map_location="cpu", weights_only=False)
    net = SuperNet(config["space"], num_classes=config["num_classes"])
    net.load_state_dict(state["supernet"])
    path = list(config["path"])
    nxt = dict(zip(path, path[1:] + [net.space.end_node]))
    with torch.no_grad():
        for i, beta in enumerate(net.betas):
            if i in nxt:
                dsts = [j for (_, j, _) in net.space.out_edges(i)]
                beta.fill_(-1e4)
                beta[dsts.index(nxt[i])] = 0.0
    choices = [(c,) for c in config["op_choice"]]
    net.train()   # the super network keeps no useful BN running statistics: batch statistics, as in search
    acc = accuracy(lambda x: net(x, choices, arch_grad=False))
    metrics = {**static, "epoch": 0, "accuracy": acc, "measured_latency_ms": _latency(arch, config)}
    config["result_store"].put_json("metrics.json", metrics)
    ray.train.report(metrics)


def _latency(arch: Any, config: dict) -> float:
    from densenas.arch import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(arch, num_classes=config["num_classes"])
        return measure_latency_ms(model, arch.input_size, arch.in_channels, config["latency_repeats"])
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the trial
def _sweep_trial(config: dict, shared: dict) -> None:
    """One Tune trial: search from the warm-up -> derive (per budget) -> evaluate -> result.json."""
    from ray import tune

    point = config["point"]
    cfg = SweepConfig.model_validate(shared["sweep"])
    work = shared["work_store"].child(f"trials/{point['key']}")
    work.put_json(f"starts/{time.time():.3f}-{uuid.uuid4().hex[:6]}.json", {"pid": os.getpid(), "time": time.time()})
    tracker = _TrialTracker(shared.get("mlflow"), point)
    if work.exists(TRIAL_RESULT):              # finished before an interruption: report, do not recompute
        result = work.get_json(TRIAL_RESULT)
        for row in result["candidates"]:
            tune.report(numeric_metrics(row))
        return
    try:
        result = _run_trial(cfg, point, shared, work)
    except BaseException as e:
        tracker.end("FAILED", error=f"{type(e).__name__}: {e}")
        raise
    tracker.log(result)
    tracker.end("FINISHED")
    work.publish_json(TRIAL_RESULT, result)     # last: its presence means the trial is complete


def _run_trial(cfg: SweepConfig, point: dict, shared: dict, work: Any) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.storage import ray_storage
    from jobs.data import train_datasets
    from jobs.derive import DeriveConfig, derive_to_store, supernet_from_search_outputs
    from jobs.context import StageContext
    from jobs.search import SearchInputs, SearchJobConfig, run as run_search
    from jobs.train import steps_per_worker
    from jobs.split import SplitOutput

    space, cost_model = shared["space"], shared["cost_model"]
    drill = cfg.fail_trial
    if drill is not None and drill.index == point["index"] and not os.path.exists(drill.marker):
        Path(drill.marker).write_text(f"trial {point['key']} failed on purpose\n")
        raise SweepError(f"failure drill: trial {point['key']} (index {point['index']}) stops before its search")
    job = SearchJobConfig.model_validate({**shared["search"], "lambda": point["lambda"], "tau": point["tau"],
                                          **_train_job_fields(cfg)})
    t0 = time.time()
    search_store = work.child("search")
    out = run_search(job, SearchInputs(space, SplitOutput.model_validate(shared["split_manifest"]),
                                       shared["split_store"], cost_model, shared["warmup_store"]),
                     StageContext.standalone(search_store, "search"))
    search_s = time.time() - t0

    state_bytes = search_store.get_bytes(out.state_key)
    net = supernet_from_search_outputs(space, state_bytes)
    candidates = []
    mode = cfg.evaluation_mode
    datasets = train_datasets(shared["split_manifest"], shared["split_store"], input_size=space.input_size,
                              channels=space.in_channels,
                              splits=(("train", cfg.accuracy_split) if mode == "retrain" else (cfg.accuracy_split,)))
    for budget in [None, *cfg.latency_budgets]:
        bkey = _budget_key(budget)
        dstore = work.child(f"derive/{bkey}")
        try:
            d = derive_to_store(DeriveConfig(k_best=3, latency_budget=budget, diagram=False), net, cost_model, dstore)
        except ValueError as e:   # no path within this budget: recorded, not fatal for the trial
            candidates.append({"trial": point["key"], "lambda": point["lambda"], "tau": point["tau"],
                               "budget": budget, "error": str(e)})
            continue
        static = {"lambda": point["lambda"], "tau": point["tau"], "budget": budget if budget is not None else -1.0,
                  "predicted_latency": d["predicted_latency"], "params": d["params"], "macs": d["macs"],
                  "path_prob": d["path_prob"], "search_val_acc": out.metrics.get("val_acc")}
        static = {k: float(v) for k, v in static.items() if isinstance(v, (int, float))}
        loop = {"mode": mode, "arch": d["arch"], "num_classes": net.num_classes, "space": space.to_dict(),
                "path": d["path"], "op_choice": d["op_choice"], "recipe": cfg.train_recipe().model_dump(mode="json"),
                "batch": cfg.retrain_batch_size, "threads": max(1, int(cfg.cpus_per_worker)),
                "steps": max(1, steps_per_worker(int(shared["split_manifest"]["counts"]["train"]), 1,
                                                 cfg.retrain_batch_size)[1]),
                "seed": cfg.seed, "accuracy_split": cfg.accuracy_split, "latency_repeats": cfg.latency_repeats,
                "static": static, "supernet_state": state_bytes if mode == "supernet" else None}
        eval_store = work.child(f"eval/{bkey}")
        eval_store.delete("metrics.json")
        loop["result_store"] = eval_store
        storage_path, storage_fs = ray_storage(eval_store)
        name = f"eval-{uuid.uuid4().hex[:6]}"
        trainer = TorchTrainer(
            _evaluate_worker, train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 callbacks=[TuneReportCallback()]),
            datasets=datasets)
        t1 = time.time()
        res = trainer.fit()
        if getattr(res, "error", None) is not None:
            raise SweepError(f"evaluation of trial {point['key']} ({bkey}) failed: {res.error}") from res.error
        if not eval_store.exists("metrics.json"):
            raise SweepError(f"evaluation of trial {point['key']} ({bkey}) finished without metrics.json in "
                             f"{eval_store.uri_for('')}; see the worker log")
        m = eval_store.get_json("metrics.json")   # Train V2's Result.metrics can be empty without a checkpoint
        candidates.append({
            "trial": point["key"], "index": point["index"], "lambda": point["lambda"], "tau": point["tau"],
            "budget": budget, "candidate": f"{point['key']}/{bkey}", "evaluation": mode,
            "accuracy": m.get("accuracy"), "measured_latency_ms": m.get("measured_latency_ms"),
            "predicted_latency": d["predicted_latency"], "latency_units": d["latency_units"],
            "params": d["params"], "macs": d["macs"], "path": d["path"], "path_prob": d["path_prob"],
            "one_line": d["one_line"], "official": d["official"], "arch": d["arch"],
            "search_val_acc": static.get("search_val_acc"), "eval_seconds": round(time.time() - t1, 2)})
    return {"trial": point["key"], "index": point["index"], "lambda": point["lambda"], "tau": point["tau"],
            "search_seconds": round(search_s, 2), "search_metrics": out.metrics,
            "candidates": candidates}


def _train_job_fields(cfg: SweepConfig) -> dict:
    return {"workers": cfg.workers_per_trial, "cpus_per_worker": cfg.cpus_per_worker, "use_gpu": False,
            "max_failures": 1, "data_cpus": cfg.data_cpus}


# --------------------------------------------------------------------------- MLflow
class _TrialTracker:
    """A nested MLflow run per trial, through cluster.tracking (spool, secret filter). Never raises."""

    def __init__(self, info: Mapping[str, Any] | None, point: Mapping[str, Any]):
        self.tracker = self.run = None
        if not info:
            return
        from cluster.tracking import TAG_STAGE, TAG_TRIAL, Tracker

        self.tracker = Tracker(info["uri"], info.get("experiment") or "densenas-sweep",
                               experiment_id=info.get("experiment_id"))
        self.run = self.tracker.start_run(f"trial-{point['key']}", parent=info["parent_run_id"],
                                          tags={TAG_STAGE: "sweep-trial", TAG_TRIAL: point["key"]})
        self.run.log_params({"lambda": point["lambda"], "tau": point["tau"]})

    def log(self, result: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        for step, row in enumerate(result["candidates"]):
            self.run.log_metrics({k: row[k] for k in ("accuracy", "measured_latency_ms", "predicted_latency", "params",
                                                      "macs", "path_prob")
                                  if isinstance(row.get(k), (int, float)) and math.isfinite(float(row[k]))}, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "trial_result.json")
            path.write_text(json.dumps(result, indent=1, default=str))
            self.run.log_artifact(path)

    def end(self, status: str, error: str | None = None) -> None:
        if self.run is None:
            return
        if error:
            self.run.set_tags({"error": error[:500]})
        self.run.end(status)
        self.tracker.close()


def _open_parent_run(tracking_uri: str | None, experiment: str, work_store: Any, parent_of: str | None,
                     cfg: SweepConfig, say) -> dict | None:
    """The sweep's parent run (cluster.tracking), or the one of an interrupted sweep on resume."""
    if not tracking_uri:
        return None
    from cluster.tracking import TAG_STAGE, Tracker, flatten_config

    tracker = Tracker(tracking_uri, experiment)
    if work_store.exists("mlflow_parent.json"):
        info = work_store.get_json("mlflow_parent.json")
        if info.get("uri") == tracking_uri:
            tracker.reopen(info["parent_run_id"], "sweep")
            tracker.close()
            return info
    run = tracker.start_run("sweep", parent=parent_of, tags={TAG_STAGE: "sweep"})
    run.log_params(flatten_config(cfg.model_dump(mode="json", exclude={"fail_trial"})))
    tracker.close()
    if run.run_id is None:   # created in the spool only: trials would have nothing to nest under
        say("tracking: MLflow unavailable for the sweep; its runs are spooled, trials are not tracked")
        return None
    info = {"uri": tracking_uri, "experiment": experiment, "experiment_id": tracker.experiment_id,
            "parent_run_id": run.run_id}
    work_store.put_json("mlflow_parent.json", info)
    return info


# --------------------------------------------------------------------------- warm-up
def _ensure_warmup(search: Any, cfg: SweepConfig, space: Any, manifest: Mapping, split_store: Any, cost_model: Any,
                   warm_store: Any, say) -> Any:
    """Train the shared warm-up once (skipped when a complete cache entry fits the trials); returns the
    store holding it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.storage import ray_storage
    from jobs.data import train_datasets
    from jobs.train import steps_per_worker

    counts = manifest["counts"]
    batch, steps = steps_per_worker(int(counts["train"]), cfg.workers_per_trial, search.batch_size)
    val_batch, val_steps = steps_per_worker(int(counts["val"]), cfg.workers_per_trial, search.batch_size)
    if steps < 1 or val_steps < 1:
        raise SweepError(f"the split has {counts['train']} search-train / {counts['val']} search-val images: not one "
                         f"batch of {search.batch_size} per worker; lower search.batch_size or add data")
    if search.warmup_epochs == 0:
        return warm_store
    if _warmup_fits(warm_store, steps, search.warmup_epochs):
        say(f"warm-up: reusing the cached warm-up at {warm_store.uri_for('')}")
        return warm_store
    if warm_store.exists(CACHE_COMPLETE):
        # The entry was made with another worker count (e.g. by the search stage): keep it for its owner
        # and keep ours beside it, keyed by the trials' shape.
        warm_store = warm_store.child(f"sweep-workers-{cfg.workers_per_trial}")
        if _warmup_fits(warm_store, steps, search.warmup_epochs):
            say(f"warm-up: reusing the cached warm-up at {warm_store.uri_for('')}")
            return warm_store
    storage_path, storage_fs = ray_storage(warm_store.child("_train"))
    loop = {"search": search.dump(), "space": space.to_dict(), "num_classes": int(manifest["num_classes"]),
            "cost_model": cost_model, "steps": steps, "batch": batch, "val_steps": val_steps, "val_batch": val_batch,
            "threads": max(1, int(cfg.cpus_per_worker)), "warmup_store": warm_store}
    say(f"warm-up: {search.warmup_epochs} weights-only epochs once for every trial ({cfg.workers_per_trial} "
        f"worker(s), {steps} steps/epoch)")
    trainer = TorchTrainer(
        _warmup_worker, train_loop_config=loop, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers_per_trial,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"warmup-{uuid.uuid4().hex[:6]}", storage_path=storage_path,
                             storage_filesystem=storage_fs),
        datasets=train_datasets(manifest, split_store, input_size=space.input_size, channels=space.in_channels))
    t0 = time.time()
    res = trainer.fit()
    if getattr(res, "error", None) is not None:
        raise SweepError(f"the sweep's warm-up failed: {res.error}") from res.error
    if not warm_store.exists(CACHE_COMPLETE):
        raise SweepError(f"the warm-up finished but published nothing to {warm_store.uri_for('')}")
    say(f"warm-up: done in {time.time() - t0:.1f}s")
    return warm_store


def _warmup_fits(warm_store: Any, steps: int, warmup_epochs: int) -> bool:
    if not warm_store.exists(CACHE_COMPLETE):
        return False
    info = warm_store.get_json(CACHE_COMPLETE)
    return int(info.get("steps_per_epoch", -1)) == steps and int(info.get("epoch", -1)) == warmup_epochs


# --------------------------------------------------------------------------- outputs
def _rows(work_store: Any, points: Sequence[dict]) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    for p in points:
        key = f"trials/{p['key']}/{TRIAL_RESULT}"
        if not work_store.exists(key):
            missing.append(p["key"])
            continue
        rows += work_store.get_json(key)["candidates"]
    return rows, missing


def _write_outputs(rows: list[dict], store: Any, latency_key: str, say) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from jobs.diagrams import pareto_plot

    ok = [r for r in rows if "error" not in r]
    mask = non_dominated_mask([r.get("accuracy") for r in ok], [r.get(latency_key) for r in ok])
    for r, m in zip(ok, mask):
        r["pareto"] = bool(m)
        r["latency"] = r.get(latency_key)
    columns = ["candidate", "trial", "lambda", "tau", "budget", "evaluation", "accuracy", "measured_latency_ms",
               "predicted_latency", "latency_units", "params", "macs", "path_prob", "search_val_acc", "pareto",
               "one_line", "official", "path", "arch_key"]
    front = sorted((r for r in ok if r["pareto"]), key=lambda r: float(r[latency_key]))
    for r in front:
        r["arch_key"] = f"pareto_archs/{r['candidate'].replace('/', '__')}.json"
        store.put_json(r["arch_key"], r["arch"])

    def table(rs: list[dict]) -> Any:
        data = {c: [(json.dumps(r.get(c)) if c == "path" else r.get(c)) for r in rs] for c in columns}
        types = {"lambda": pa.float64(), "tau": pa.float64(), "budget": pa.float64(), "accuracy": pa.float64(),
                 "measured_latency_ms": pa.float64(), "predicted_latency": pa.float64(), "params": pa.int64(),
                 "macs": pa.int64(), "path_prob": pa.float64(), "search_val_acc": pa.float64(), "pareto": pa.bool_()}
        return pa.table({c: pa.array(v, type=types.get(c, pa.string())) for c, v in data.items()})

    with tempfile.TemporaryDirectory() as tmp:
        for name, rs in (("trials", ok), ("pareto", front)):
            t = table(rs)
            pq.write_table(t, f"{tmp}/{name}.parquet")
            pacsv.write_csv(t, f"{tmp}/{name}.csv")
            store.put_file(f"{name}.parquet", f"{tmp}/{name}.parquet")
            store.put_file(f"{name}.csv", f"{tmp}/{name}.csv")
        units = "ms, measured" if latency_key == "measured_latency_ms" else (ok[0].get("latency_units") if ok else "")
        pareto_plot(ok, f"{tmp}/pareto.png", latency=latency_key, latency_label=f"latency ({units})",
                    accuracy_label="accuracy")
        store.put_file("pareto.png", f"{tmp}/pareto.png")
    say(f"Pareto front: {len(front)} of {len(ok)} networks: "
        + "; ".join(f"{r['candidate']} acc {r['accuracy']:.3f} @ {r[latency_key]:.3g}" for r in front))
    return {"front": front, "rows": ok}


def _log_parent(mlflow_info: dict | None, store: Any, out: dict, status: str, say,
                latency_key: str = "measured_latency_ms") -> None:
    """Tables, plot, front archs and metrics onto the sweep's run; the front registered as model versions."""
    if not mlflow_info:
        return
    from cluster.tracking import Tracker
    from jobs.registry import register_pareto_front

    tracker = Tracker(mlflow_info["uri"], mlflow_info.get("experiment") or "densenas-sweep",
                      experiment_id=mlflow_info.get("experiment_id"))
    run = tracker.attach(mlflow_info["parent_run_id"], "sweep")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for key in ["trials.csv", "trials.parquet", "pareto.csv", "pareto.parquet", "pareto.png"]:
                if store.exists(key):
                    store.get_file(key, f"{tmp}/{key}")
                    run.log_artifact(f"{tmp}/{key}")
            if out.get("front"):
                archs = Path(tmp, "pareto_archs")
                for r in out["front"]:
                    store.get_file(r["arch_key"], archs / Path(r["arch_key"]).name)
                run.log_artifact(archs, "pareto_archs")
        run.log_metrics({k: float(v) for k, v in out.get("metrics", {}).items()})
        if status == "FINISHED" and out.get("front"):
            n = register_pareto_front((tracker, run), out["front"], latency_key)
            say(f"tracking: {n} Pareto-front net(s) registered (architecture only)")
    except Exception as e:  # noqa: BLE001 -- tracking never fails the sweep
        say(f"tracking: sweep run not completed ({type(e).__name__}: {e})")
    run.end(status)
    tracker.close()


# --------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class SweepInputs:
    space: Any                       # a SearchSpace, or anything resolve_space takes
    split: SplitOutput
    split_store: Any                 # the store the split's shard keys are relative to
    search: SearchConfig             # the search section: every trial searches with it (lambda / tau its own)
    cost_model: Any                  # the search's cost model (jobs.profile.resolve_cost_model)
    warmup_store: Any = None         # the shared warm-up cache entry; None: ctx.checkpoint_store/warmup
    tracking_uri: str | None = None  # MLflow of the sweep's parent and trial runs; None: no tracking
    experiment: str | None = None


class SweepOutput(StageOutput):
    """Every candidate network of every trial and the Pareto front (accuracy vs latency)."""

    trials: list[dict[str, Any]]
    pareto: list[dict[str, Any]]
    latency_metric: str
    mlflow_parent_run_id: str | None


def run(cfg: SweepConfig, inputs: SweepInputs, ctx: StageContext) -> SweepOutput:
    """Run the sweep, or with ``ctx.resume`` continue its interrupted Tune experiment; outputs in
    ``ctx.store``, the trials' working state in ``ctx.checkpoint_store``. Ray must be initialised."""
    import ray
    from ray import tune

    from cluster.storage import ray_storage
    from jobs.resources import WorkerResources, check_resources

    space, cost_model, say = resolve_space(inputs.space), inputs.cost_model, ctx.progress
    search = _search_config(inputs.search, cfg)
    split_manifest, split_store = inputs.split.model_dump(mode="json"), inputs.split_store
    store, work_store, resume = ctx.store, ctx.checkpoint_store, ctx.resume
    warmup_store = inputs.warmup_store or work_store.child("warmup")
    tracking_uri, experiment = inputs.tracking_uri, inputs.experiment or "densenas-sweep"
    if not ray.is_initialized():
        raise SweepError("Ray is not initialised: the pipeline starts it (stage uses_ray), or call ray.init() first")

    # Resources: one trial = its driver + a Train job; max_concurrent trials at once must fit.
    per_trial = WorkerResources(cfg.workers_per_trial, cfg.cpus_per_worker)
    check_resources(per_trial, reserve={"CPU": cfg.data_cpus + cfg.trial_driver_cpus}, what="one sweep trial")
    if cfg.max_concurrent > 1:
        check_resources(WorkerResources(cfg.max_concurrent * cfg.workers_per_trial, cfg.cpus_per_worker),
                        reserve={"CPU": cfg.data_cpus + cfg.max_concurrent * cfg.trial_driver_cpus},
                        what=f"{cfg.max_concurrent} concurrent sweep trials")

    points = sweep_points(cfg)
    say(f"{len(points)} trial(s) ({cfg.mode}): " + ", ".join(p["key"] for p in points)
        + f"; evaluation {cfg.evaluation_mode}; {cfg.max_concurrent} at a time")
    if not resume:
        work_store.delete_prefix("trials")
        work_store.delete_prefix("tune")
        work_store.delete("mlflow_parent.json")
    warmup_store = _ensure_warmup(search, cfg, space, split_manifest, split_store, cost_model, warmup_store, say)

    parent_of = ctx.tracker.run_id
    mlflow_info = _open_parent_run(tracking_uri, experiment, work_store, parent_of, cfg, say)
    shared = {"sweep": cfg.model_dump(mode="json"), "search": search.dump(), "space": space,
              "cost_model": cost_model, "split_manifest": dict(split_manifest), "split_store": split_store,
              "warmup_store": warmup_store, "work_store": work_store, "mlflow": mlflow_info}
    trainable = tune.with_resources(tune.with_parameters(_sweep_trial, shared=shared),
                                    {"cpu": cfg.trial_driver_cpus})
    storage_path, storage_fs = ray_storage(work_store.child("tune"))
    exp_path = f"{storage_path.rstrip('/')}/{EXPERIMENT}"
    t0 = time.time()
    if resume and tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        say(f"resuming the Tune experiment at {exp_path} (finished trials are not run again)")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent, num_samples=1),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage_path, storage_filesystem=storage_fs,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      verbose=1))
    grid = tuner.fit()
    # A RayTaskError's text is a whole traceback: keep the last line (the error itself) of each.
    errors = [next((ln for ln in reversed(str(e).splitlines()) if ln.strip()), str(e)) for e in grid.errors]
    rows, missing = _rows(work_store, points)
    latency_key = "measured_latency_ms" if any(r.get("measured_latency_ms") is not None for r in rows) \
        else "predicted_latency"
    out = _write_outputs(rows, store, latency_key, say) if rows else {"front": [], "rows": []}
    n_ok = len(points) - len(missing)
    metrics = {"trials": float(len(points)), "trials_finished": float(n_ok), "pareto_size": float(len(out["front"])),
               "sweep_seconds": round(time.time() - t0, 2)}
    if out["front"]:
        metrics["best_accuracy"] = max(float(r["accuracy"]) for r in out["front"])
    out["metrics"] = metrics
    if missing:
        _log_parent(mlflow_info, store, out, "FAILED", say)
        raise SweepError(f"{len(missing)} of {len(points)} trial(s) did not finish ({', '.join(missing)}): "
                         f"{'; '.join(errors)[:1500]}. Finished trials are kept: rerun with --resume "
                         "(ctx.resume) to run only the unfinished ones")
    _log_parent(mlflow_info, store, out, "FINISHED", say, latency_key)
    keep = ("candidate", "trial", "lambda", "tau", "budget", "accuracy", "measured_latency_ms",
            "predicted_latency", "latency_units", "params", "macs", "pareto", "one_line")
    return SweepOutput(trials=[{k: r.get(k) for k in keep} for r in out["rows"]],
                       pareto=[{k: r.get(k) for k in keep} | {"arch_key": r["arch_key"]} for r in out["front"]],
                       latency_metric=latency_key, mlflow_parent_run_id=(mlflow_info or {}).get("parent_run_id"),
                       metrics=metrics)


def _search_config(search_cfg: SearchConfig, cfg: SweepConfig) -> SearchConfig:
    doc = search_cfg.dump()
    # The search section also says how its own Train job runs; a trial's job is the sweep's.
    method = {f.alias or name for name, f in SearchConfig.model_fields.items()}
    doc = {k: v for k, v in doc.items() if k in method}
    if cfg.search_epochs is not None:
        doc["epochs"] = cfg.search_epochs
        doc["warmup_epochs"] = min(int(doc.get("warmup_epochs", 0)), cfg.search_epochs)
    return SearchConfig.model_validate(doc)
