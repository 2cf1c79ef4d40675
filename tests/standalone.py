"""Stages run alone, outside the pipeline, the way a test or a bench runs them: ``run(cfg, inputs, ctx)``
with ``StageContext.standalone(store)`` (outputs in ``store``, checkpoints in ``store/checkpoints``)."""
from __future__ import annotations

from typing import Any

from jobs import retrain, search, split
from jobs.context import StageContext, resolve_space
from jobs.profile import resolve_cost_model


def run_split(cfg: split.SplitConfig, store: Any) -> split.SplitOutput:
    return split.run(cfg, None, StageContext.standalone(store, "split"))


def run_search(job: search.SearchJobConfig, space: Any, split_out: split.SplitOutput, split_store: Any, store: Any,
               warmup_store: Any = None, drill: dict | None = None) -> dict:
    """The search on its config's cost model (``macs`` or a table path); its output as a dict."""
    space = resolve_space(space)
    cost_model = resolve_cost_model(job.cost, space, skip_fraction=job.macs_skip_fraction)
    inputs = search.SearchInputs(space, split_out, split_store, cost_model, warmup_store,
                                 search.FailureInjection.model_validate(drill) if drill else None)
    return search.run(job, inputs, StageContext.standalone(store, "search")).model_dump()


def run_retrain(cfg: retrain.RetrainConfig, arch: Any, split_out: split.SplitOutput, split_store: Any,
                store: Any) -> dict:
    inputs = retrain.RetrainInputs(arch, split_out, split_store)
    return retrain.run(cfg, inputs, StageContext.standalone(store, "retrain")).model_dump()


def run_sweep(cfg: Any, space: Any, search_cfg: Any, split_out: split.SplitOutput, split_store: Any, store: Any,
              work_store: Any, tracking_uri: str | None = None, experiment: str | None = None,
              resume: bool = False) -> dict:
    """The sweep on the search section's cost model; trials' state in ``work_store``. With
    ``tracking_uri``: the stage's MLflow run is ``sweep`` under a parent ``pipeline:sweep-test``, ended
    FINISHED or FAILED as the pipeline's runner ends it; its id is the output's ``mlflow_run_id``."""
    from cluster.run_tracking import PipelineTracker
    from jobs import sweep

    space = resolve_space(space)
    cost_model = resolve_cost_model(search_cfg.cost, space, skip_fraction=search_cfg.macs_skip_fraction)
    inputs = sweep.SweepInputs(space, split_out, split_store, search_cfg, cost_model)
    parent = (PipelineTracker(tracking_uri, experiment or "sweep-test", "sweep-test") if tracking_uri
              else PipelineTracker.disabled())
    tracker = parent.stage("sweep")
    ctx = StageContext.standalone(store, "sweep", checkpoint_store=work_store, resume=resume, tracker=tracker)
    try:
        out = sweep.run(cfg, inputs, ctx)
    except BaseException:
        tracker.end("FAILED")
        parent.end("FAILED")
        raise
    tracker.end("FINISHED")
    parent.end("FINISHED")
    return out.model_dump() | {"mlflow_run_id": tracker.run_id}
