"""The stage graph, fingerprints, and the runner that skips, resumes and records stages.

A stage is a declaration::

    Stage(name="split", sections=("data",), fn=_split, code=("imagedata", "jobs/split.py"))

``fn(section_cfg, ctx) -> Output``: ``section_cfg`` is the stage's config section (a dict of them when
it declares several), ``ctx`` a ``jobs.context.StageContext``. The real stages' ``fn`` (bottom of this
module) build the stage's typed inputs from its upstream outputs (``ctx.input(stage, Output)``) and
call ``jobs.<stage>.run(cfg, inputs, ctx)``. The returned ``Output`` (or a plain dict) becomes the
stage's manifest body (keys with a meaning to the runner: ``metrics`` {name: number}, ``node_ids``,
and ``artifacts`` {key: {sha256, size}}, computed by listing ``ctx.store`` when absent).

Fingerprint of a stage = sha256 of its config sections (the space by its content hash), its
upstream stages' fingerprints and its code version (sha256 of the source files it declares in
``code``, so it works in a ``ray job submit`` working dir without .git). Fingerprints follow from the
config alone, so the whole graph is fingerprinted before any work starts.

Runner rules (``run_pipeline``):

- manifest ``runs/<run_id>/<stage>/manifest.json`` exists, state ``finished``, same fingerprint:
  the stage is *cached* (skipped);
- a *finished* manifest with another fingerprint is never replaced silently: the run is refused
  before any work (``PipelineError``) unless ``force`` (``--force``) is given. With ``force`` the
  old manifest stays in place while the stage reruns, beside a ``replacing.json`` marker; the new
  manifest replaces it only when the rerun finished. After a failed forced rerun the old manifest
  counts as cached only if every artifact it lists still has its recorded sha256 (the rerun may
  have overwritten some); otherwise the stage runs again;
- an unfinished manifest is deleted first, the stage runs with ``ctx.resume`` true when
  ``--resume`` was given and its checkpoint prefix ``<stage>/checkpoints/<fp16>/`` holds objects
  (without ``--resume`` that prefix is cleared: a fresh start); the manifest is published LAST;
- a stage that raises leaves no manifest; the run record says ``failed`` with the error, and the
  next run re-runs only it (and what depends on it);
- caches (``Stage.caches``) are keyed by a fingerprint of selected fields only: the search warm-up
  ignores lambda / tau, so a lambda change reuses split, profile and the warm-up.

Registration points for the real stages are at the bottom (``builtin_graph``).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pydantic import BaseModel

from jobs.context import RUNNER_KEYS, StageContext, resolve_space
from pipeline.config import REPO_ROOT, PipelineConfig
from pipeline.records import InvalidRunId, RunLease, RunRecord, default_run_id, run_exists, validate_run_id
from jobs.train import node_id, numeric_metrics
from pipeline.runtime import ensure_ray, open_store, open_tracker

__all__ = [
    "Stage", "CacheSpec", "StageGraph", "StageFailed", "PipelineError", "ReplaceRefused", "run_pipeline", "plan",
    "refuse_replacing",
    "code_version", "section_payload", "stage_fingerprints", "builtin_graph", "MANIFEST", "RUNNER_KEYS",
]

MANIFEST = "manifest.json"
# Written beside a finished manifest while a --force rerun replaces it; removed once the new one is published.
REPLACING = "replacing.json"
# Set by the entry point's SIGTERM / SIGINT handler: whatever a stage raises after it is an interruption.
STOP_REQUESTED = threading.Event()
CHECKPOINTS = "checkpoints"


class PipelineError(RuntimeError):
    """A pipeline-level problem (graph, selection, upstream missing), raised before work starts."""


class ReplaceRefused(PipelineError):
    """A rerun would replace finished stages made with another config (pass --force, or a new --run-id)."""


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        self.stage = stage
        self.error = error
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {error}")


StageFn = Callable[[Any, StageContext], BaseModel | Mapping[str, Any] | None]


@dataclass(frozen=True)
class CacheSpec:
    """A cache shared across runs, keyed by a subset of the stage's inputs.

    ``exclude[section]`` lists the top-level keys of that section that do not affect the cached
    artifact (e.g. ``{"search": ("lambda", "tau", "arch", ...)}`` for the weights-only warm-up);
    ``upstream`` lists the upstream stages whose fingerprints do.
    """

    sections: tuple[str, ...]
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    upstream: tuple[str, ...] = ()
    code: tuple[str, ...] = ()          # its code version (empty: the stage's); shared caches name theirs


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn | None
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    code: tuple[str, ...] = ("densenas",)          # repo-relative packages / files: the code version
    uses_ray: bool | Callable[[Any], bool] = False  # start / join Ray before fn (callable: of its section)
    caches: Mapping[str, CacheSpec] = field(default_factory=dict)
    enabled: Callable[[PipelineConfig], bool] | None = None   # None: always part of a full run
    unavailable: str | None = None                 # why fn is missing (reported, with what depends on it)
    description: str = ""

    def is_enabled(self, cfg: PipelineConfig) -> bool:
        return self.enabled is None or bool(self.enabled(cfg))

    def section_arg(self, cfg: PipelineConfig) -> Any:
        if len(self.sections) == 1:
            return cfg.section(self.sections[0])
        return {s: cfg.section(s) for s in self.sections}


class StageGraph:
    """Stages by name, in registration order; ``order()`` is a topological order."""

    def __init__(self, stages: Iterable[Stage] = ()):
        self._stages: dict[str, Stage] = {}
        for s in stages:
            self.register(s)

    def register(self, stage: Stage, replace: bool = False) -> Stage:
        if stage.name in self._stages and not replace:
            raise PipelineError(f"stage {stage.name!r} is registered twice; pass replace=True to override it")
        self._stages[stage.name] = stage
        return stage

    def __getitem__(self, name: str) -> Stage:
        if name not in self._stages:
            raise PipelineError(f"no stage named {name!r}; stages: {', '.join(self._stages)}")
        return self._stages[name]

    def __contains__(self, name: str) -> bool:
        return name in self._stages

    def names(self) -> list[str]:
        return list(self._stages)

    def order(self) -> list[Stage]:
        done: dict[str, None] = {}
        visiting: set[str] = set()

        def visit(name: str, via: str) -> None:
            if name in done:
                return
            if name not in self._stages:
                raise PipelineError(f"stage {via!r} lists upstream {name!r}, which is not registered")
            if name in visiting:
                raise PipelineError(f"stage graph has a cycle through {name!r}")
            visiting.add(name)
            for up in self._stages[name].upstream:
                visit(up, name)
            visiting.discard(name)
            done[name] = None

        for n in self._stages:
            visit(n, n)
        return [self._stages[n] for n in done]

    def downstream(self, name: str) -> set[str]:
        out: set[str] = set()
        for s in self.order():
            if name in s.upstream or out & set(s.upstream):
                out.add(s.name)
        return out


# --------------------------------------------------------------------------- fingerprints
_CODE_CACHE: dict[tuple[str, ...], str] = {}


def code_version(paths: Sequence[str], root: Path = REPO_ROOT) -> str:
    """sha256 over the named source files (packages: their *.py files), path and content."""
    key = tuple(paths)
    if key in _CODE_CACHE:
        return _CODE_CACHE[key]
    h = hashlib.sha256()
    for rel in sorted(set(paths)):
        p = root / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            name = f.relative_to(root).as_posix()
            h.update(name.encode() + b"\0")
            h.update(f.read_bytes() if f.is_file() else b"<missing>")
            h.update(b"\0")
    _CODE_CACHE[key] = digest = h.hexdigest()
    return digest


def section_payload(cfg: PipelineConfig, section: str) -> Any:
    """What a section contributes to a fingerprint: its JSON form (the space: its content hash)."""
    if section == "space":
        return {"space_hash": resolve_space(cfg.space).space_hash()}
    value = cfg.section(section)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    return value


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def stage_fingerprints(graph: StageGraph, cfg: PipelineConfig) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(stage -> fingerprint, stage -> {cache name -> cache fingerprint}) for every registered stage."""
    fps: dict[str, str] = {}
    cache_fps: dict[str, dict[str, str]] = {}
    for st in graph.order():
        code = code_version(st.code)
        fps[st.name] = _digest({
            "stage": st.name,
            "config": {s: section_payload(cfg, s) for s in st.sections},
            "inputs": {u: fps[u] for u in st.upstream},
            "code": code,
        })
        cache_fps[st.name] = {}
        for cname, spec in st.caches.items():
            cfgs = {}
            for s in spec.sections:
                payload = section_payload(cfg, s)
                drop = set(spec.exclude.get(s, ()))
                if isinstance(payload, dict):
                    payload = {k: v for k, v in payload.items() if k not in drop}
                cfgs[s] = payload
            cache_fps[st.name][cname] = _digest({"cache": cname, "config": cfgs,
                                                 "inputs": {u: fps[u] for u in spec.upstream},
                                                 "code": code_version(spec.code) if spec.code else code})
    return fps, cache_fps


