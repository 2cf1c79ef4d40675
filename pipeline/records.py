"""The run record ``runs/<run_id>/run.json`` and what reads it: ``status`` and ``inspect``.

run.json (format ``densenas-run/1``), rewritten (atomically) at every stage transition::

    run_id, name, created_at, updated_at, status (running | finished | failed | incomplete | interrupted)
    config          the resolved config (storage / tracking URIs filled in)
    mlflow          {tracking_uri, experiment, parent_run_id, url}
    stages.<name>   {state, fingerprint, started_at, finished_at, duration_s, attempts, resumed,
                     checkpoint_uri, manifest_uri, mlflow_run_id, node_ids, metrics, error, reason}
    history         [{time, event}]  (started, resumed, stage transitions)

A pointer ``runs/_index/<run_id>.json`` (name, created, status) lets ``status`` list runs without
listing every artifact of every run.

Ownership: ``runs/<run_id>/lease.json`` (``RunLease``) is created with a conditional put (create only
if absent) by the driver that runs the run, and its ``heartbeat_at`` is renewed every
``ttl_s / 4`` seconds by a thread. A second live submission of the same run id is refused at once,
naming the holder (``LeaseHeld``). A lease whose heartbeat is older than ``ttl_s`` -- or, seen from the holder's own host, whose
process is gone -- belongs to a lost driver (``kill -9``, a dead node): ``status`` shows the run as ``interrupted (driver lost)`` and the
next submission (``--resume`` to continue from the checkpoints) takes the lease over. A clean end,
failure or interruption deletes the lease.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

__all__ = ["RunRecord", "default_run_id", "validate_run_id", "list_runs", "format_status", "format_runs",
           "inspect_run", "format_inspect", "RunNotFound", "InvalidRunId", "RunLease", "LeaseHeld",
           "effective_status", "run_exists", "DRIVER_LOST"]

FORMAT = "densenas-run/1"
STATES_DONE = ("finished", "cached")
RUN_ID_MAX = 100
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LEASE = "lease.json"
DEFAULT_LEASE_TTL_S = 120.0
DRIVER_LOST = "interrupted (driver lost)"


class RunNotFound(LookupError):
    pass


class InvalidRunId(ValueError):
    pass


class LeaseHeld(RuntimeError):
    """Another live driver holds the run id."""


def validate_run_id(run_id: str) -> str:
    """A run id is one path segment: letters, digits, ``_ . -``, starting with a letter or digit, at
    most ``RUN_ID_MAX`` characters (it names a store prefix and MLflow runs)."""
    if not isinstance(run_id, str) or not run_id:
        raise InvalidRunId("run id is empty; give --run-id NAME (letters, digits, _ . -)")
    if len(run_id) > RUN_ID_MAX:
        raise InvalidRunId(f"run id is {len(run_id)} characters long; the limit is {RUN_ID_MAX}: choose a shorter "
                           "--run-id")
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise InvalidRunId(f"run id {run_id!r} may only hold letters, digits, '_', '.', '-' (no '/', no '..') and "
                           "must start with a letter or digit; choose another --run-id")
    return run_id


def default_run_id(name: str) -> str:
    """A stable run id from the config name, so rerunning a config reuses its run (and its cache)."""
    rid = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:RUN_ID_MAX]
    if not rid:
        raise InvalidRunId(f"config name {name!r} gives an empty run id; pass --run-id")
    return validate_run_id(rid)


def run_exists(store: Any, run_id: str) -> bool:
    return bool(store.exists(f"runs/{run_id}/run.json"))


def _lease_ttl() -> float:
    return float(os.environ.get("DENSENAS_LEASE_TTL_S") or DEFAULT_LEASE_TTL_S)


def _process_start(pid: int) -> int | None:
    """Kernel start time of ``pid`` (with the pid, it names one process; None when it does not exist)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _holder_text(doc: Mapping[str, Any]) -> str:
    job = doc.get("ray_job") or doc.get("submission_id")
    return (f"pid {doc.get('pid')} on {doc.get('host')}" + (f" (Ray job {job})" if job else "")
            + f", started {_iso(doc.get('acquired_at'))}")


