"""A pipeline run's MLflow face over ``cluster.tracking``: a parent run per pipeline run, a nested run per stage.

``PipelineTracker`` is what ``run_pipeline`` uses and ``StageTracker`` (``PipelineTracker.stage``) is
``StageContext.tracker``; with tracking off both are the same classes over ``NullTracker``
(``PipelineTracker.disabled()``), so a stage calls the same methods either way. The surface: ``run_id``, ``url``,
``log_params`` (nested dicts are flattened; secrets are redacted by cluster.tracking),
``log_metrics``, ``log_dict``, ``set_tags``, ``stage(name, fingerprint) -> StageTracker``, ``end``.
A stage that trains on Ray workers hands ``ctx.tracker.spec`` (a picklable ``TrackerSpec`` naming
the stage run) to its loop, where ``jobs.epochs.EpochCurves`` logs rank 0's per-epoch curves into
that run. Tracking never raises into the pipeline: cluster.tracking spools when MLflow is unreachable.

One parent per (run id, config): a rerun of the same run id with the same resolved config reopens
the parent it made before (its new stage runs nest under it; a fully cached rerun adds nothing but a
``densenas.reruns`` count), so MLflow never shows a second, empty parent. Another config under the
same run id gets its own parent. The parent carries the run's summary, forwarded from its stages:
the derived architecture as the tag ``densenas.arch``, the search time, the test top-1, the measured
and predicted latency, and the split as a dataset input.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from cluster.tracking import (TAG_CONFIG, TAG_RUN_ID, TAG_STAGE, NullTracker, Tracker, flatten_config,
                              standard_tags)

# stage summary metric -> parent metric: what a user compares runs by
PARENT_SUMMARY = {
    "search": {"search_seconds": "search_seconds", "val_acc": "search_val_acc", "epochs": "search_epochs"},
    "derive": {"predicted_latency": "predicted_latency", "params": "params", "macs": "macs"},
    "retrain": {"test_top1": "test_top1", "test_top5": "test_top5", "measured_latency_ms": "measured_latency_ms",
                "predicted_latency_ms": "predicted_latency_ms", "retrain_seconds": "retrain_seconds"},
    "profile": {"profile_seconds": "profile_seconds"},
}


def _url(tracker: Tracker, run_id: Optional[str]) -> Optional[str]:
    if not run_id or not str(tracker.uri).startswith(("http://", "https://")):
        return None
    exp = tracker.experiment_id
    base = str(tracker.uri).rstrip("/")
    return f"{base}/#/experiments/{exp}/runs/{run_id}" if exp else f"{base}/#/runs/{run_id}"


def config_digest(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class _HandleFacade:
    def __init__(self, tracker: Tracker, handle: Any):
        self._tracker = tracker
        self.handle = handle

    @property
    def run_id(self) -> Optional[str]:
        return self.handle.run_id

    @property
    def url(self) -> Optional[str]:
        return _url(self._tracker, self.handle.run_id)

    @property
    def experiment(self) -> str:
        return self._tracker.experiment

    @property
    def enabled(self) -> bool:
        """False with tracking off: callers skip work done only for MLflow (model files, pictures)."""
        return not isinstance(self._tracker, NullTracker)

    @property
    def spec(self):
        """For Train loops: log into this run (``run_id``) or nest runs under it (``parent_run_id``)."""
        return self._tracker.spec(parent=self.handle, run=self.handle)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.handle.log_params(flatten_config(dict(params)))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if metrics:
            self.handle.log_metrics(metrics, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.handle.set_tags(tags)

    def log_dict(self, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
            self.handle.log_artifact(str(path))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or directory as artifacts of this run (copied into the spool when MLflow is down)."""
        self.handle.log_artifact(str(path), artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, **kwargs: Any) -> None:
        self._tracker.log_dataset(name, digest, source, run=self.handle, **kwargs)

    def register_model(self, model_name: str, artifact_path: str, tags: Mapping[str, Any] | None = None,
                       description: str = "") -> None:
        """A Model Registry version from this run's ``artifact_path`` (logged before this call)."""
        self._tracker.register_model(model_name, artifact_path, tags, description, run=self.handle)

    def end(self, status: str = "FINISHED") -> None:
        self.handle.end(status)


class StageTracker(_HandleFacade):
    """The nested run of one stage. Its summary (``log_metrics`` without a step, as the runner logs a
    stage's result) adds no point to a metric the stage already logged as a per-epoch curve, and
    forwards the run-level numbers (``PARENT_SUMMARY``) to the parent."""

    def __init__(self, tracker: Tracker, handle: Any, name: str, parent: "PipelineTracker"):
        super().__init__(tracker, handle)
        self.name = name
        self.parent = parent

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not metrics:
            return
        if step is None:
            curves = self._tracker.metric_keys(self.handle) or set()
            forward = PARENT_SUMMARY.get(self.name, {})
            self.parent.log_summary_metrics({forward[k]: v for k, v in metrics.items() if k in forward})
            metrics = {k: v for k, v in metrics.items() if k not in curves}
        super().log_metrics(metrics, step=step)

    def log_summary(self, metrics: Mapping[str, float] | None = None, tags: Mapping[str, Any] | None = None) -> None:
        """Numbers / tags that describe the whole pipeline run: onto the parent run."""
        if metrics:
            self.parent.log_summary_metrics(metrics)
        if tags:
            self.parent.set_tags(tags)

    def log_dataset(self, name: str, digest: str, source: str, **kwargs: Any) -> None:
        """The dataset this stage made or read: on the stage run and on the parent."""
        super().log_dataset(name, digest, source, **kwargs)
        self.parent.log_dataset(name, digest, source, **kwargs)