# --------------------------------------------------------------------------- planning
@dataclass
class PlannedStage:
    stage: Stage
    fingerprint: str
    action: str            # run | cached | unavailable | blocked | skip (not selected / disabled)
    reason: str = ""
    replaces: str | None = None   # fingerprint of the finished manifest a "run" would replace


def _read_manifest(run_store: Any, name: str) -> dict | None:
    key = f"{name}/{MANIFEST}"
    try:
        if not run_store.exists(key):
            return None
        m = run_store.get_json(key)
    except Exception:
        return None
    return m if isinstance(m, dict) else None


def _artifacts_intact(stage_store: Any, manifest: Mapping[str, Any]) -> bool:
    """Every artifact the manifest lists still has the recorded sha256 (read back from the store)."""
    for key, meta in (manifest.get("artifacts") or {}).items():
        want = meta.get("sha256") if isinstance(meta, Mapping) else None
        try:
            if not want or hashlib.sha256(stage_store.get_bytes(key, verify=False)).hexdigest() != want:
                return False
        except Exception:
            return False
    return True


def _manifest_ok(run_store: Any, name: str, fp: str) -> dict | None:
    m = _read_manifest(run_store, name)
    if m is None or m.get("state") != "finished" or m.get("fingerprint") != fp:
        return None
    if run_store.exists(f"{name}/{REPLACING}") and not _artifacts_intact(run_store.child(name), m):
        return None    # a forced rerun stopped half way and changed outputs this manifest lists
    return m