class RunLease:
    """The lease on ``runs/<run_id>/`` held by the driver running it (see the module doc)."""

    def __init__(self, store: Any, run_id: str, ttl_s: float | None = None,
                 log: Callable[[str], None] = lambda m: None):
        self.store = store
        self.run_id = run_id
        self.key = f"runs/{run_id}/{LEASE}"
        self.ttl_s = float(ttl_s if ttl_s is not None else _lease_ttl())
        self.token = uuid.uuid4().hex
        self.log = log
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.doc = {"token": self.token, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                    "pid_start": _process_start(os.getpid()),
                    "ray_job": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID"),
                    "acquired_at": _now(), "heartbeat_at": _now(), "ttl_s": self.ttl_s}

    @staticmethod
    def read(store: Any, run_id: str) -> dict | None:
        try:
            doc = store.get_json(f"runs/{run_id}/{LEASE}", verify=False)
        except Exception:
            return None
        return doc if isinstance(doc, dict) else None

    @staticmethod
    def is_stale(doc: Mapping[str, Any], now: float | None = None) -> bool:
        """The holder is gone: its heartbeat is older than its ttl, or (seen from its own host, where
        that is known at once) its process no longer exists."""
        age = (now or time.time()) - float(doc.get("heartbeat_at") or 0)
        if age > float(doc.get("ttl_s") or DEFAULT_LEASE_TTL_S):
            return True
        if doc.get("host") == socket.gethostname() and doc.get("pid"):
            return _process_start(int(doc["pid"])) != doc.get("pid_start")
        return False

    def check_free(self) -> None:
        """``LeaseHeld`` when a live driver holds the run id now (the cheap early check; ``acquire`` decides)."""
        cur = self.read(self.store, self.run_id)
        if cur is not None and cur.get("token") != self.token and not self.is_stale(cur):
            raise LeaseHeld(self._held_message(cur))

    def _held_message(self, cur: Mapping[str, Any]) -> str:
        age = time.time() - float(cur.get("heartbeat_at") or 0)
        return (f"run {self.run_id!r} is being run by {_holder_text(cur)}; its last heartbeat was {age:.0f} s ago. "
                f"Wait for it (python -m pipeline status {self.run_id}), stop it (ray job stop), or use another "
                f"--run-id")

    def acquire(self) -> "RunLease":
        """Take the lease, or raise ``LeaseHeld`` naming the live holder; a stale lease is taken over."""
        for _ in range(3):
            if self.store.put_json_if_absent(self.key, self.doc):
                return self._confirmed()
            cur = self.read(self.store, self.run_id)
            if cur is None:          # released between our put and our read: try again
                continue
            if cur.get("token") == self.token:   # our own put, retried after a lost reply
                return self._confirmed()
            if not self.is_stale(cur):
                raise LeaseHeld(self._held_message(cur))
            self.log(f"lease: the driver of run {self.run_id!r} ({_holder_text(cur)}) stopped sending heartbeats "
                     f"{time.time() - float(cur.get('heartbeat_at') or 0):.0f} s ago; taking the run over")
            self.store.put_json(self.key, self.doc)
            time.sleep(0.2)      # another taker racing us overwrites within this window: check who won
            return self._confirmed()
        raise LeaseHeld(f"run {self.run_id!r}: could not take its lease (it changed hands repeatedly); retry")

    def _confirmed(self) -> "RunLease":
        cur = self.read(self.store, self.run_id)
        if cur is None or cur.get("token") != self.token:
            holder = _holder_text(cur) if cur else "nobody"
            raise LeaseHeld(f"run {self.run_id!r} was taken over at the same moment by {holder}; retry later")
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        interval = max(self.ttl_s / 4.0, 0.2)
        while not self._stop.wait(interval):
            try:
                cur = self.read(self.store, self.run_id)
                if cur is not None and cur.get("token") != self.token:
                    self.lost = True
                    self.log(f"lease: run {self.run_id!r} was taken over by {_holder_text(cur)}; this driver no "
                             "longer owns it")
                    return
                self.doc["heartbeat_at"] = _now()
                self.store.put_json(self.key, self.doc)
            except Exception as e:  # noqa: BLE001 -- a store blip must not kill the run; retried next beat
                self.log(f"lease: heartbeat failed ({type(e).__name__}: {e}); retrying")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost:
            return
        try:
            cur = self.read(self.store, self.run_id)
            if cur is not None and cur.get("token") == self.token:
                self.store.delete(self.key)
        except Exception as e:  # noqa: BLE001 -- a lease left behind goes stale and is taken over
            self.log(f"lease: could not release ({type(e).__name__}: {e}); it expires in {self.ttl_s:.0f} s")

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def effective_status(store: Any, run_id: str, status: str | None) -> str:
    """The record's status, except a ``running`` run whose driver is gone (no lease, or a lease whose
    heartbeat stopped) is ``interrupted (driver lost)``."""
    if status != "running":
        return str(status)
    lease = RunLease.read(store, run_id)
    if lease is None or RunLease.is_stale(lease):
        return DRIVER_LOST
    return status