class PipelineTracker(_HandleFacade):
    """The parent run of one pipeline run (reopened by a rerun of the same run id and config)."""

    def __init__(self, uri: str | None, experiment: str, run_id: str, config: Any = None,
                 spool_dir: str | Path | None = None, tracker: Tracker | None = None):
        # spool_dir: the run's own (pipeline.runtime); tracker: given only by disabled()
        tracker = tracker if tracker is not None else Tracker(uri, experiment, spool_dir=spool_dir)
        self.pipeline_run_id = run_id
        self.reused = False
        tags = standard_tags(run_id=run_id)
        previous = None
        if config is not None:
            tags[TAG_CONFIG] = config_digest(config)
            found = tracker.find_runs(f"tags.`{TAG_RUN_ID}` = '{_quote(run_id)}' and "
                                      f"tags.`{TAG_CONFIG}` = '{tags[TAG_CONFIG]}'", max_results=20) or []
            previous = next((r for r in found if "mlflow.parentRunId" not in r.data.tags), None)
        if previous is not None:
            handle = tracker.reopen(previous.info.run_id, f"pipeline:{run_id}")
            reruns = int(previous.data.tags.get("densenas.reruns", "0") or 0) + 1
            handle.set_tags({"densenas.reruns": reruns, TAG_COMMIT_LAST: tags.get("densenas.git_commit", "")})
            self.reused = True
        else:
            handle = tracker.start_run(f"pipeline:{run_id}", tags=tags)
        super().__init__(tracker, handle)
        self._summary: dict[str, float] = {}

    @classmethod
    def disabled(cls, run_id: str = "") -> "PipelineTracker":
        """Tracking off: the same surface over ``NullTracker``; nothing is logged, ``run_id`` is None."""
        return cls(None, "", run_id, tracker=NullTracker())

    @classmethod
    def nested(cls, spec: Any, name: str, run_id: str, tags: Mapping[str, Any] | None = None) -> "PipelineTracker":
        """A run nested under ``spec``'s run (a ``TrackerSpec`` from ``StageTracker.spec``, e.g. one Tune
        trial under the sweep stage's run), whose ``stage(...)`` runs nest under it in turn. ``spec``
        None (tracking off): ``disabled``."""
        if spec is None:
            return cls.disabled(run_id)
        tracker = spec.open()
        self = cls.__new__(cls)
        _HandleFacade.__init__(self, tracker, tracker.start_run(name, parent=spec.run_id or spec.parent_run_id,
                                                                tags=standard_tags(run_id=run_id) | dict(tags or {})))
        self.pipeline_run_id, self.reused, self._summary = run_id, False, {}
        return self

    def log_summary_metrics(self, metrics: Mapping[str, float]) -> None:
        """Run-level numbers, each value once (a stage and the runner may both report it)."""
        new = {k: float(v) for k, v in metrics.items() if self._summary.get(k) != float(v)}
        self._summary.update(new)
        self.log_metrics(new)

    def stage(self, name: str, fingerprint: str | None = None) -> StageTracker:
        handle = self._tracker.start_run(name, parent=self.handle,
                                         tags=standard_tags(run_id=self.pipeline_run_id, stage=name,
                                                            fingerprint=fingerprint))
        return StageTracker(self._tracker, handle, name, self)

    def end_stale_runs(self, stage: str, run_id: str | None = None, status: str = "KILLED") -> None:
        """End the runs of ``stage`` a lost driver left RUNNING (``kill -9``: nothing ended them), so MLflow
        shows no attempt as live that is not. First the spools dead drivers / workers left are replayed
        (a run created while MLflow was down exists only there), then every RUNNING run of this pipeline
        run and stage, and ``run_id`` (the record's), is ended. Called before the stage's new run starts;
        a run that already ended is left alone; while MLflow is down the known one's end is spooled."""
        self._tracker.flush()
        stale = {run_id} if run_id else set()
        found = self._tracker.find_runs(f"tags.`{TAG_RUN_ID}` = '{_quote(self.pipeline_run_id)}' and "
                                        f"tags.`{TAG_STAGE}` = '{_quote(stage)}' and attributes.status = 'RUNNING'",
                                        max_results=50)
        stale |= {r.info.run_id for r in found or []}
        for rid in sorted(stale):
            if self._tracker.run_status(rid) not in (None, "RUNNING"):
                continue
            self._tracker.end_run(status, run=self._tracker.attach(rid, "stale stage run"))

    def end(self, status: str = "FINISHED") -> None:
        self.handle.end(status)
        self._tracker.flush()


TAG_COMMIT_LAST = "densenas.last_rerun_commit"


def _quote(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("'", "\\'")
