"""The sweep stage: Ray Tune over the latency trade-off (lambda, tau), each trial the stages' own ``run()``.

    run(SweepConfig(...), SweepInputs(space, split, split_store, search, cost_model, warmup_store), ctx) -> SweepOutput

1. **Warm-up, once.** The weights-only warm-up does not depend on lambda / tau: ``jobs.search.warm_up``
   trains it (the search's own Train job, stopped after ``warmup_epochs``) into the warm-up cache, unless
   a complete entry of the trials' shape is there (the pipeline's ``ctx.caches["warmup"]``, shared
   with the search stage).
2. **Trials.** ``Tuner`` runs a function trainable per grid / random point (``trial_driver_cpus``: it
   only waits). A trial is the pipeline's stages in a row, in ``trials/<key>/`` of the checkpoint store:
   ``jobs.search.run`` with the trial's lambda / tau (from the warm-up), then per latency budget
   (plus the unbudgeted one) ``jobs.derive.run`` and ``jobs.retrain.run`` (the retrain stage's recipe,
   ``retrain_*`` epochs / batch / lr, no export; its latency measured under the latency table's
   protocol). Each candidate is reported to Tune; ``result.json`` is written last, and a trial
   restarted after it only re-reports it. An interrupted trial's search / retrain continue from their
   own checkpoints.
3. **Output.** The Pareto front over every derived network (accuracy max, measured latency min,
   ``densenas.pareto``): ``trials.csv|parquet`` (every candidate, ``pareto`` flag), ``pareto.csv|parquet``,
   ``pareto.png`` and ``pareto_archs/<candidate>.json``, in ``ctx.store`` and on the stage's MLflow run,
   whose front is registered as model versions (architecture only).

MLflow: each trial is a run nested under the stage's run (``ctx.tracker``), its search / derive /
retrain runs nested under the trial's, as in a pipeline run. Resume (``ctx.resume``):
``Tuner.restore(..., resume_unfinished=True, resume_errored=True)``: a finished trial is not run again
(its run stays under the stage run of the attempt that ran it, beside the new one in the pipeline's
run); the new stage run gets the trials it runs and the Pareto outputs of all.
"""
from __future__ import annotations

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
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from densenas.pareto import non_dominated_mask
from densenas.search import SearchConfig
from jobs.context import StageContext, StageOutput, resolve_space
from jobs.retrain import RetrainConfig
from jobs.split import SplitOutput
from jobs.train import numeric_metrics

__all__ = ["SweepConfig", "SweepInputs", "SweepOutput", "TrialFailureDrill", "SweepError", "run", "sweep_points",
           "trial_key"]

TRIAL_RESULT = "result.json"
EXPERIMENT = "sweep"
REMOVED = {"evaluation": "every trial retrains its derived net with the retrain stage",
           "accuracy_split": "the retrain stage trains on search-train + search-val and tests on the test split",
           "latency_repeats": "the retrain stage times the net under the latency table's protocol "
                              "(recipe: {latency_repeats: N} without a table)"}


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
    retrain_epochs: int = Field(3, ge=1, description="epochs of each derived net's retrain")
    retrain_batch_size: int = Field(64, ge=1)
    retrain_lr: float = Field(0.05, gt=0)
    recipe: dict[str, Any] = Field(default_factory=dict, description="further retrain-section fields of the trials' "
                                   "retrain (jobs.retrain.RetrainConfig; default: its defaults)")
    search_epochs: int | None = Field(None, ge=1, description="override search.epochs for the trials")
    max_concurrent: int = Field(1, ge=1, description="trials at once")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers of each trial's search / retrain")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per Train worker (fractions let trials share cores)")
    trial_driver_cpus: float = Field(0.01, gt=0, description="CPUs of the trial function itself (it only waits)")
    data_cpus: float = Field(1.0, ge=0, description="CPUs kept free for Ray Data's decode tasks")
    max_failures: int = Field(0, ge=0, description="Tune retries of a failed trial")
    seed: int = 0
    fail_trial: TrialFailureDrill | None = None

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, doc: Any) -> Any:
        gone = [f"sweep.{k}: {why}" for k, why in REMOVED.items() if isinstance(doc, dict) and k in doc]
        if gone:
            raise ValueError("no longer a sweep field, remove it (" + "; ".join(gone) + ")")
        return doc

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
        self.retrain_config()   # a bad recipe fails with the config, not in a trial
        return self

    def retrain_config(self) -> RetrainConfig:
        """Each trial's retrain stage: the retrain section's defaults, ``recipe``, the sweep's epochs /
        batch / lr and Train resources; no export, no model registered (the front is, by the sweep)."""
        return RetrainConfig.model_validate({
            **self.recipe, "epochs": self.retrain_epochs, "batch_size": self.retrain_batch_size, "lr": self.retrain_lr,
            "workers": self.workers_per_trial, "cpus_per_worker": self.cpus_per_worker, "data_cpus": self.data_cpus,
            "use_gpu": False, "export": False, "log_model": False, "seed": self.seed})

    def train_recipe(self) -> Any:
        """The trials' ``densenas.retrain.TrainRecipe`` (to retrain other nets the same way)."""
        from densenas.retrain import TrainRecipe

        cfg = self.retrain_config()
        return TrainRecipe.model_validate({k: getattr(cfg, k) for k in TrainRecipe.model_fields})


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


