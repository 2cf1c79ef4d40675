"""Per-epoch curves of the Train stages: world rank 0 logs each epoch into its stage's MLflow run.

    curves = EpochCurves(config["tracking"], search_epoch_metrics,   # in the Train loop, every rank
                         stage="search", total=epochs, start=searcher.epoch, describe=describe_search)
    curves.catch_up(searcher.history)      # after a resume: the epochs the run does not hold yet
    ...
    curves.log(record)                     # once per epoch: step = the record's epoch
    curves.close()

``config["tracking"]`` is ``stage_tracking(ctx)``: the picklable ``cluster.tracking.TrackerSpec`` of
the stage's run, made on the driver. Workers on any node log through ``cluster.tracking`` (its spool
and secret filter), never through an MLflow client of their own; on other ranks, or without a run,
everything here is inert. A step the run already holds is never logged again, so a worker group
restarted by Ray Train, or a resumed stage (a new run, caught up from the checkpoint's history),
ends with exactly one point per epoch.

The search also keeps a snapshot of softmax(alpha) and p(edge) per epoch in its store
(``evolution/epoch-NNNN.json``): ``finish_search_pictures`` draws them as ``search_evolution.png``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

from cluster.tracking import NullTracker, TrackerSpec, rank0_attach

__all__ = ["EpochCurves", "stage_tracking", "stage_tracking_or_unrouted", "log_curves_from_driver",
           "search_epoch_metrics", "retrain_epoch_metrics", "describe_search",
           "describe_retrain", "ProgressMetrics",
           "save_arch_snapshot", "finish_search_pictures", "EVOLUTION"]

EVOLUTION = "evolution"          # stage-store folder of the per-epoch alpha / beta snapshots
STEP_KEY = "epoch_seconds"       # logged every epoch: its steps say which epochs the run holds

_SEARCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "expected_latency", "predicted_latency",
                "alpha_entropy", "beta_entropy", "lr", "arch_seconds", "params", "macs")
_RETRAIN_KEYS = ("train_loss", "train_acc", "lr", "img_per_s", "test_top1", "test_top5", "test_loss")


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _pick(record: Mapping[str, Any], keys) -> dict[str, float]:
    return {k: v for k in keys if (v := _number(record.get(k))) is not None}


def search_epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """One search epoch's curve points: losses, accuracies, latencies, entropies, path probability, lr,
    lambda (when the search adapts it), epoch seconds."""
    out = _pick(record, _SEARCH_KEYS)
    path_prob = _number((record.get("derived") or {}).get("path_prob"))
    if path_prob is not None:
        out["path_prob"] = path_prob
    for key in ("lambda", "lambda_"):
        if (lam := _number(record.get(key))) is not None:
            out["lambda"] = lam
    if (sec := _number(record.get("seconds"))) is not None:
        out[STEP_KEY] = sec
    out["warmup"] = 1.0 if record.get("phase") == "warmup" else 0.0
    return out


def retrain_epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """One retrain epoch's curve points: loss, accuracy, lr, images/s, epoch seconds (test top-1 at the end)."""
    out = _pick(record, _RETRAIN_KEYS)
    if (sec := _number(record.get("seconds"))) is not None:
        out[STEP_KEY] = sec
    return out


def stage_tracking(ctx: Any) -> Optional[TrackerSpec]:
    """The stage run's ``TrackerSpec`` (picklable, for the Train loop's config), or None without tracking."""
    spec = ctx.tracker.spec
    return spec if isinstance(spec, TrackerSpec) and spec.run_id else None


def stage_tracking_or_unrouted(ctx: Any) -> tuple[Optional[TrackerSpec], bool]:
    """(``stage_tracking(ctx)``, unrouted): unrouted is True when the stage logs to MLflow but its run has
    no MLflow id yet -- the server was down when the stage started, the run's creation waits in the
    driver's spool -- so the Train workers get no run to log into. The stage then logs the epochs from
    its driver after the Train run (``log_curves_from_driver``), behind the spooled creation."""
    spec = stage_tracking(ctx)
    return spec, spec is None and ctx.tracker.enabled and ctx.tracker.run_id is None


def log_curves_from_driver(ctx: Any, history, metrics_of: Callable[[Mapping[str, Any]], Mapping[str, float]]) -> int:
    """Log each record of ``history`` (the final checkpoint's) at ``step = epoch`` into the stage run
    through the driver's tracker; for a stage whose workers were unrouted. Returns the records logged."""
    n = 0
    for record in history:
        try:
            ctx.tracker.log_metrics(dict(metrics_of(record)), step=int(record["epoch"]))
            n += 1
        except Exception as e:  # noqa: BLE001 -- curves never fail a stage
            print(f"tracking: epoch {record.get('epoch')} not logged ({type(e).__name__}: {e})", flush=True)
    return n


def describe_search(record: Mapping[str, Any]) -> str:
    units = record.get("latency_units") or ""
    path = (record.get("derived") or {}).get("path")
    parts = [f"{record.get('phase', 'search')}", f"val_acc {record.get('val_acc', float('nan')):.3f}"]
    if _number(record.get("expected_latency")) is not None:
        parts.append(f"E[lat] {record['expected_latency']:.3g} {units}".rstrip())
    if path:
        parts.append(f"path {path}")
    return ", ".join(parts)


def describe_retrain(record: Mapping[str, Any]) -> str:
    text = (f"loss {record.get('train_loss', float('nan')):.4f} acc {record.get('train_acc', float('nan')):.3f} "
            f"lr {record.get('lr', float('nan')):.4g} {record.get('img_per_s', 0):.0f} img/s")
    if "test_top1" in record:
        text += f" | test top-1 {record['test_top1']:.3f} top-5 {record.get('test_top5', float('nan')):.3f}"
    return text


