"""The run's MLflow face: a parent run per pipeline run, a nested run per stage (cluster.tracking).

``PipelineTracker`` is what ``run_pipeline`` and ``StageContext.tracker`` use: ``run_id``, ``url``,
``log_params`` (nested dicts are flattened; secrets are redacted by cluster.tracking),
``log_metrics``, ``log_dict``, ``set_tags``, ``stage(name, fingerprint) -> StageTracker``, ``end``.
A stage that trains on Ray workers nests its own runs with ``ctx.tracker.spec`` (a picklable
``TrackerSpec`` whose parent is the stage run) and ``cluster.tracking.rank0_tracker``.
Tracking never raises into the pipeline: cluster.tracking spools when MLflow is unreachable.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from cluster.tracking import Tracker, flatten_config, standard_tags


def _url(tracker: Tracker, run_id: Optional[str]) -> Optional[str]:
    if not run_id or not str(tracker.uri).startswith(("http://", "https://")):
        return None
    exp = getattr(tracker, "_experiment_id", None)
    base = str(tracker.uri).rstrip("/")
    return f"{base}/#/experiments/{exp}/runs/{run_id}" if exp else f"{base}/#/runs/{run_id}"


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
    def spec(self):
        return self._tracker.spec(parent=self.handle)

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

    def end(self, status: str = "FINISHED") -> None:
        self.handle.end(status)


class StageTracker(_HandleFacade):
    """The nested run of one stage."""


class PipelineTracker(_HandleFacade):
    """The parent run of one pipeline run."""

    def __init__(self, uri: str | None, experiment: str, run_id: str, spool_dir: str | Path | None = None):
        tracker = Tracker(uri, experiment, spool_dir=spool_dir)   # spool_dir: the run's own (pipeline.runtime)
        super().__init__(tracker, tracker.start_run(f"pipeline:{run_id}", tags=standard_tags(run_id=run_id)))
        self.pipeline_run_id = run_id

    def stage(self, name: str, fingerprint: str | None = None) -> StageTracker:
        handle = self._tracker.start_run(name, parent=self.handle,
                                         tags=standard_tags(run_id=self.pipeline_run_id, stage=name,
                                                            fingerprint=fingerprint))
        return StageTracker(self._tracker, handle)

    def end(self, status: str = "FINISHED") -> None:
        self.handle.end(status)
        self._tracker.flush()