def plan(graph: StageGraph, cfg: PipelineConfig, run_store: Any, selected: Sequence[str] | None = None
         ) -> tuple[list[PlannedStage], dict[str, str], dict[str, dict[str, str]]]:
    """What a run would do, stage by stage, decided from the config and the store alone."""
    fps, cache_fps = stage_fingerprints(graph, cfg)
    chosen = set(selected) if selected else None
    if chosen:
        for n in chosen:
            graph[n]  # raises with the list of names
    out: list[PlannedStage] = []
    state: dict[str, str] = {}
    for st in graph.order():
        fp = fps[st.name]
        in_run = (st.name in chosen) if chosen is not None else st.is_enabled(cfg)
        if not in_run:
            state[st.name] = "skip"
            out.append(PlannedStage(st, fp, "skip", "not selected" if chosen is not None else "disabled in config"))
            continue
        blocked = [u for u in st.upstream if state.get(u) in ("unavailable", "blocked")]
        missing = [u for u in st.upstream if state.get(u) == "skip" and _manifest_ok(run_store, u, fps[u]) is None]
        if blocked:
            action, reason = "blocked", f"upstream {', '.join(blocked)} cannot run"
        elif missing:
            raise PipelineError(
                f"stage {st.name!r} needs upstream {', '.join(missing)} finished with the current config, but "
                f"{'it is' if len(missing) == 1 else 'they are'} not part of this run and no matching manifest "
                f"exists; add {', '.join(missing)} to --stages (or drop --stages)")
        elif _manifest_ok(run_store, st.name, fp) is not None:
            action, reason = "cached", "finished manifest with the same fingerprint"
        elif st.fn is None:
            action, reason = "unavailable", st.unavailable or "no implementation registered"
        else:
            action, reason = "run", ""
        replaces = None
        if action == "run":
            old = _read_manifest(run_store, st.name)
            if old is not None and old.get("state") == "finished" and old.get("fingerprint") != fp:
                replaces = str(old.get("fingerprint"))
                reason = f"replaces the finished result {replaces[:12]} (made with another config)"
            elif old is not None and old.get("state") == "finished":
                reason = "its finished outputs were changed by a failed --force rerun"
        state[st.name] = action
        out.append(PlannedStage(st, fp, action, reason, replaces))
    return out, fps, cache_fps


