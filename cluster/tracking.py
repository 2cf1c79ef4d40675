"""MLflow tracking for the pipeline: nested runs, secret-free params, and a spool for bad times.

    tracker = Tracker()                                   # $MLFLOW_TRACKING_URI or sqlite:///.densenas-tracking/mlflow.db
    parent = tracker.start_run("pipeline", tags=standard_tags(run_id="r1"))
    tracker.log_params(flatten_config(resolved_config))   # secrets filtered out
    with tracker.run("search", parent=parent, tags={"densenas.fingerprint": fp}) as stage:
        stage.log_metrics({"val_acc": 0.71}, step=epoch)
        stage.log_artifact("arch.json")
    tracker.end_run("FINISHED")                           # ends the parent
    tracker.flush()                                       # send whatever was spooled

Design rules:

- Tracking trouble never costs training work: no method raises into the caller. When the server
  (or the SQLite file) cannot be reached, operations are appended, in order, to a local JSONL
  spool (artifacts copied beside it) and replayed by ``flush()`` -- or automatically by the next
  call after ``retry_interval_s`` -- once it answers again. Runs created while offline get their
  MLflow ids at replay; metrics keep their original timestamps and steps. A spool left by a
  process that died is replayed by the next tracker using the same spool directory.
- Errors that are not about reachability (a param logged twice with another value, a bad metric
  name) are logged as warnings and dropped: retrying would never succeed.
- Nothing secret is logged as a param: keys naming secrets/tokens/passwords/credentials get
  ``***``, URLs lose their user:password part and signature-like query values, and any value
  containing a secret taken from the environment (AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN, ...) is
  redacted.
- Without any configured URI the tracker uses ``sqlite:///<dir>/mlflow.db`` (MLflow 3.17 refuses
  the plain file store; a directory or file:// URI is mapped onto a SQLite file inside it).
- An explicit ``MlflowClient`` is used, never MLflow's global "active run", so the tracker can
  live beside other MLflow users in the same process (Ray Train, Tune callbacks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

__all__ = [
    "Tracker",
    "RunHandle",
    "TrackerSpec",
    "NullTracker",
    "flatten_config",
    "redact_params",
    "standard_tags",
    "git_commit",
    "resolve_tracking_uri",
    "rank0_tracker",
    "rank0_attach",
    "registered_model_name",
]

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "densenas"
DEFAULT_LOCAL_DIR_ENV = "DENSENAS_TRACKING_DIR"
MAX_PARAM_VALUE = 6000          # MLflow 3.x limit on a param value
MAX_SPOOL_ARTIFACT_BYTES = 256 << 20  # larger artifacts are referenced in place, not copied
TAG_RUN_ID = "densenas.run_id"
TAG_STAGE = "densenas.stage"
TAG_FINGERPRINT = "densenas.fingerprint"
TAG_GIT_COMMIT = "densenas.git_commit"
TAG_TRIAL = "densenas.trial"
TAG_CONFIG = "densenas.config_sha256"
TAG_ARCH = "densenas.arch"

# key fragments that mark a value as secret (matched on each flattened key component)
_SECRET_KEY = re.compile(
    r"(secret|passw(or)?d|passwd|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|"
    r"auth|session[_-]?key|signature|cookie|bearer)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_URL_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
    r"access_token|api_key|apikey|key|password|secret)=)(?P<value>[^&\s]+)", re.IGNORECASE)
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)
REDACTED = "***"


# ------------------------------------------------------------------------------ params and tags


def flatten_config(config: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts/lists (or pydantic models / dataclasses) -> {"a.b.0.c": value}.

    Lists of scalars stay one JSON value (``[3, 5, 7]``); lists with nested structure are indexed.
    """
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    out: dict[str, Any] = {}
    if isinstance(config, Mapping):
        for key, value in config.items():
            out.update(flatten_config(value, f"{prefix}{sep}{key}" if prefix else str(key), sep))
        if not config and prefix:
            out[prefix] = "{}"
    elif isinstance(config, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in config):
            out[prefix] = json.dumps(list(config), default=str)
        else:
            for index, value in enumerate(config):
                out.update(flatten_config(value, f"{prefix}{sep}{index}" if prefix else str(index), sep))
    else:
        out[prefix or "value"] = config
    return out