# --------------------------------------------------------------------------- the trial
@dataclass(frozen=True)
class _Shared:
    """What every trial gets (pickled once by ``tune.with_parameters``)."""

    cfg: SweepConfig
    search: dict                 # the trials' search section (method fields), lambda / tau replaced per trial
    inputs: "SweepInputs"
    warmup_store: Any
    work_store: Any
    tracking: Any                # TrackerSpec of the stage's run, or None
    run_id: str


def _sweep_trial(config: dict, shared: _Shared) -> None:
    """One Tune trial: search from the warm-up -> derive -> retrain, per budget; ``result.json`` last."""
    from ray import tune

    from cluster.run_tracking import PipelineTracker
    from cluster.tracking import TAG_TRIAL

    point = config["point"]
    work = shared.work_store.child(f"trials/{point['key']}")
    work.put_json(f"starts/{time.time():.3f}-{uuid.uuid4().hex[:6]}.json", {"pid": os.getpid(), "time": time.time()})
    finished = work.exists(TRIAL_RESULT)
    # Its own run id tag: the pipeline's lookups of a stage's runs by (run id, stage) never see a trial's stages.
    tracker = PipelineTracker.nested(shared.tracking, f"trial-{point['key']}", f"{shared.run_id}:sweep:{point['key']}",
                                     {TAG_TRIAL: point["key"], "densenas.cached": str(finished).lower()})
    tracker.log_params({"lambda": point["lambda"], "tau": point["tau"]})
    try:
        result = work.get_json(TRIAL_RESULT) if finished else _run_trial(shared, point, work, tracker)
    except BaseException as e:
        tracker.set_tags({"error": f"{type(e).__name__}: {e}"[:500]})
        tracker.end("FAILED")
        raise
    for step, row in enumerate(result["candidates"]):
        if "error" not in row:
            tune.report(numeric_metrics(row))
            tracker.log_metrics({k: float(row[k]) for k in ("accuracy", "measured_latency_ms", "predicted_latency")
                                 if _finite(row.get(k))}, step=step)
    tracker.log_dict(result, "trial_result.json")
    tracker.end("FINISHED")
    if not finished:
        work.publish_json(TRIAL_RESULT, result)     # last: its presence means the trial is complete


def _stage(tracker: Any, name: str, store: Any, fn: Any) -> Any:
    """``fn(ctx)`` as a stage of the trial: its own store, checkpoints and nested MLflow run."""
    stage_tracker = tracker.stage(name)
    ctx = StageContext.standalone(store, name, tracker=stage_tracker)
    try:
        out = fn(ctx)
    except BaseException:
        stage_tracker.end("FAILED")
        raise
    stage_tracker.log_metrics(numeric_metrics(out.metrics))
    stage_tracker.end("FINISHED")
    return out