def refuse_replacing(planned: Sequence[PlannedStage], run_id: str) -> None:
    """``ReplaceRefused`` when the plan would replace finished stages made with another config."""
    hit = [p for p in planned if p.replaces]
    if hit:
        names = ", ".join(p.stage.name for p in hit)
        raise ReplaceRefused(
            f"run {run_id!r} already has finished {names} made with a different config; rerunning would "
            f"replace {'it' if len(hit) == 1 else 'them'}. Use a new --run-id to keep both, or --force to replace "
            f"(the finished result stays valid until the rerun finishes)")


# --------------------------------------------------------------------------- running
def _artifact_index(store: Any) -> dict[str, dict]:
    out = {}
    for key in store.list(""):
        if key in (MANIFEST, REPLACING) or key.startswith(f"{CHECKPOINTS}/"):
            continue
        data = store.get_bytes(key)
        out[key] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "uri": store.uri_for(key)}
    return out


def run_pipeline(cfg: PipelineConfig, *, run_id: str | None = None, stages: Sequence[str] | None = None,
                 resume: bool = False, force: bool = False, graph: StageGraph | None = None, store: Any = None,
                 tracker: Any = None, printer: Callable[[str], None] = lambda m: print(m, flush=True),
                 ) -> RunRecord:
    """Run (or skip, or resume) the stages of ``graph`` for ``cfg``; returns the final run record.

    Raises ``StageFailed`` when a stage raises (after recording it), ``PipelineError`` for a bad
    selection, or (``ReplaceRefused``) for finished stages of another config without ``force``,
    before any work starts.
    """
    cfg = cfg.resolved()
    graph = graph or builtin_graph()
    try:
        run_id = validate_run_id(run_id) if run_id else default_run_id(cfg.name)
    except InvalidRunId as e:
        raise PipelineError(str(e)) from None
    store = store if store is not None else open_store(cfg.storage.uri)
    if resume and not run_exists(store, run_id):
        raise PipelineError(f"--resume: there is no run {run_id!r} in {store.uri_for('runs/')} to resume; check "
                            f"--run-id (python -m pipeline status lists the runs), or drop --resume to start it")
    run_store = store.child(f"runs/{run_id}")
    planned, fps, cache_fps = plan(graph, cfg, run_store, stages)
    if not force:
        refuse_replacing(planned, run_id)

    lease = RunLease(store, run_id, log=printer).acquire()   # LeaseHeld: another live driver runs it
    try:
        return _run_planned(cfg, graph, planned, fps, cache_fps, run_id, store, run_store, resume, tracker, printer)
    finally:
        lease.release()


def _run_planned(cfg: PipelineConfig, graph: StageGraph, planned: list[PlannedStage], fps: dict[str, str],
                 cache_fps: dict[str, dict[str, str]], run_id: str, store: Any, run_store: Any, resume: bool,
                 tracker: Any, printer: Callable[[str], None]) -> RunRecord:
    record = RunRecord.open(store, run_id, cfg)
    record.start(resume=resume)
    record.doc["stage_order"] = [p.stage.name for p in planned]   # JSON stores sort keys; keep graph order
    tracker = tracker if tracker is not None else open_tracker(cfg, run_id, store)
    record.set_tracking(tracker, cfg)
    tracker.log_params({"run_id": run_id, **cfg.dump()})   # the resolved config, flattened
    tracker.log_dict(cfg.dump(), "config.json")
    printer(f"run {run_id}: store {run_store.uri_for('')}" + (f", MLflow {tracker.url}" if tracker.url else ""))
    for p in planned:
        printer(f"  {p.stage.name:<8} {p.action:<11} {p.fingerprint[:12]}  {p.reason}")
    record.save()

    failed: StageFailed | None = None
    participating = [p.stage.name for p in planned if p.action != "skip"]
    try:
        for p in planned:
            st, fp = p.stage, p.fingerprint
            if p.action in ("skip",):
                continue
            if p.action in ("unavailable", "blocked"):
                record.stage_event(st.name, p.action, fingerprint=fp, reason=p.reason)
                printer(f"[{st.name}] {p.action}: {p.reason}")
                continue
            if p.action == "cached":
                m = run_store.get_json(f"{st.name}/{MANIFEST}")
                record.stage_cached(st.name, m)
                finished_at = m.get("timings", {}).get("finished_at")
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished_at)) if finished_at else "?"
                printer(f"[{st.name}] cached ({fp[:12]}): finished {when}, reused")
                continue
            _run_one(st, fp, cache_fps[st.name], cfg, run_id, store, run_store, record, tracker, resume, printer)
    except StageFailed as e:
        failed = e
        for d in graph.downstream(e.stage):
            if d in participating and record.stages.get(d, {}).get("state") not in ("finished", "cached"):
                record.stage_event(d, "blocked", fingerprint=fps[d], reason=f"upstream {e.stage} failed")
        raise
    finally:
        record.finish(participating)
        tracker.end("FAILED" if failed else ("FINISHED" if record.status == "finished" else "KILLED"))
    return record


