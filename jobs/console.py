"""What the pipeline prints: one progress line per long step, libraries' chatter off unless --verbose.

    configure(verbose=args.verbose)      # the entry point, before Ray starts (workers inherit it)
    quiet_train_worker()                 # first thing in a Ray Train loop (jobs.epochs does it)
    progress = EpochProgress("search", total=8, start=0)
    print(progress.line(epoch, seconds, "val_acc 0.41"))  # "[search] epoch 3/8 (38%) ... ETA 3m20s"

Quiet (the default) turns off: the INFO line Ray Train logs for every ``ray.train.report`` of every
worker (``Reporting training result ...: TrainingReport(...)``), Ray Train's controller INFO lines
(``RunConfig.logging_config``, set by ``jobs.train.torch_trainer``), Ray Data's progress bars (tqdm),
Ray Data's interrupted helper threads (``InterruptedError`` tracebacks when an iterator is closed
early, on runs that succeed), MLflow's and boto's INFO chatter ("View run ... at ..."). Warnings
and errors stay. ``--verbose`` (``DENSENAS_VERBOSE=1``) keeps all of it, including the searcher's
own detailed per-epoch line.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

__all__ = ["configure", "verbose", "quiet_train_worker", "train_log_level", "EpochProgress", "format_duration",
           "VERBOSE_ENV"]

VERBOSE_ENV = "DENSENAS_VERBOSE"
_QUIET_LOGGERS = {"ray.data": logging.ERROR, "ray.train": logging.WARNING, "ray.tune": logging.WARNING,
                  "mlflow": logging.WARNING, "alembic": logging.WARNING, "botocore": logging.WARNING,
                  "urllib3": logging.ERROR, "filelock": logging.WARNING}
_default_excepthook = threading.excepthook


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "False")


def _thread_hook(args) -> None:
    # Ray Data's prefetch threads end with InterruptedError when their iterator is closed (normal end
    # of an epoch's capped batches): not an error, no traceback.
    if args.exc_type is not None and issubclass(args.exc_type, InterruptedError) and not verbose():
        return
    _default_excepthook(args)


def _quiet_loggers() -> None:
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    threading.excepthook = _thread_hook


def configure(verbose: bool = False) -> None:
    """Set the console mode for this process and the Ray processes it starts (environment)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        threading.excepthook = _default_excepthook
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")          # mlflow resets its logger on import
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")   # "View run ... at" per run
    _quiet_loggers()


def quiet_train_worker() -> None:
    """In a Ray Train worker: drop the per-report INFO line (its logger is named by Ray's file path)."""
    if verbose():
        return
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001 -- another Ray layout: leave its logging alone
        pass
    _quiet_loggers()


def train_log_level() -> str:
    """Ray Train's console log level (``RunConfig.logging_config``): its controller's and workers'
    INFO lines (resources requested, worker group started, process group set up) only with --verbose."""
    return "INFO" if verbose() else "WARNING"


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class EpochProgress:
    """One line per epoch with the rate and ETA of the epochs run in this process."""

    def __init__(self, stage: str, total: int, start: int = 0):
        self.stage, self.total, self.start = stage, int(total), int(start)
        self._t0 = time.monotonic()

    def line(self, epoch: int, detail: str = "", seconds: Optional[float] = None) -> str:
        done = max(epoch - self.start, 1)
        per_epoch = (time.monotonic() - self._t0) / done
        eta = per_epoch * max(self.total - epoch, 0)
        pct = 100.0 * epoch / max(self.total, 1)
        took = f"{seconds:.1f}s" if seconds is not None else f"{per_epoch:.1f}s"
        return (f"[{self.stage}] epoch {epoch}/{self.total} ({pct:.0f}%) {took}"
                + (f" | {detail}" if detail else "")
                + (f" | ETA {format_duration(eta)}" if epoch < self.total else " | done"))
