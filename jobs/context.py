"""``StageContext``: what the pipeline hands every stage function ``(section_cfg, ctx) -> outputs``.

A stage writes its artifacts through ``ctx.store`` (rooted at ``runs/<run_id>/<stage>/``), reads its
upstream stages' manifests from ``ctx.inputs[stage]`` (each has the stage's own result keys plus the
runner's: ``fingerprint``, ``artifacts`` {key: {uri, sha256, size}}, ``metrics``, ``store_uri``), keeps
resumable state under ``ctx.checkpoint_uri`` / ``ctx.checkpoint_store`` and resumes from it when
``ctx.resume`` is true. It must not write ``manifest.json``: the runner publishes it last.

Caches shared across configs (e.g. the search warm-up, which does not depend on lambda / tau):
``ctx.caches[name]`` is a store rooted at ``cache/<name>/<fingerprint>/`` in the store root, keyed by a
fingerprint of only the fields that stage declared for that cache (``ctx.cache_fingerprints[name]``).
A cache entry is complete when its ``_complete.json`` exists (``ctx.cache_complete(name)`` /
``ctx.mark_cache_complete(name, info)``); write the data first, mark it last.

This module is plain Python (no Ray, no MLflow): stages and tests build one directly.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["StageContext", "NullTracker", "CACHE_COMPLETE"]

CACHE_COMPLETE = "_complete.json"


class NullTracker:
    """A tracker that records nothing (tracking disabled, or tests). Same surface as the real one."""

    run_id: str | None = None
    url: str | None = None
    spec = None          # no TrackerSpec: Ray workers log nothing either

    def stage(self, name: str, fingerprint: str | None = None) -> "NullTracker":
        return self

    def end(self, status: str = "FINISHED") -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass


@dataclass
class StageContext:
    """Per-stage handle: where to write, what came before, whether to resume, how to report."""

    run_id: str
    stage: str
    store: Any                                     # ArtifactStore at runs/<run_id>/<stage>/
    run_store: Any                                 # ArtifactStore at runs/<run_id>/
    root_store: Any = None                         # ArtifactStore at the store root (caches live here)
    inputs: dict[str, dict] = field(default_factory=dict)   # upstream stage -> its manifest
    fingerprint: str = ""
    resume: bool = False                           # a checkpoint of this fingerprint exists: continue it
    checkpoint_uri: str = ""                       # URI of the checkpoint prefix (e.g. Ray Train storage_path)
    checkpoint_store: Any = None                   # ArtifactStore at that prefix
    caches: dict[str, Any] = field(default_factory=dict)             # name -> store at cache/<name>/<fp>/
    cache_fingerprints: dict[str, str] = field(default_factory=dict)
    tracker: Any = field(default_factory=NullTracker)
    config: Any = None                             # the whole resolved PipelineConfig (read-only)
    printer: Callable[[str], None] | None = None
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def progress(self, msg: str) -> None:
        """One line of progress, prefixed with the stage and elapsed seconds (long stages: call often)."""
        line = f"[{self.stage} +{time.monotonic() - self._t0:6.1f}s] {msg}"
        if self.printer is not None:
            self.printer(line)
        else:
            print(line, file=sys.stdout, flush=True)

    def log(self, msg: str) -> None:
        """Alias of ``progress`` (jobs.split calls ``ctx.log``)."""
        self.progress(msg)

    def input(self, stage: str) -> dict:
        """An upstream manifest, with an error that says what to do when it is missing."""
        if stage not in self.inputs:
            raise KeyError(f"stage {self.stage!r} asked for the manifest of {stage!r}, which is not one of its "
                           f"declared upstream stages ({', '.join(self.inputs) or 'none'}); declare it in "
                           "pipeline/stages.py")
        return self.inputs[stage]

    def cache_complete(self, name: str) -> bool:
        return self.caches[name].exists(CACHE_COMPLETE)

    def mark_cache_complete(self, name: str, info: Mapping[str, Any] | None = None) -> None:
        """Publish the cache entry's completion marker (last, atomically)."""
        self.caches[name].publish_json(CACHE_COMPLETE, {"fingerprint": self.cache_fingerprints[name],
                                                        "run_id": self.run_id, "stage": self.stage,
                                                        "time": time.time(), **dict(info or {})})