def _run_one(st: Stage, fp: str, cache_fps: Mapping[str, str], cfg: PipelineConfig, run_id: str, store: Any,
             run_store: Any, record: RunRecord, tracker: Any, resume: bool, printer) -> dict:
    stage_store = run_store.child(st.name)
    old = _read_manifest(run_store, st.name)
    if old is not None and old.get("state") == "finished":
        # --force (or outputs changed by an earlier failed forced rerun): the finished manifest stays
        # until the new one is published; the marker tells later plans to verify its artifacts.
        stage_store.publish_json(REPLACING, {"from": old.get("fingerprint"), "to": fp, "started_at": time.time()})
    elif stage_store.exists(MANIFEST):   # unfinished: never mistaken for done
        stage_store.delete(MANIFEST)
    ckpt_prefix = f"{CHECKPOINTS}/{fp[:16]}"
    ckpt_store = stage_store.child(ckpt_prefix)
    has_ckpt = bool(ckpt_store.list(""))
    if has_ckpt and not resume:
        printer(f"[{st.name}] found a checkpoint at {ckpt_store.uri_for('')}; starting fresh (pass --resume to continue it)")
        stage_store.delete_prefix(ckpt_prefix)
        has_ckpt = False
    inputs = {u: run_store.get_json(f"{u}/{MANIFEST}") for u in st.upstream}
    prev = record.stages.get(st.name) or {}
    if prev.get("state") == "running":
        # the record says running, yet we hold the lease: its driver was lost (kill -9) and left the
        # stage's MLflow run RUNNING; end it (KILLED) before this attempt's run starts
        tracker.end_stale_runs(st.name, prev.get("mlflow_run_id"))
    stage_tracker = tracker.stage(st.name, fingerprint=fp)
    caches = {name: store.child(f"cache/{name}/{cfp}") for name, cfp in cache_fps.items()}
    ctx = StageContext(run_id=run_id, stage=st.name, store=stage_store, run_store=run_store, root_store=store,
                       inputs=inputs, fingerprint=fp, resume=resume and has_ckpt,
                       checkpoint_uri=ckpt_store.uri_for(""), checkpoint_store=ckpt_store, caches=caches,
                       cache_fingerprints=dict(cache_fps), tracker=stage_tracker, config=cfg, printer=printer)
    record.stage_started(st.name, fp, resume=ctx.resume, checkpoint_uri=ctx.checkpoint_uri,
                         mlflow_run_id=stage_tracker.run_id)
    printer(f"[{st.name}] running ({fp[:12]})" + (" resuming from its checkpoint" if ctx.resume else ""))
    try:
        section = st.section_arg(cfg)
        stage_tracker.log_params({f"{s}": section_payload(cfg, s) for s in st.sections})
        if st.uses_ray(section) if callable(st.uses_ray) else st.uses_ray:
            ensure_ray(cfg.ray, log=ctx.progress)
        started, t0 = time.time(), time.monotonic()
        out = st.fn(section, ctx)
        result = out.model_dump(mode="json") if isinstance(out, BaseModel) else dict(out or {})
        duration = time.monotonic() - t0
        clash = [k for k in RUNNER_KEYS if k in result]
        if clash:
            raise PipelineError(f"stage {st.name!r} returned runner-reserved keys {clash}; rename them")
    except BaseException as e:  # noqa: BLE001 -- record KeyboardInterrupt too, then re-raise
        # A stop request (SIGTERM from `ray job stop`, Ctrl-C) is an interruption, resumable, not a
        # failure. Once Ray is up its own SIGTERM handler replaces ours and raises SystemExit; the
        # request may also surface as another error out of Ray (the Train run torn down under it).
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit)) or STOP_REQUESTED.is_set()
        state = "interrupted" if interrupted else "failed"
        record.stage_failed(st.name, state, f"{type(e).__name__}: {e}", traceback.format_exc(limit=8))
        stage_tracker.end("FAILED" if state == "failed" else "KILLED")
        printer(f"[{st.name}] {state}: {type(e).__name__}: {e}")
        if isinstance(e, KeyboardInterrupt):
            raise
        if interrupted:
            raise KeyboardInterrupt(f"stage {st.name} stopped: {type(e).__name__}: {e}") from e
        raise StageFailed(st.name, e) from e

    metrics = dict(result.get("metrics") or {})
    artifacts = result.get("artifacts")
    if artifacts is None:
        artifacts = _artifact_index(stage_store)
    node_ids = sorted(set(result.get("node_ids") or []) | {node_id()})
    manifest = {
        **result,
        "stage": st.name, "run_id": run_id, "fingerprint": fp, "state": "finished",
        "code_version": code_version(st.code),
        "inputs": {u: m.get("fingerprint") for u, m in inputs.items()},
        "timings": {"started_at": started, "finished_at": time.time(), "duration_s": round(duration, 3)},
        "store_uri": stage_store.uri_for(""),
        "metrics": metrics, "artifacts": artifacts, "node_ids": node_ids,
        "caches": {n: {"fingerprint": cache_fps[n], "uri": caches[n].uri_for("")} for n in caches},
    }
    stage_tracker.log_metrics(numeric_metrics(metrics))
    stage_store.publish_json(MANIFEST, manifest)   # LAST: its presence means the stage is complete
    if stage_store.exists(REPLACING):
        stage_store.delete(REPLACING)
    record.stage_finished(st.name, manifest)
    stage_tracker.end("FINISHED")
    printer(f"[{st.name}] finished in {duration:.1f}s; {len(artifacts)} artifacts"
            + (f"; metrics {json.dumps(numeric_metrics(metrics))}" if metrics else ""))
    return manifest