def _run_trial(shared: _Shared, point: dict, work: Any, tracker: Any) -> dict:
    from densenas.latency import LatencyTable
    from jobs import derive, retrain, search

    cfg, inputs = shared.cfg, shared.inputs
    drill = cfg.fail_trial
    if drill is not None and drill.index == point["index"] and not os.path.exists(drill.marker):
        Path(drill.marker).write_text(f"trial {point['key']} failed on purpose\n")
        raise SweepError(f"failure drill: trial {point['key']} (index {point['index']}) stops before its search")
    space = resolve_space(inputs.space)
    job = search.SearchJobConfig.model_validate({**shared.search, "lambda": point["lambda"], "tau": point["tau"],
                                                 **_train_job_fields(cfg)})
    t0 = time.time()
    searched = _stage(tracker, "search", work.child("search"), lambda ctx: search.run(job, search.SearchInputs(
        space, inputs.split, inputs.split_store, inputs.cost_model, shared.warmup_store), ctx))
    search_s = time.time() - t0
    arch_params = work.child("search").get_bytes(searched.arch_params_key)
    table = inputs.cost_model if isinstance(inputs.cost_model, LatencyTable) else None
    candidates = []
    for budget in [None, *cfg.latency_budgets]:
        bkey = _budget_key(budget)
        suffix = "" if budget is None else f"@{bkey}"
        row = {"trial": point["key"], "index": point["index"], "lambda": point["lambda"], "tau": point["tau"],
               "budget": budget, "candidate": f"{point['key']}/{bkey}"}
        try:
            d = _stage(tracker, f"derive{suffix}", work.child(f"derive/{bkey}"), lambda ctx: derive.run(
                derive.DeriveConfig(k_best=3, latency_budget=budget, diagram=False),
                derive.DeriveInputs(space, arch_params, inputs.cost_model, inputs.split.num_classes), ctx))
        except ValueError as e:   # no path within this budget: recorded, not fatal for the trial
            candidates.append(row | {"error": str(e)})
            continue
        t1 = time.time()
        r = _stage(tracker, f"retrain{suffix}", work.child(f"retrain/{bkey}"), lambda ctx: retrain.run(
            cfg.retrain_config(), retrain.RetrainInputs(d.arch, inputs.split, inputs.split_store, table), ctx))
        candidates.append(row | {
            "evaluation": "retrain", "accuracy": r.metrics["test_top1"], "measured_latency_ms": r.measured_latency_ms,
            "predicted_latency": d.predicted_latency, "latency_units": d.latency_units, "params": d.params,
            "macs": d.macs, "path": d.path, "path_prob": d.path_prob, "one_line": d.one_line, "official": d.official,
            "arch": d.arch, "search_val_acc": searched.metrics.get("val_acc"), "eval_seconds": round(time.time() - t1, 2)})
    return {"trial": point["key"], "index": point["index"], "lambda": point["lambda"], "tau": point["tau"],
            "search_seconds": round(search_s, 2), "search_metrics": searched.metrics, "candidates": candidates}


def _train_job_fields(cfg: SweepConfig) -> dict:
    return {"workers": cfg.workers_per_trial, "cpus_per_worker": cfg.cpus_per_worker, "use_gpu": False,
            "max_failures": 1, "data_cpus": cfg.data_cpus}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


# --------------------------------------------------------------------------- warm-up
def _warm_up(search_doc: dict, cfg: SweepConfig, inputs: "SweepInputs", warm_store: Any, work_store: Any) -> Any:
    """The shared warm-up in the trials' shape (``jobs.search.warm_up``); returns the store holding it."""
    from jobs import search

    job = search.SearchJobConfig.model_validate({**search_doc, **_train_job_fields(cfg)})
    if job.warmup_epochs == 0:
        return warm_store
    return search.warm_up(job, search.SearchInputs(inputs.space, inputs.split, inputs.split_store, inputs.cost_model,
                                                   warm_store),
                          StageContext.standalone(work_store.child("warmup-run"), "sweep warm-up"))


# --------------------------------------------------------------------------- outputs
COLUMNS = ["candidate", "trial", "lambda", "tau", "budget", "evaluation", "accuracy", "measured_latency_ms",
           "predicted_latency", "latency_units", "params", "macs", "path_prob", "search_val_acc", "pareto",
           "one_line", "official", "path", "arch_key"]