def _now() -> float:
    return round(time.time(), 3)


def _iso(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


class RunRecord:
    def __init__(self, store: Any, run_id: str, doc: dict):
        self.store = store
        self.run_id = run_id
        self.doc = doc

    # ----------------------------------------------------------------- load / save
    @classmethod
    def open(cls, store: Any, run_id: str, cfg: Any) -> "RunRecord":
        key = f"runs/{run_id}/run.json"
        if store.exists(key):
            doc = store.get_json(key)
        else:
            doc = {"format": FORMAT, "run_id": run_id, "created_at": _now(), "stages": {}, "history": []}
        doc["name"] = cfg.name
        doc["config"] = cfg.dump()
        doc.setdefault("stages", {})
        doc.setdefault("history", [])
        return cls(store, run_id, doc)

    @classmethod
    def load(cls, store: Any, run_id: str) -> "RunRecord":
        key = f"runs/{run_id}/run.json"
        if not store.exists(key):
            runs = ", ".join(r["run_id"] for r in list_runs(store)) or "none"
            raise RunNotFound(f"no run {run_id!r} in {store.uri_for('runs/')} (runs: {runs})")
        return cls(store, run_id, store.get_json(key))

    def save(self) -> None:
        self.doc["updated_at"] = _now()
        self.store.publish_json(f"runs/{self.run_id}/run.json", self.doc)
        self.store.publish_json(f"runs/_index/{self.run_id}.json", {
            "run_id": self.run_id, "name": self.doc.get("name"), "created_at": self.doc.get("created_at"),
            "updated_at": self.doc["updated_at"], "status": self.doc.get("status")})

    # ----------------------------------------------------------------- transitions
    @property
    def stages(self) -> dict[str, dict]:
        return self.doc["stages"]

    @property
    def status(self) -> str:
        return self.doc.get("status", "unknown")

    def _event(self, event: str) -> None:
        self.doc["history"].append({"time": _now(), "event": event})
        del self.doc["history"][:-200]

    def start(self, resume: bool) -> None:
        self.doc["status"] = "running"
        self._event("resumed" if resume else "started")

    def set_tracking(self, tracker: Any, cfg: Any) -> None:
        self.doc["mlflow"] = {"tracking_uri": cfg.tracking.uri if cfg.tracking.enabled else None,
                              "experiment": cfg.tracking.experiment,
                              "parent_run_id": tracker.run_id,
                              "url": tracker.url}

    def stage_event(self, name: str, state: str, fingerprint: str, reason: str = "") -> None:
        s = self.stages.setdefault(name, {})
        s.update({"state": state, "fingerprint": fingerprint, "reason": reason})
        self._event(f"{name}: {state}" + (f" ({reason})" if reason else ""))
        self.save()

    def stage_cached(self, name: str, manifest: Mapping[str, Any]) -> None:
        s = self.stages.setdefault(name, {})
        prev = {k: s.get(k) for k in ("attempts", "mlflow_run_id")}
        s.clear()
        s.update(_from_manifest(manifest), state="cached", attempts=prev["attempts"] or 0,
                 mlflow_run_id=prev["mlflow_run_id"])
        self._event(f"{name}: cached")
        self.save()

    def stage_started(self, name: str, fingerprint: str, resume: bool, checkpoint_uri: str,
                      mlflow_run_id: str | None) -> None:
        s = self.stages.setdefault(name, {})
        attempts = int(s.get("attempts") or 0) + 1
        s.clear()
        s.update({"state": "running", "fingerprint": fingerprint, "started_at": _now(), "attempts": attempts,
                  "resumed": resume, "checkpoint_uri": checkpoint_uri, "mlflow_run_id": mlflow_run_id})
        self._event(f"{name}: running" + (" (resumed)" if resume else ""))
        self.save()

    def stage_failed(self, name: str, state: str, error: str, tb: str) -> None:
        s = self.stages.setdefault(name, {})
        s.update({"state": state, "finished_at": _now(), "error": error, "traceback": tb[-4000:]})
        if s.get("started_at"):
            s["duration_s"] = round(s["finished_at"] - s["started_at"], 3)
        self._event(f"{name}: {state}: {error}")
        self.save()

    def stage_finished(self, name: str, manifest: Mapping[str, Any]) -> None:
        s = self.stages.setdefault(name, {})
        keep = {k: s.get(k) for k in ("attempts", "mlflow_run_id", "resumed", "checkpoint_uri")}
        s.clear()
        s.update(_from_manifest(manifest), state="finished", **keep)
        self._event(f"{name}: finished")
        self.save()

    def finish(self, stages: Iterable[str] | None = None) -> None:
        """Set the run's status from the states of ``stages`` (this invocation's; None: all). A stage
        left out of this invocation (``--stages``) keeps its entry but does not decide the status."""
        names = set(self.stages) if stages is None else set(stages)
        states = [s.get("state") for n, s in self.stages.items() if n in names]
        if any(st == "interrupted" for st in states):
            self.doc["status"] = "interrupted"
        elif any(st in ("failed",) for st in states):
            self.doc["status"] = "failed"
        elif any(st in ("unavailable", "blocked", "running") for st in states):
            self.doc["status"] = "incomplete"
        else:
            self.doc["status"] = "finished"
        self._event(f"run {self.doc['status']}")
        self.save()


def _from_manifest(m: Mapping[str, Any]) -> dict:
    t = m.get("timings", {})
    return {"fingerprint": m.get("fingerprint"), "started_at": t.get("started_at"),
            "finished_at": t.get("finished_at"), "duration_s": t.get("duration_s"),
            "manifest_uri": (m.get("store_uri", "").rstrip("/") + "/manifest.json") if m.get("store_uri") else None,
            "store_uri": m.get("store_uri"), "node_ids": m.get("node_ids", []),
            "metrics": m.get("metrics", {}), "artifacts": len(m.get("artifacts") or {}),
            "error": None}


# --------------------------------------------------------------------------- status
def _ordered(doc: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """Stages in graph order (``stage_order``), then any others by name."""
    stages = doc.get("stages", {})
    order = [n for n in doc.get("stage_order", []) if n in stages]
    return [(n, stages[n]) for n in order + sorted(set(stages) - set(order))]


def list_runs(store: Any) -> list[dict]:
    runs = []
    for key in store.list("runs/_index/"):
        if key.endswith(".json"):
            try:
                doc = store.get_json(key)
                doc["status"] = effective_status(store, doc.get("run_id"), doc.get("status"))
                runs.append(doc)
            except Exception:
                continue
    return sorted(runs, key=lambda r: r.get("updated_at") or 0, reverse=True)


def format_runs(runs: list[dict]) -> str:
    if not runs:
        return "no runs yet (start one: python pipeline/run.py --config configs/tiny.yaml)"
    lines = [f"{'run id':<24} {'name':<20} {'status':<11} updated"]
    for r in runs:
        lines.append(f"{r['run_id']:<24} {str(r.get('name')):<20} {str(r.get('status')):<25} "
                     f"{_iso(r.get('updated_at'))}")
    return "\n".join(lines)


def _key_metrics(metrics: Mapping[str, Any], n: int = 4) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" for k, v in items[:n])


def format_status(doc: Mapping[str, Any]) -> str:
    ml = doc.get("mlflow") or {}
    lines = [f"run {doc['run_id']} ({doc.get('name')}): {doc.get('status')}, created {_iso(doc.get('created_at'))}, "
             f"updated {_iso(doc.get('updated_at'))}"]
    if ml.get("url") or ml.get("parent_run_id"):
        lines.append(f"MLflow: {ml.get('url') or ml.get('tracking_uri')} (run {ml.get('parent_run_id')})")
    lines.append(f"{'stage':<8} {'state':<11} {'fingerprint':<12} {'duration':>9}  metrics / artifacts")
    for name, s in _ordered(doc):
        dur = f"{s['duration_s']:.1f}s" if isinstance(s.get("duration_s"), (int, float)) else "-"
        extra = _key_metrics(s.get("metrics") or {})
        if s.get("store_uri"):
            extra = (extra + "  " if extra else "") + s["store_uri"]
        if s.get("error"):
            extra = f"error: {s['error']}"
        elif s.get("reason") and s.get("state") in ("unavailable", "blocked"):
            extra = s["reason"]
        lines.append(f"{name:<8} {str(s.get('state')):<11} {str(s.get('fingerprint') or '-')[:12]:<12} {dur:>9}  {extra}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- inspect
def inspect_run(store: Any, run_id: str) -> dict:
    """The run's headline results, from the typed outputs of the derive / retrain / search / sweep
    stages that finished. A manifest this version cannot read is named in ``unreadable``."""
    from pydantic import ValidationError

    from jobs.context import output_of
    from jobs.derive import DeriveOutput
    from jobs.retrain import RetrainOutput
    from jobs.search import SearchOutput
    from jobs.sweep import SweepOutput

    rec = RunRecord.load(store, run_id)
    run_store = store.child(f"runs/{run_id}")
    out: dict[str, Any] = {"run_id": run_id, "status": rec.status, "stages": {
        n: s.get("state") for n, s in _ordered(rec.doc)}}

    def output(stage: str, output_type):
        key = f"{stage}/manifest.json"
        if not run_store.exists(key):
            return None, None
        m = run_store.get_json(key)
        if m.get("state") != "finished":
            return None, None
        try:
            return output_of(m, output_type), m.get("store_uri")
        except ValidationError as e:
            out.setdefault("unreadable", {})[stage] = (f"{key} does not match {output_type.__name__} "
                                                       f"({e.error_count()} errors; written by another version?)")
            return None, None

    d, uri = output("derive", DeriveOutput)
    if d:
        out["derived"] = {**d.model_dump(include={"one_line", "official", "arch", "predicted_latency",
                                                  "latency_units", "params", "macs"}, exclude_none=True), "uri": uri}
    r, uri = output("retrain", RetrainOutput)
    if r:
        out["retrained"] = {"metrics": r.metrics, "measured_latency_ms": r.measured_latency_ms,
                            "predicted_latency_ms": r.predicted_latency_ms,
                            "plain_latency_ms": (r.measured_latency or {}).get("plain_median"),
                            "latency_protocol": (r.measured_latency or {}).get("protocol"), "uri": uri}
    s, uri = output("search", SearchOutput)
    if s:
        out["search"] = {"metrics": s.metrics, "uri": uri}
    sw, uri = output("sweep", SweepOutput)
    if sw:
        out["sweep"] = {"trials": sw.trials, "uri": uri}
    return out


def format_inspect(info: Mapping[str, Any]) -> str:
    lines = [f"run {info['run_id']}: {info['status']} ("
             + ", ".join(f"{k} {v}" for k, v in info["stages"].items()) + ")"]
    d = info.get("derived")
    if d:
        lines.append(f"derived architecture: {d.get('one_line') or '(no one-line form in the manifest)'}")
        if d.get("official"):
            lines.append(f"  official: {d['official']}")
        bits = []
        if d.get("predicted_latency") is not None:
            bits.append(f"predicted latency {d['predicted_latency']:.4g} {d.get('latency_units') or ''}".rstrip())
        if d.get("params") is not None:
            bits.append(f"params {d['params']:,}")
        if d.get("macs") is not None:
            bits.append(f"MACs {d['macs']:,}")
        if bits:
            lines.append("  " + ", ".join(bits))
        lines.append(f"  artifacts: {d.get('uri')}")
    else:
        lines.append("derived architecture: none yet (the derive stage has not finished)")
    r = info.get("retrained")
    if r:
        m = r["metrics"]
        acc, ms = m.get("test_top1"), r.get("measured_latency_ms")
        lines.append(f"retrained: test top-1 {'-' if acc is None else f'{acc:.4f}'}; "
                     f"measured latency {'-' if ms is None else f'{ms:.4g}'} ms; " + _key_metrics(m, 6))
        d_pred, units = (d or {}).get("predicted_latency"), (d or {}).get("latency_units") or ""
        if r.get("predicted_latency_ms") is not None:  # the latency model's prediction, same protocol as measured
            d_pred, units = r["predicted_latency_ms"], "ms"
        if d_pred is not None and ms is not None:
            if units == "ms":
                lines.append(f"  predicted vs measured: {d_pred:.4g} ms vs {ms:.4g} ms "
                             f"({100 * (d_pred - ms) / ms:+.1f}%), "
                             f"{'within' if abs(d_pred - ms) <= 0.1 * ms else 'outside'} +-10%")
                proto = r.get("latency_protocol") or {}
                if proto:
                    lines.append("  latency protocol: " + ", ".join(f"{k} {proto[k]}" for k in (
                        "device", "batch", "threads", "dtype", "memory_format", "timer", "statistic", "allocator")
                        if k in proto))
                if proto.get("reference", "none") != "none" and proto.get("reference_ms"):
                    plain = r.get("plain_latency_ms")
                    lines.append(f"  measured = the median ratio to the reference {proto['reference']} x its "
                                 f"{proto['reference_ms']:.4g} ms from the profile stage"
                                 + ("" if plain is None else f"; the same forwards' own median now: {plain:.4g} ms"))
            else:   # a MACs proxy is not a latency: show both, compare nothing
                lines.append(f"  predicted cost {d_pred:.4g} {units} (no latency table: search.cost was not "
                             f"'profile'); measured {ms:.4g} ms")
        lines.append(f"  artifacts: {r.get('uri')}")
    else:
        lines.append("retrained: none yet (the retrain stage has not finished)")
    for stage, why in (info.get("unreadable") or {}).items():
        lines.append(f"{stage}: not shown: {why}")
    sw = info.get("sweep")
    if sw and sw["trials"]:
        lines.append("sweep (Pareto front marked *):")
        lines.append(f"  {'lambda':>8} {'tau':>6} {'pred. latency':>14} {'measured ms':>12} {'accuracy':>9}")
        for t in sorted(sw["trials"], key=lambda t: (t.get("predicted_latency") or 0)):
            acc, ms, pred = t.get("accuracy"), t.get("measured_latency_ms"), t.get("predicted_latency")
            lines.append(f"{'*' if t.get('pareto') else ' '} {t.get('lambda', '-'):>8} {t.get('tau', '-'):>6} "
                         f"{'-' if pred is None else f'{pred:.4g}':>14} {'-' if ms is None else f'{ms:.4g}':>12} "
                         f"{'-' if acc is None else f'{acc:.4f}':>9}")
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