# --------------------------------------------------------------------------- the real stages
# Each stage's fn builds its typed inputs from the config and its upstream outputs, then calls
# jobs.<stage>.run(cfg, inputs, ctx).
WARMUP_IRRELEVANT = ("lambda", "tau", "arch", "cost", "macs_skip_fraction", "derive_budget", "max_failures")
# Code versions: the source files each stage's result depends on (the modules it runs and what they
# import from densenas/), so an edit elsewhere does not invalidate it. Search hashes all of densenas/.
PROFILE_CODE = ("densenas/ops.py", "densenas/space.py", "densenas/latency.py", "jobs/profile.py")
DERIVE_CODE = ("densenas/derive.py", "densenas/arch.py", "densenas/space.py", "densenas/latency.py",
               "densenas/counting.py", "densenas/ops.py", "densenas/supernet.py", "jobs/derive.py")
RETRAIN_CODE = ("densenas/arch.py", "densenas/ops.py", "imagedata", "densenas/counting.py",
                "jobs/retrain.py", "jobs/data.py")
# One warm-up cache for search and every sweep trial: same fields, same code, same fingerprint.
WARMUP_CACHE = CacheSpec(("space", "search"), {"search": WARMUP_IRRELEVANT}, ("split",),
                         code=("densenas", "imagedata", "jobs/search.py", "jobs/data.py"))


def _num_classes(cfg: PipelineConfig) -> int | None:
    classes = cfg.data.classes
    return classes if isinstance(classes, int) else (len(classes) if classes else None)


def _cost_model(search: Any, space: Any, ctx: StageContext) -> Any:
    """The search's cost model (``search.cost``; 'profile': the profile stage's table)."""
    from jobs.profile import ProfileOutput, resolve_cost_model

    table = None
    if search.cost == "profile":
        table = ctx.input("profile", ProfileOutput).table(ctx.input_store("profile"))
    return resolve_cost_model(search.cost, space, table, skip_fraction=search.macs_skip_fraction)