def _env_secrets() -> list[str]:
    values = []
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and value and len(value) >= 8 and not name.endswith(("_PATH", "_FILE", "_MODE")):
            values.append(value)
    return values


def _scrub_value(text: str, secrets_: list[str]) -> str:
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _URL_SECRET_QUERY.sub(lambda m: f"{m.group('key')}{REDACTED}", text)
    for secret in secrets_:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_params(params: Mapping[str, Any], extra_secrets: tuple[str, ...] = ()) -> dict[str, str]:
    """Params as MLflow strings with secrets removed (see module docstring for the rules)."""
    secrets_ = _env_secrets() + [s for s in extra_secrets if s]
    out: dict[str, str] = {}
    for key, value in params.items():
        key = str(key)
        components = re.split(r"[.\-/]", key)
        if any(_SECRET_KEY.search(c) for c in components) and value not in (None, "", False):
            out[key] = REDACTED
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str) if not isinstance(value, (int, float, bool)) or value is None else str(value)
        text = _scrub_value(text, secrets_)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 15] + "...[truncated]"
        out[key] = text
    return out


def git_commit(repo_dir: str | os.PathLike | None = None) -> str:
    """The checkout's commit (``+dirty`` when it has changes), or ``unknown`` outside git."""
    cwd = str(repo_dir or Path(__file__).resolve().parents[1])
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{sha}+dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standard_tags(run_id: Optional[str] = None, stage: Optional[str] = None,
                  fingerprint: Optional[str] = None, trial: Optional[str] = None,
                  commit: Optional[str] = None) -> dict[str, str]:
    """The project's tags: pipeline run id, stage, stage fingerprint, sweep trial, git commit."""
    tags = {TAG_GIT_COMMIT: commit or git_commit()}
    for name, value in ((TAG_RUN_ID, run_id), (TAG_STAGE, stage), (TAG_FINGERPRINT, fingerprint), (TAG_TRIAL, trial)):
        if value is not None:
            tags[name] = str(value)
    return tags


# ---------------------------------------------------------------------------------- tracking URI


def _default_local_dir() -> Path:
    env = os.environ.get(DEFAULT_LOCAL_DIR_ENV)
    return Path(env).expanduser().resolve() if env else (Path.cwd() / ".densenas-tracking").resolve()


def resolve_tracking_uri(uri: Optional[str] = None, local_dir: str | os.PathLike | None = None) -> str:
    """Explicit URI > $MLFLOW_TRACKING_URI > ``sqlite:///<local_dir>/mlflow.db``.

    Plain paths and file:// URIs (MLflow's file store, refused in 3.17) become a SQLite file there.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        base = Path(local_dir).expanduser().resolve() if local_dir else _default_local_dir()
        base.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith(("http://", "https://", "sqlite:", "postgresql", "mysql", "mssql", "databricks")):
        return uri
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().resolve()
    if path.suffix == ".db":
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    log.warning("MLflow's plain file store is refused by MLflow 3.17; using sqlite:///%s/mlflow.db instead of %s",
                path, uri)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def _quiet_http_defaults() -> None:
    """MLflow retries HTTP 7 times with backoff factor 2 by default (minutes for a dead server).
    Cap it so an outage is detected in seconds and work goes to the spool; user settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# ----------------------------------------------------------------------------------------- runs


@dataclass
class RunHandle:
    """A run this tracker started (or attached to). ``run_id`` is None until MLflow has it."""

    tracker: "Tracker" = field(repr=False)
    local_id: str
    name: str
    run_id: Optional[str] = None
    parent: Optional["RunHandle"] = field(default=None, repr=False)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(params, run=self)

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        self.tracker.log_metrics(metrics, step=step, run=self)

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.tracker.log_artifact(path, artifact_path, run=self)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(tags, run=self)

    def end(self, status: str = "FINISHED") -> None:
        self.tracker.end_run(status, run=self)