def _rows(work_store: Any, points: Sequence[dict]) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    for p in points:
        key = f"trials/{p['key']}/{TRIAL_RESULT}"
        if not work_store.exists(key):
            missing.append(p["key"])
            continue
        rows += work_store.get_json(key)["candidates"]
    return rows, missing


def _write_outputs(rows: list[dict], store: Any, latency_key: str, tracker: Any, say) -> dict:
    """Tables, plot and front architectures into ``store`` and onto the stage's run."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from jobs.diagrams import pareto_plot

    ok = [r for r in rows if "error" not in r]
    mask = non_dominated_mask([r.get("accuracy") for r in ok], [r.get(latency_key) for r in ok])
    for r, m in zip(ok, mask):
        r["pareto"], r["latency"] = bool(m), r.get(latency_key)
    front = sorted((r for r in ok if r["pareto"]), key=lambda r: float(r[latency_key]))
    types = {"lambda": pa.float64(), "tau": pa.float64(), "budget": pa.float64(), "accuracy": pa.float64(),
             "measured_latency_ms": pa.float64(), "predicted_latency": pa.float64(), "params": pa.int64(),
             "macs": pa.int64(), "path_prob": pa.float64(), "search_val_acc": pa.float64(), "pareto": pa.bool_()}
    with tempfile.TemporaryDirectory() as tmp:
        archs = Path(tmp, "pareto_archs")
        archs.mkdir()
        for r in front:
            r["arch_key"] = f"pareto_archs/{r['candidate'].replace('/', '__')}.json"
            store.put_json(r["arch_key"], r["arch"])
            Path(tmp, r["arch_key"]).write_text(json.dumps(r["arch"], indent=1))
        for name, rs in (("trials", ok), ("pareto", front)):
            t = pa.table({c: pa.array([json.dumps(r.get(c)) if c == "path" else r.get(c) for r in rs],
                                      type=types.get(c, pa.string())) for c in COLUMNS})
            pq.write_table(t, f"{tmp}/{name}.parquet")
            pacsv.write_csv(t, f"{tmp}/{name}.csv")
        units = "ms, measured" if latency_key == "measured_latency_ms" else (ok[0].get("latency_units") if ok else "")
        pareto_plot(ok, f"{tmp}/pareto.png", latency=latency_key, latency_label=f"latency ({units})",
                    accuracy_label="test top-1")
        for name in ("trials.parquet", "trials.csv", "pareto.parquet", "pareto.csv", "pareto.png"):
            store.put_file(name, f"{tmp}/{name}")
            tracker.log_artifact(f"{tmp}/{name}")
        if front:
            tracker.log_artifact(archs, "pareto_archs")
    say(f"Pareto front: {len(front)} of {len(ok)} networks: "
        + "; ".join(f"{r['candidate']} acc {r['accuracy']:.3f} @ {r[latency_key]:.3g}" for r in front))
    return {"front": front, "rows": ok}


# --------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class SweepInputs:
    space: Any                       # a SearchSpace, or anything resolve_space takes
    split: SplitOutput
    split_store: Any                 # the store the split's shard keys are relative to
    search: SearchConfig             # the search section: every trial searches with it (lambda / tau its own)
    cost_model: Any                  # the search's cost model (jobs.profile.resolve_cost_model)
    warmup_store: Any = None         # the shared warm-up cache entry; None: ctx.checkpoint_store/warmup


class SweepOutput(StageOutput):
    """Every candidate network of every trial and the Pareto front (accuracy vs latency)."""

    trials: list[dict[str, Any]]
    pareto: list[dict[str, Any]]
    latency_metric: str


def run(cfg: SweepConfig, inputs: SweepInputs, ctx: StageContext) -> SweepOutput:
    """Run the sweep, or with ``ctx.resume`` continue its interrupted Tune experiment; outputs in
    ``ctx.store``, the trials' working state in ``ctx.checkpoint_store``. Ray must be initialised."""
    import ray
    from ray import tune

    from cluster.storage import ray_storage
    from jobs.registry import register_pareto_front
    from jobs.resources import WorkerResources, check_resources

    say, work_store = ctx.progress, ctx.checkpoint_store
    if not ray.is_initialized():
        raise SweepError("Ray is not initialised: the pipeline starts it (stage uses_ray), or call ray.init() first")
    # Resources: one trial = its driver + a Train job; max_concurrent trials at once must fit.
    check_resources(WorkerResources(cfg.max_concurrent * cfg.workers_per_trial, cfg.cpus_per_worker),
                    reserve={"CPU": cfg.data_cpus + cfg.max_concurrent * cfg.trial_driver_cpus},
                    what="one sweep trial" if cfg.max_concurrent == 1 else f"{cfg.max_concurrent} concurrent sweep trials")
    points = sweep_points(cfg)
    say(f"{len(points)} trial(s) ({cfg.mode}): " + ", ".join(p["key"] for p in points)
        + f"; {cfg.max_concurrent} at a time")
    if not ctx.resume:
        for prefix in ("trials", "tune", "warmup-run"):
            work_store.delete_prefix(prefix)
    search_doc = _search_doc(inputs.search, cfg)
    warm_store = _warm_up(search_doc, cfg, inputs, inputs.warmup_store or work_store.child("warmup"), work_store)
    shared = _Shared(cfg, search_doc, inputs, warm_store, work_store, ctx.tracker.spec, ctx.run_id)
    trainable = tune.with_resources(tune.with_parameters(_sweep_trial, shared=shared), {"cpu": cfg.trial_driver_cpus})
    storage_path, storage_fs = ray_storage(work_store.child("tune"))
    exp_path = f"{storage_path.rstrip('/')}/{EXPERIMENT}"
    t0 = time.time()
    if ctx.resume and tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        say(f"resuming the Tune experiment at {exp_path} (finished trials are not run again)")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent, num_samples=1),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage_path, storage_filesystem=storage_fs,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=1))
    grid = tuner.fit()
    # A RayTaskError's text is a whole traceback: keep the last line (the error itself) of each.
    errors = [next((ln for ln in reversed(str(e).splitlines()) if ln.strip()), str(e)) for e in grid.errors]
    rows, missing = _rows(work_store, points)
    latency_key = "measured_latency_ms" if any(r.get("measured_latency_ms") is not None for r in rows) \
        else "predicted_latency"
    out = _write_outputs(rows, ctx.store, latency_key, ctx.tracker, say) if rows else {"front": [], "rows": []}
    metrics = {"trials": float(len(points)), "trials_finished": float(len(points) - len(missing)),
               "pareto_size": float(len(out["front"])), "sweep_seconds": round(time.time() - t0, 2)}
    if out["front"]:
        metrics["best_accuracy"] = max(float(r["accuracy"]) for r in out["front"])
    if missing:
        raise SweepError(f"{len(missing)} of {len(points)} trial(s) did not finish ({', '.join(missing)}): "
                         f"{'; '.join(errors)[:1500]}. Finished trials are kept: rerun with --resume "
                         "(ctx.resume) to run only the unfinished ones")
    n = register_pareto_front(ctx.tracker, out["front"], latency_key)
    if n:
        say(f"tracking: {n} Pareto-front net(s) registered (architecture only)")
    keep = ("candidate", "trial", "lambda", "tau", "budget", "accuracy", "measured_latency_ms",
            "predicted_latency", "latency_units", "params", "macs", "pareto", "one_line")
    return SweepOutput(trials=[{k: r.get(k) for k in keep} for r in out["rows"]],
                       pareto=[{k: r.get(k) for k in keep} | {"arch_key": r["arch_key"]} for r in out["front"]],
                       latency_metric=latency_key, metrics=metrics)


def _search_doc(search_cfg: SearchConfig, cfg: SweepConfig) -> dict:
    """The trials' search section: its method fields (a trial's Train job is the sweep's), epochs overridden."""
    doc = search_cfg.dump()
    method = {f.alias or name for name, f in SearchConfig.model_fields.items()}
    doc = {k: v for k, v in doc.items() if k in method}
    if cfg.search_epochs is not None:
        doc["epochs"] = cfg.search_epochs
        doc["warmup_epochs"] = min(int(doc.get("warmup_epochs", 0)), cfg.search_epochs)
    return SearchConfig.model_validate(doc).dump()