def _split(section: Any, ctx: StageContext) -> BaseModel:
    from jobs import split

    return split.run(section, None, ctx)


def _profile(sections: Mapping[str, Any], ctx: StageContext) -> BaseModel:
    from jobs import profile

    return profile.run(sections["profile"],
                       profile.ProfileInputs(resolve_space(sections["space"]), _num_classes(ctx.config)), ctx)


def _search(sections: Mapping[str, Any], ctx: StageContext) -> BaseModel:
    from jobs import search
    from jobs.split import SplitOutput

    cfg, space = sections["search"], resolve_space(sections["space"])
    return search.run(cfg, search.SearchInputs(space, ctx.input("split", SplitOutput), ctx.input_store("split"),
                                               _cost_model(cfg, space, ctx), ctx.caches.get("warmup")), ctx)


def _derive(sections: Mapping[str, Any], ctx: StageContext) -> BaseModel:
    from jobs import derive
    from jobs.search import SearchOutput

    space = resolve_space(sections["space"])
    searched = ctx.input("search", SearchOutput)
    arch_params = ctx.input_store("search").get_bytes(searched.arch_params_key)
    num_classes = searched.derived.get("num_classes") or _num_classes(ctx.config)
    return derive.run(sections["derive"], derive.DeriveInputs(space, arch_params, _cost_model(ctx.config.search,
                                                                                              space, ctx),
                                                              num_classes), ctx)


def _retrain(section: Any, ctx: StageContext) -> BaseModel:
    from jobs import retrain
    from jobs.derive import DeriveOutput
    from jobs.profile import ProfileOutput
    from jobs.split import SplitOutput

    table = ctx.input("profile", ProfileOutput).table(ctx.input_store("profile"))
    return retrain.run(section, retrain.RetrainInputs(ctx.input("derive", DeriveOutput).arch,
                                                      ctx.input("split", SplitOutput), ctx.input_store("split"),
                                                      table), ctx)


def _sweep(sections: Mapping[str, Any], ctx: StageContext) -> BaseModel:
    from jobs import sweep
    from jobs.split import SplitOutput

    space = resolve_space(sections["space"])
    inputs = sweep.SweepInputs(space, ctx.input("split", SplitOutput), ctx.input_store("split"), sections["search"],
                               _cost_model(sections["search"], space, ctx), ctx.caches.get("warmup"))
    return sweep.run(sections["sweep"], inputs, ctx)


def builtin_graph() -> StageGraph:
    """split -> profile -> search -> derive -> retrain, and sweep (off unless sweep.enabled)."""
    g = StageGraph()
    g.register(Stage("split", _split, ("data",), code=("imagedata", "jobs/split.py"),
                     uses_ray=lambda data: data.executor == "ray", description="class subset, per-class split, Parquet shards"))
    g.register(Stage("profile", _profile, ("space", "profile"), code=PROFILE_CODE, uses_ray=True,
                     description="latency table of every op signature"))
    # The weights-only warm-up lives in ctx.caches["warmup"] (keyed without lambda / tau).
    g.register(Stage("search", _search, ("space", "search"), upstream=("split", "profile"),
                     code=("densenas", "imagedata", "jobs/search.py", "jobs/data.py"), uses_ray=True,
                     caches={"warmup": WARMUP_CACHE}, description="super-network search (Ray Train)"))
    g.register(Stage("derive", _derive, ("space", "derive"), upstream=("search", "profile"), code=DERIVE_CODE,
                     description="Viterbi path + argmax ops -> architecture"))
    g.register(Stage("retrain", _retrain, ("retrain",), upstream=("split", "derive", "profile"),
                     code=RETRAIN_CODE, uses_ray=True,
                     description="train the derived net from scratch, test, measure latency"))
    g.register(Stage("sweep", _sweep, ("space", "search", "sweep"), upstream=("split", "profile"),
                     code=("densenas", "imagedata", "jobs/sweep.py", "jobs/search.py", "jobs/derive.py",
                           "jobs/retrain.py", "jobs/data.py", "jobs/train.py"), uses_ray=True,
                     caches={"warmup": WARMUP_CACHE}, enabled=lambda cfg: bool(cfg.sweep.enabled),
                     description="Ray Tune over lambda / tau sharing one warm-up"))
    return g