class _Transient(Exception):
    """Internal: the backend could not be reached; spool and retry later."""


@dataclass
class TrackerSpec:
    """Picklable description of a tracker, to open the same tracking in Ray workers / Tune trials."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    spool_dir: Optional[str] = None
    parent_run_id: Optional[str] = None
    run_id: Optional[str] = None      # a run to log into (e.g. the stage run, from its Train workers)

    def open(self) -> "Tracker":
        return Tracker(self.uri, self.experiment, spool_dir=self.spool_dir)


class Tracker:
    """Small MLflow facade: parent/nested runs, params, metrics, artifacts, tags; spools when offline."""

    def __init__(self, uri: Optional[str] = None, experiment: str = DEFAULT_EXPERIMENT,
                 spool_dir: str | os.PathLike | None = None, local_dir: str | os.PathLike | None = None,
                 retry_interval_s: float = 30.0, experiment_id: Optional[str] = None):
        _quiet_http_defaults()
        self._local_dir = Path(local_dir).expanduser().resolve() if local_dir else _default_local_dir()
        try:
            self.uri = resolve_tracking_uri(uri, self._local_dir)
        except OSError as exc:  # unwritable default dir: still never raise
            log.warning("tracking: cannot prepare local tracking dir (%s); tracking to the spool only", exc)
            self.uri = uri or f"sqlite:///{self._local_dir / 'mlflow.db'}"
        self.experiment = experiment
        self.spool_dir = Path(spool_dir).expanduser().resolve() if spool_dir else self._local_dir / "spool"
        self.retry_interval_s = retry_interval_s
        self._lock = threading.RLock()
        self._client = None
        self._experiment_id: Optional[str] = experiment_id   # known already (e.g. handed to a Tune trial)
        self._runs: dict[str, RunHandle] = {}
        self._active: list[RunHandle] = []
        self._offline_until = 0.0
        self._spool_path = self.spool_dir / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._spool_handle = None
        self.dropped = 0      # operations refused by the backend for good (logged as warnings)
        self.spooled = 0      # operations currently waiting in this tracker's spool

    # ---- public API
    @property
    def online(self) -> bool:
        return self.spooled == 0 and time.monotonic() >= self._offline_until

    def spec(self, parent: Optional[RunHandle] = None, run: Optional[RunHandle] = None) -> TrackerSpec:
        return TrackerSpec(self.uri, self.experiment, str(self.spool_dir), parent.run_id if parent else None,
                           run.run_id if run else None)

    @property
    def experiment_id(self) -> Optional[str]:
        """The experiment's MLflow id (created if needed); None while MLflow cannot be reached."""
        try:
            return self._experiment()
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, _Transient):
                self._go_offline(exc)
            return None

    # ---- reads (None when MLflow cannot answer: callers decide without it, nothing raises)
    def _read(self, what: str, fn, *args, **kwargs):
        if time.monotonic() < self._offline_until:
            return None
        try:
            return self._call(fn, *args, **kwargs)
        except _Transient as exc:
            self._go_offline(exc)
        except Exception as exc:  # noqa: BLE001 -- a read never breaks training either
            log.warning("tracking: could not read %s (%s: %s)", what, type(exc).__name__, exc)
        return None

    def metric_steps(self, run: RunHandle, key: str) -> Optional[set[int]]:
        """Steps of ``key`` already in ``run`` (a resumed loop logs only the others); None if unknown."""
        if not run.run_id:
            return None
        history = self._read(f"the history of {key}", lambda: self._mlflow().get_metric_history(run.run_id, key))
        return None if history is None else {int(m.step) for m in history}

    def metric_keys(self, run: RunHandle) -> Optional[set[str]]:
        """Metric names already in ``run``; None if unknown."""
        if not run.run_id:
            return None
        found = self._read("a run", lambda: self._mlflow().get_run(run.run_id))
        return None if found is None else set(found.data.metrics)

    def run_status(self, run_id: str) -> Optional[str]:
        """The MLflow status of ``run_id`` (RUNNING, FINISHED, FAILED, KILLED); None if unknown."""
        found = self._read("a run", lambda: self._mlflow().get_run(run_id))
        return None if found is None else found.info.status

    def find_runs(self, filter_string: str, max_results: int = 10) -> Optional[list]:
        """MLflow ``search_runs`` in this tracker's experiment, newest first; None if unreachable."""
        try:
            experiment = self._experiment()
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, _Transient):
                self._go_offline(exc)
            return None
        return self._read("runs", lambda: self._mlflow().search_runs(
            [experiment], filter_string, max_results=max_results, order_by=["attributes.start_time DESC"]))

    def reopen(self, run_id: str, name: str) -> RunHandle:
        """A handle for an existing run, marked RUNNING again and made active (a rerun under it)."""
        with self._lock:
            handle = self.attach(run_id, name)
            self._active.append(handle)
            self._submit({"op": "reopen", "run": handle.local_id})
            return handle

    def start_run(self, name: str, parent: Optional[RunHandle | str] = None,
                  tags: Optional[Mapping[str, Any]] = None) -> RunHandle:
        """Start a run (nested under ``parent``: a handle or an MLflow run id) and make it active."""
        with self._lock:
            parent_handle = self._as_handle(parent) if parent is not None else None
            handle = RunHandle(self, uuid.uuid4().hex, name, parent=parent_handle)
            self._runs[handle.local_id] = handle
            self._active.append(handle)
            self._submit({"op": "create_run", "run": handle.local_id, "name": name,
                          "parent": parent_handle.local_id if parent_handle else None,
                          "parent_run_id": parent_handle.run_id if parent_handle else None,
                          "tags": {str(k): str(v) for k, v in (tags or {}).items()},
                          "ts": _now_ms()})
            return handle

    @contextlib.contextmanager
    def run(self, name: str, parent: Optional[RunHandle | str] = None,
            tags: Optional[Mapping[str, Any]] = None) -> Iterator[RunHandle]:
        """``with tracker.run("search", parent=p) as r:`` -- FAILED if the block raises, else FINISHED."""
        handle = self.start_run(name, parent=parent, tags=tags)
        try:
            yield handle
        except BaseException as exc:
            self.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", run=handle)
            raise
        self.end_run("FINISHED", run=handle)

    def attach(self, run_id: str, name: str = "attached") -> RunHandle:
        """A handle for an existing MLflow run (e.g. the parent run, in a Ray worker)."""
        with self._lock:
            handle = RunHandle(self, uuid.uuid4().hex, name, run_id=run_id)
            self._runs[handle.local_id] = handle
            return handle

    def log_params(self, params: Mapping[str, Any], run: Optional[RunHandle] = None) -> None:
        safe = redact_params(params)
        self._submit_for(run, {"op": "params", "params": safe})

    def log_config(self, config: Any, run: Optional[RunHandle] = None) -> None:
        """The flattened resolved config as params (secrets filtered)."""
        self.log_params(flatten_config(config), run=run)

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None,
                    run: Optional[RunHandle] = None) -> None:
        values = {}
        for key, value in metrics.items():
            try:
                number = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                log.warning("tracking: metric %r has non-numeric value %r; skipped", key, value)
                continue
            values[str(key)] = number if math.isfinite(number) else (float("nan") if math.isnan(number) else number)
        if values:
            self._submit_for(run, {"op": "metrics", "metrics": values, "step": int(step or 0), "ts": _now_ms()})

    def set_tags(self, tags: Mapping[str, Any], run: Optional[RunHandle] = None) -> None:
        self._submit_for(run, {"op": "tags", "tags": {str(k): str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None,
                     run: Optional[RunHandle] = None) -> None:
        """A file or a directory (its contents) as artifacts of the run."""
        path = Path(path)
        if not path.exists():
            log.warning("tracking: artifact %s does not exist; skipped", path)
            return
        self._submit_for(run, {"op": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path})

    def log_dataset(self, name: str, digest: str, source: str, *, context: str = "training",
                    schema: Optional[Mapping[str, Any]] = None, profile: Optional[Mapping[str, Any]] = None,
                    source_type: str = "densenas-split", run: Optional[RunHandle] = None) -> None:
        """A dataset input of the run (MLflow's Datasets panel): name, digest, where it lives, its counts."""
        self._submit_for(run, {"op": "dataset", "name": str(name), "digest": str(digest)[:36],
                               "source": _scrub_value(str(source), _env_secrets()), "source_type": source_type,
                               "context": context, "schema": json.dumps(schema or {}, default=str),
                               "profile": json.dumps(profile or {}, default=str)})

    def register_model(self, model_name: str, artifact_path: str, tags: Optional[Mapping[str, Any]] = None,
                       description: str = "", run: Optional[RunHandle] = None) -> None:
        """Register ``runs:/<run>/<artifact_path>`` as a new version of ``model_name`` (created on first use),
        after the artifacts logged before it (same queue, same order when spooled)."""
        self._submit_for(run, {"op": "register", "model_name": model_name, "artifact_path": artifact_path,
                               "tags": {str(k): str(v) for k, v in (tags or {}).items()},
                               "description": description})

    def end_run(self, status: str = "FINISHED", run: Optional[RunHandle] = None) -> None:
        """End ``run`` (default: the active run) with FINISHED | FAILED | KILLED."""
        status = status.upper()
        if status not in ("FINISHED", "FAILED", "KILLED"):
            log.warning("tracking: unknown run status %r; using FAILED", status)
            status = "FAILED"
        with self._lock:
            handle = run or (self._active[-1] if self._active else None)
            if handle is None:
                log.warning("tracking: end_run with no active run; ignored")
                return
            self._submit({"op": "end_run", "run": handle.local_id, "status": status, "ts": _now_ms()})
            if handle in self._active:
                self._active.remove(handle)

    def flush(self, include_orphans: bool = True) -> bool:
        """Try to send everything spooled (ours, and spools left by dead processes). True if empty."""
        with self._lock:
            ok = self._replay_own()
            if ok and include_orphans:
                self._replay_orphans()
            return ok

    def close(self) -> None:
        """Flush what can be sent; what cannot stays in the spool for a later tracker."""
        with self._lock:
            self.flush()
            if self._spool_handle is not None:
                self._spool_handle.close()
                self._spool_handle = None

    # ---- internals: dispatch
    def _as_handle(self, run: RunHandle | str) -> RunHandle:
        if isinstance(run, RunHandle):
            return run
        for handle in self._runs.values():
            if handle.run_id == run:
                return handle
        return self.attach(str(run), name="parent")

    def _submit_for(self, run: Optional[RunHandle], op: dict) -> None:
        with self._lock:
            handle = run or (self._active[-1] if self._active else None)
            if handle is None:
                log.warning("tracking: %s with no active run; start_run first. Dropped.", op["op"])
                self.dropped += 1
                return
            if handle.local_id not in self._runs:
                self._runs[handle.local_id] = handle
            op["run"] = handle.local_id
            self._submit(op)

    def _submit(self, op: dict) -> None:
        """Send now if online (after replaying the spool), else append to the spool. Never raises."""
        try:
            if self.spooled and time.monotonic() >= self._offline_until:
                self._replay_own()
            if self.spooled or time.monotonic() < self._offline_until:
                self._spool(op)
                return
            try:
                self._apply(op)
            except _Transient as exc:
                self._go_offline(exc)
                self._spool(op)
        except Exception as exc:  # noqa: BLE001 -- tracking must never break training
            log.warning("tracking: could not record %s (%s: %s); dropped", op.get("op"), type(exc).__name__, exc)
            self.dropped += 1

    def _go_offline(self, exc: BaseException) -> None:
        self._offline_until = time.monotonic() + self.retry_interval_s
        log.warning("tracking: MLflow at %s unreachable (%s); spooling to %s, retrying in %.0f s",
                    _safe_uri(self.uri), exc, self._spool_path, self.retry_interval_s)
        print(f"[tracking] MLflow unreachable; buffering to {self._spool_path}", flush=True)

    # ---- internals: MLflow calls
    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)  # never a process-global registry
        return self._client

    def _call(self, fn, *args, **kwargs):
        """One MLflow call; reachability problems become _Transient, refusals are re-raised."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            code = getattr(exc, "error_code", "") or ""
            if code in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                        "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"):
                raise
            raise _Transient(f"{code}: {str(exc)[:300]}") from exc
        except (OSError, ConnectionError, TimeoutError) as exc:
            raise _Transient(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        except Exception as exc:  # requests / sqlalchemy operational errors
            name = type(exc).__name__
            if any(word in name for word in ("Connection", "Timeout", "Operational", "Retry", "HTTP")):
                raise _Transient(f"{name}: {str(exc)[:300]}") from exc
            raise

    @property
    def experiment_id(self) -> Optional[str]:
        """The experiment's MLflow id, once a call has resolved it (None before)."""
        return self._experiment_id

    def _experiment(self) -> str:
        if self._experiment_id is None:
            client = self._mlflow()
            experiment = self._call(client.get_experiment_by_name, self.experiment)
            if experiment is None:
                from mlflow.exceptions import MlflowException

                location = None
                if self.uri.startswith("sqlite:"):
                    # local mode: keep artifacts beside the database, not in ./mlruns of the cwd
                    location = (Path(self.uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
                try:
                    self._experiment_id = self._call(client.create_experiment, self.experiment,
                                                     artifact_location=location)
                except MlflowException:  # created concurrently by another process
                    experiment = self._call(client.get_experiment_by_name, self.experiment)
                    if experiment is None:
                        raise
                    self._experiment_id = experiment.experiment_id
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _run_id(self, local_id: str, op: dict) -> str:
        handle = self._runs.get(local_id)
        run_id = (handle.run_id if handle else None) or op.get("run_id")
        if not run_id:
            raise RuntimeError(f"run {local_id} was never created in MLflow (its create_run was dropped)")
        return run_id

    def _apply(self, op: dict) -> None:
        """Perform one operation against MLflow (raises _Transient when unreachable)."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        client = self._mlflow()
        kind = op["op"]
        try:
            if kind == "create_run":
                handle = self._runs.get(op["run"])
                if handle is None:  # replaying an orphan spool: rebuild the handle
                    handle = RunHandle(self, op["run"], op["name"])
                    self._runs[op["run"]] = handle
                if handle.run_id:
                    return
                tags = dict(op.get("tags") or {})
                parent_id = op.get("parent_run_id")
                if not parent_id and op.get("parent"):
                    parent = self._runs.get(op["parent"])
                    parent_id = parent.run_id if parent else None
                if parent_id:
                    tags["mlflow.parentRunId"] = parent_id
                run = self._call(client.create_run, self._experiment(), start_time=op.get("ts"),
                                 tags=tags, run_name=op["name"])
                handle.run_id = run.info.run_id
            elif kind == "params":
                run_id = self._run_id(op["run"], op)
                items = [Param(k, v) for k, v in op["params"].items()]
                for start in range(0, len(items), 100):
                    self._call(client.log_batch, run_id, params=items[start:start + 100])
            elif kind == "metrics":
                run_id = self._run_id(op["run"], op)
                items = [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
                for start in range(0, len(items), 1000):
                    self._call(client.log_batch, run_id, metrics=items[start:start + 1000])
            elif kind == "tags":
                run_id = self._run_id(op["run"], op)
                self._call(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
            elif kind == "artifact":
                run_id = self._run_id(op["run"], op)
                path = Path(op["path"])
                if not path.exists():
                    log.warning("tracking: artifact %s vanished before it could be sent; skipped", path)
                    return
                if path.is_dir():
                    self._call(client.log_artifacts, run_id, str(path), op.get("artifact_path"))
                else:
                    self._call(client.log_artifact, run_id, str(path), op.get("artifact_path"))
            elif kind == "end_run":
                run_id = self._run_id(op["run"], op)
                self._call(client.set_terminated, run_id, op["status"], end_time=op.get("ts"))
            elif kind == "reopen":
                self._call(client.update_run, self._run_id(op["run"], op), status="RUNNING")
            elif kind == "dataset":
                from mlflow.entities import Dataset, DatasetInput, InputTag

                dataset = Dataset(name=op["name"], digest=op["digest"], source_type=op["source_type"],
                                  source=json.dumps({"uri": op["source"]}), schema=op["schema"],
                                  profile=op["profile"])
                self._call(client.log_inputs, self._run_id(op["run"], op),
                           datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", op["context"])])])
            elif kind == "register":
                self._register(client, self._run_id(op["run"], op), op)
            else:
                log.warning("tracking: unknown spooled operation %r; skipped", kind)
        except MlflowException as exc:
            log.warning("tracking: MLflow refused %s (%s); dropped (retrying would not help)", kind, exc)
            self.dropped += 1

    def _register(self, client, run_id: str, op: dict) -> None:
        from mlflow.exceptions import MlflowException

        name = op["model_name"]
        try:
            self._call(client.create_registered_model, name,
                       description=f"DenseNAS derived networks of experiment {self.experiment!r}: a version per run")
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self._call(client.get_run, run_id).info.artifact_uri.rstrip('/')}/{op['artifact_path']}"
        version = self._call(client.create_model_version, name, source, run_id=run_id, tags=op.get("tags") or None,
                             description=op.get("description") or None)
        log.info("tracking: registered %s version %s from run %s", name, version.version, run_id)

    # ---- internals: spool
    def _spool(self, op: dict) -> None:
        op = dict(op)
        handle = self._runs.get(op.get("run", ""))
        if handle is not None and handle.run_id:
            op["run_id"] = handle.run_id  # so a replay in another process can find the run
        if op["op"] == "create_run" and op.get("parent"):
            parent = self._runs.get(op["parent"])
            if parent is not None and parent.run_id:
                op["parent_run_id"] = parent.run_id
        if op["op"] == "artifact":
            op = self._stash_artifact(op)
        if self._spool_handle is None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self._spool_handle = open(self._spool_path, "a", encoding="utf-8")
            # held while we live: other trackers only replay spools nobody holds (orphans)
            fcntl.flock(self._spool_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._spool_handle.write(json.dumps(op) + "\n")
        self._spool_handle.flush()
        os.fsync(self._spool_handle.fileno())
        self.spooled += 1

    def _stash_artifact(self, op: dict) -> dict:
        """Copy the artifact beside the spool: the original may be gone or changed by replay time."""
        src = Path(op["path"])
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) if src.is_dir() else src.stat().st_size
        if size > MAX_SPOOL_ARTIFACT_BYTES:
            log.warning("tracking: artifact %s is %.0f MB; spooled by reference (keep the file)", src, size / 2**20)
            return op
        dest = self.spool_dir / "artifacts" / uuid.uuid4().hex / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        return {**op, "path": str(dest), "stashed": True}

    def _replay_file(self, path: Path, ops: list[dict]) -> int:
        """Apply ``ops`` in order; returns how many were sent before the backend failed again."""
        for index, op in enumerate(ops):
            try:
                self._apply(op)
            except _Transient as exc:
                self._go_offline(exc)
                return index
            except Exception as exc:  # noqa: BLE001
                log.warning("tracking: spooled %s could not be replayed (%s); dropped", op.get("op"), exc)
                self.dropped += 1
            if op.get("stashed"):
                shutil.rmtree(Path(op["path"]).parent, ignore_errors=True)
        return len(ops)

    def _replay_own(self) -> bool:
        if not self.spooled:
            return True
        ops = [json.loads(line) for line in self._spool_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        sent = self._replay_file(self._spool_path, ops)
        remaining = ops[sent:]
        # rewrite the spool with what is left (the lock stays on the same open handle's inode)
        self._spool_handle.seek(0)
        self._spool_handle.truncate()
        for op in remaining:
            self._spool_handle.write(json.dumps(op) + "\n")
        self._spool_handle.flush()
        self.spooled = len(remaining)
        if not remaining:
            self._offline_until = 0.0
            print(f"[tracking] MLflow reachable again; sent {sent} buffered operation(s)", flush=True)
        return not remaining

    def _replay_orphans(self) -> None:
        if not self.spool_dir.is_dir():
            return
        for path in sorted(self.spool_dir.glob("spool-*.jsonl")):
            if path == self._spool_path:
                continue
            with open(path, "r+", encoding="utf-8") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its tracker is alive and will send it itself
                ops = [json.loads(line) for line in handle.read().splitlines() if line.strip()]
                log.warning("tracking: replaying %d operation(s) left in %s", len(ops), path)
                sent = self._replay_file(path, ops)
                if sent == len(ops):
                    path.unlink(missing_ok=True)
                    continue
                handle.seek(0)
                handle.truncate()
                handle.writelines(json.dumps(op) + "\n" for op in ops[sent:])
                return

    def __del__(self):  # best effort: never raise from a finaliser
        with contextlib.suppress(Exception):
            if self._spool_handle is not None:
                self._spool_handle.close()


class NullTracker(Tracker):
    """Does nothing (non-zero Ray Train ranks, or tracking disabled); same interface."""

    def __init__(self, *args: Any, **kwargs: Any):  # noqa: D401 -- deliberately inert
        self.uri = ""
        self.experiment = ""
        self._experiment_id = None
        self.dropped = self.spooled = 0
        self._active = []

    def start_run(self, name, parent=None, tags=None):
        return RunHandle(self, uuid.uuid4().hex, name)

    def spec(self, parent=None, run=None):
        return None          # Ray workers of an untracked stage log nothing either

    def _submit(self, op):
        return None

    def _submit_for(self, run, op):
        return None

    def end_run(self, status="FINISHED", run=None):
        return None

    def attach(self, run_id, name="attached"):
        return RunHandle(self, uuid.uuid4().hex, name, run_id=run_id)

    def reopen(self, run_id, name):
        return self.attach(run_id, name)

    def _read(self, what, fn, *args, **kwargs):
        return None

    def find_runs(self, filter_string, max_results=10):
        return None

    def flush(self, include_orphans=True):
        return True

    def close(self):
        return None

    def __del__(self):
        return None


def rank0_tracker(spec: TrackerSpec, name: str, tags: Optional[Mapping[str, Any]] = None,
                  rank: Optional[int] = None) -> tuple[Tracker, RunHandle]:
    """For a Ray Train loop: on world rank 0, a tracker with a run nested under ``spec.parent_run_id``;
    on other ranks an inert NullTracker (so every rank can call the same code)."""
    if rank is None:
        try:
            import ray.train

            rank = ray.train.get_context().get_world_rank()
        except Exception:  # noqa: BLE001 -- not inside Ray Train: act as rank 0
            rank = 0
    if rank != 0:
        tracker: Tracker = NullTracker()
        return tracker, tracker.start_run(name)
    tracker = spec.open()
    handle = tracker.start_run(name, parent=spec.parent_run_id, tags=tags)
    return tracker, handle


def rank0_attach(spec: Optional[TrackerSpec], rank: Optional[int] = None) -> tuple[Tracker, RunHandle]:
    """For a Ray Train loop that logs into an existing run (``spec.run_id``, e.g. its stage's run): on
    world rank 0 a tracker attached to it, elsewhere (or without a spec / run id) an inert NullTracker."""
    if rank is None:
        try:
            import ray.train

            rank = ray.train.get_context().get_world_rank()
        except Exception:  # noqa: BLE001 -- not inside Ray Train: act as rank 0
            rank = 0
    if rank != 0 or spec is None or not spec.run_id:
        tracker: Tracker = NullTracker()
        return tracker, tracker.attach("", "inert")
    tracker = spec.open()
    return tracker, tracker.attach(spec.run_id, "stage")


def registered_model_name(experiment: str) -> str:
    """The Model Registry name of an experiment's derived networks (one registered model per experiment)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{experiment}-net")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe_uri(uri: str) -> str:
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", uri)
