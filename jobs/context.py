"""The stage contract: what every stage module in ``jobs/`` exports and what the pipeline hands it.

Each ``jobs/<stage>.py`` exports three things::

    class Config(BaseModel)            its YAML section, field for field (e.g. ``SearchJobConfig``)
    class Output(StageOutput)          what it returns; artifact keys are relative to its store
    def run(cfg, inputs, ctx) -> Output

``inputs`` holds what the stage consumes, typed (the space, upstream ``Output``s, their stores, a
cost model): the pipeline builds it from upstream manifests with ``ctx.input("profile",
ProfileOutput)``, a test or a CLI builds it directly. ``ctx`` (``StageContext``) says where to write
(``ctx.store``, rooted at ``runs/<run_id>/<stage>/``), where resumable state goes
(``ctx.checkpoint_store``; continue it when ``ctx.resume``), which caches exist (``ctx.caches[name]``,
a store keyed by a fingerprint of only the fields that cache depends on; an entry is complete when
its ``_complete.json`` exists: write the data first, that marker last) and how to report
(``ctx.progress``, ``ctx.tracker``). A stage must not write ``manifest.json``: the runner publishes
its ``Output`` as the manifest body, beside the runner's own keys (``RUNNER_KEYS``), last.

``StageContext.standalone(store)`` is the context of a stage run outside the pipeline.
This module is plain Python (no Ray, no MLflow).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["StageContext", "StageOutput", "output_of", "untracked", "CACHE_COMPLETE", "RUNNER_KEYS", "REPO_ROOT",
           "LOCAL_STORE", "resolve_space"]

CACHE_COMPLETE = "_complete.json"
# Keys the runner writes into every manifest beside the stage's Output; an Output must not use them.
RUNNER_KEYS = ("stage", "run_id", "fingerprint", "state", "code_version", "timings", "store_uri", "inputs")
# The runner's index of the stage's files ({key: {sha256, size}}) and of the caches it used.
INDEX_KEYS = ("artifacts", "caches")


class StageOutput(BaseModel):
    """Fields every stage's ``Output`` has; the manifest body is ``Output.model_dump(mode="json")``."""

    model_config = ConfigDict(extra="forbid")
    metrics: dict[str, float] = Field(default_factory=dict, description="numbers logged to the stage's run")
    node_ids: list[str] = Field(default_factory=list, description="Ray nodes the stage ran on")


OutputT = TypeVar("OutputT", bound=StageOutput)


def output_of(manifest: Mapping[str, Any], output_type: type[OutputT]) -> OutputT:
    """A stage's typed ``Output`` from its manifest: the manifest less the runner's keys and index."""
    return output_type.model_validate({k: v for k, v in manifest.items() if k not in (*RUNNER_KEYS, *INDEX_KEYS)})


REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_STORE = REPO_ROOT / "runs-store"     # the store when neither a config nor $DENSENAS_STORE names one


def resolve_space(source: Any):
    """``densenas.space.load_space`` (a ``SearchSpace`` passes through), with relative YAML paths taken
    from the repo root when they are not found from the working directory (a job's working dir is the
    repo; tests and CLIs run anywhere)."""
    from densenas.space import SearchSpace, load_space

    if isinstance(source, SearchSpace):
        return source
    if isinstance(source, str) and Path(source).suffix and not Path(source).exists():
        cand = REPO_ROOT / source
        if cand.exists():
            source = str(cand)
    return load_space(source)


def untracked() -> Any:
    """The tracker of a stage run with tracking off (tests, CLIs, benches): the pipeline's own
    ``StageTracker`` class over ``cluster.tracking.NullTracker``, so a stage calls the same methods."""
    from cluster.run_tracking import PipelineTracker

    return PipelineTracker.disabled().stage("untracked")


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
    tracker: Any = field(default_factory=untracked)    # cluster.run_tracking.StageTracker
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

    def input(self, stage: str, output_type: type[OutputT]) -> OutputT:
        """An upstream stage's ``Output``, read from its manifest."""
        if stage not in self.inputs:
            raise KeyError(f"stage {self.stage!r} asked for the output of {stage!r}, which is not one of its "
                           f"declared upstream stages ({', '.join(self.inputs) or 'none'}); declare it in "
                           "pipeline/stages.py")
        return output_of(self.inputs[stage], output_type)

    def input_store(self, stage: str) -> Any:
        """The store an upstream stage wrote into (its ``Output``'s keys are relative to it)."""
        return self.run_store.child(stage)

    @classmethod
    def standalone(cls, store: Any, stage: str = "stage", **fields: Any) -> "StageContext":
        """The context of a stage run outside the pipeline (a test, a CLI, a bench): outputs in ``store``,
        checkpoints in ``store/checkpoints``, no tracking."""
        fields.setdefault("checkpoint_store", store.child("checkpoints"))
        fields.setdefault("checkpoint_uri", fields["checkpoint_store"].uri_for(""))
        return cls(run_id="standalone", stage=stage, store=store, run_store=store, **fields)