def _world_rank() -> int:
    try:
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:  # noqa: BLE001 -- not inside Ray Train: act as rank 0
        return 0


class EpochCurves:
    """Rank 0's per-epoch metrics, ``step = epoch``, each epoch at most once, and its progress line
    (``stage``, ``total`` epochs: one line per epoch with the ETA). Never raises."""

    def __init__(self, spec: Optional[TrackerSpec], metrics_of: Callable[[Mapping[str, Any]], Mapping[str, float]],
                 rank: Optional[int] = None, *, stage: str = "", total: int = 0, start: int = 0,
                 describe: Optional[Callable[[Mapping[str, Any]], str]] = None):
        from jobs.console import EpochProgress, quiet_train_worker

        quiet_train_worker()
        self.rank = _world_rank() if rank is None else rank
        self.tracker, self.run = rank0_attach(spec, self.rank)
        self.metrics_of = metrics_of
        self.active = not isinstance(self.tracker, NullTracker)
        self.progress = EpochProgress(stage, total, start) if stage and self.rank == 0 else None
        self.describe = describe
        self._logged: Optional[set[int]] = None

    def _done(self) -> set[int]:
        if self._logged is None:
            # unknown (MLflow unreachable now): log everything; the run cannot have more than we do
            self._logged = (self.tracker.metric_steps(self.run, STEP_KEY) if self.active else None) or set()
        return self._logged

    def _log(self, record: Mapping[str, Any]) -> bool:
        if not self.active:
            return False
        epoch = int(record["epoch"])
        if epoch in self._done():
            return False
        self.run.log_metrics(self.metrics_of(record), step=epoch)
        self._logged.add(epoch)
        return True

    def log(self, record: Mapping[str, Any]) -> bool:
        """Print the epoch's progress line; log ``record`` at ``step=record["epoch"]`` unless the run
        holds that epoch already."""
        if self.progress is not None:
            try:
                detail = self.describe(record) if self.describe else ""
            except Exception:  # noqa: BLE001 -- a missing field never stops training
                detail = ""
            print(self.progress.line(int(record["epoch"]), detail, _number(record.get("seconds"))), flush=True)
        return self._log(record)

    def catch_up(self, history) -> int:
        """Log the epochs of ``history`` (a resumed state's records) that the run does not hold."""
        return sum(self._log(r) for r in history)

    def close(self) -> None:
        if self.active:
            self.tracker.close()


# --------------------------------------------------------------------------- search evolution
def arch_snapshot(net: Any) -> dict:
    """softmax(alpha) of every mixed op and p(edge) of every edge of a ``SuperNet``, as plain lists."""
    import torch

    with torch.no_grad():
        return {
            "labels": [f"{m.kind} {tuple(m.edge) if m.kind == 'head' else m.block}" for m in net.mixed_ops],
            "alphas": [torch.softmax(m.alpha.detach().float(), 0).tolist() for m in net.mixed_ops],
            "edge_probs": {f"{i}-{j}": float(p.detach()) for (i, j), p in net.edge_probs().items()},
        }


def save_arch_snapshot(store: Any, record: Mapping[str, Any], net: Any) -> None:
    """Rank 0, once per epoch: the epoch's alpha / beta snapshot into ``store/evolution/``."""
    doc = arch_snapshot(net) | {"epoch": int(record["epoch"]), "phase": record.get("phase"),
                                "path": list((record.get("derived") or {}).get("path") or [])}
    store.put_json(f"{EVOLUTION}/epoch-{doc['epoch']:04d}.json", doc)


def finish_search_pictures(store: Any, ctx: Any = None) -> list[str]:
    """Draw ``search_evolution.png`` from the snapshots, keep it in ``store``, log it to the stage run."""
    import tempfile
    from pathlib import Path

    from jobs.diagrams import log_pictures, search_evolution

    keys = sorted(k for k in store.list(EVOLUTION) if k.endswith(".json"))
    if not keys:
        return []
    snaps = [store.get_json(k) for k in keys]
    with tempfile.TemporaryDirectory(prefix="densenas-evolution-") as tmp:
        out = search_evolution(snaps, Path(tmp) / "search_evolution.png")
        store.put_file("search_evolution.png", out)
    log_pictures(ctx, store, ["search_evolution.png"])
    return ["search_evolution.png"]


# --------------------------------------------------------------------------- progress of other stages
class ProgressMetrics:
    """A progress callback (``{phase, done, total}`` events, e.g. the profiler's) that logs
    ``<phase>_done`` and ``<phase>_fraction`` at ``step=done`` to the stage run, at most every
    ``every_s`` seconds and always at the end of a phase."""

    def __init__(self, ctx: Any, every_s: float = 5.0):
        self.tracker = ctx.tracker
        self.every_s = every_s
        self._last = 0.0

    def __call__(self, event: Mapping[str, Any]) -> None:
        import time

        if not self.tracker.enabled:
            return
        done, total, now = int(event.get("done", 0)), int(event.get("total", 0) or 0), time.monotonic()
        if done < total and now - self._last < self.every_s:
            return
        self._last = now
        phase = str(event.get("phase", "progress"))
        try:
            self.tracker.log_metrics({f"{phase}_done": done, f"{phase}_fraction": done / total if total else 1.0},
                                     step=done)
        except Exception as e:  # noqa: BLE001 -- progress never fails a stage
            print(f"tracking: progress not logged ({type(e).__name__}: {e})", flush=True)
