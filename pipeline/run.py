"""The pipeline entry point, and the `ray job submit` entrypoint::

    python pipeline/run.py --config configs/tiny.yaml [--run-id ID] [--resume] [--set key=value ...]
                           [--stages split,search] [--plan]
    ray job submit --working-dir . -- python pipeline/run.py --config configs/tiny.yaml

Inside `ray job submit` (or with $RAY_ADDRESS) the Ray stages join that cluster
(``ray.init(address="auto")``); with none, a local Ray is started, and only when a stage that uses
Ray actually has to run. A bad config fails here, before any work, with the key path and the rule.
Exit codes: 0 finished, 1 a stage failed, 2 bad config / arguments / a pre-work check failed (one line
naming the key or file; ``--debug`` adds the traceback), 3 stages unavailable (a stage without an implementation).
"""
from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):   # run as a file (ray job submit): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.records import format_status  # noqa: E402
from pipeline.stages import (PipelineError, StageFailed, builtin_graph, plan, refuse_replacing,  # noqa: E402
                             run_pipeline)


def build_parser(prog: str = "python pipeline/run.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run the DenseNAS pipeline (split -> profile -> search -> "
                                                       "derive -> retrain [-> sweep]) for one config.")
    add_run_arguments(p)
    return p


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/tiny.yaml")
    p.add_argument("--run-id", default=None, help="run id (default: the config's name, so reruns reuse it)")
    p.add_argument("--resume", action="store_true",
                   help="continue unfinished stages from their checkpoints (finished stages are always reused "
                        "when their fingerprint matches)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable): --set search.lambda=0.3")
    p.add_argument("--stages", default=None,
                   help="comma-separated stages to run (their upstream must be finished); default: all enabled")
    p.add_argument("--plan", action="store_true", help="print what would run / be reused, then exit")
    p.add_argument("--force", action="store_true",
                   help="replace finished stages of this run id that were made with another config (without it "
                        "such a rerun is refused; the finished result stays valid until the rerun finishes)")
    p.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    p.add_argument("--verbose", action="store_true",
                   help="keep Ray Train's per-report lines, Ray Data's progress bars and library INFO logs")


def _sigterm_as_interrupt() -> None:
    """`ray job stop` sends SIGTERM: turn it into KeyboardInterrupt so the run record says
    'interrupted' (and the stage's checkpoint stays for --resume) instead of 'running' forever."""
    from pipeline.stages import STOP_REQUESTED

    def handler(signum, frame):
        STOP_REQUESTED.set()
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:   # not the main thread (embedded use): leave the default
        pass


def _fail(args: argparse.Namespace, message: str, code: int = 2) -> int:
    """One line on stderr (the traceback too with --debug); the exit code."""
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "debug", False) and sys.exc_info()[0] is not None:
        traceback.print_exc()
    return code


def run_from_args(args: argparse.Namespace) -> int:
    from cluster.storage import StorageError
    from pipeline.checks import CheckFailed, open_store_checked, prework_checks
    from jobs.console import configure
    from pipeline.records import InvalidRunId, LeaseHeld, RunLease, default_run_id, run_exists, validate_run_id

    configure(verbose=getattr(args, "verbose", False))
    try:
        run_id = validate_run_id(args.run_id) if args.run_id else None
    except InvalidRunId as e:
        return _fail(args, f"--run-id: {e}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(args, f"config {args.config}: {e}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    record_written = False
    try:
        run_id = run_id or default_run_id(cfg.name)
        resolved = cfg.resolved()
        graph = builtin_graph()
        # Everything that can be checked before work is checked here, --plan included: the store and
        # tracking server answer, the run id is free, nothing finished would be replaced, the data,
        # tables and resources fit. Each failure is one line naming the key / file and what to do.
        store = open_store_checked(resolved)
        run_store = store.child(f"runs/{run_id}")
        if args.resume and not run_exists(store, run_id):
            raise PipelineError(f"--resume: there is no run {run_id!r} in {store.uri_for('runs/')} to resume; check "
                                f"--run-id (python -m pipeline status lists the runs), or drop --resume to start it")
        planned, _, _ = plan(graph, resolved, run_store, stages)
        if not args.force:
            refuse_replacing(planned, run_id)
        try:
            RunLease(store, run_id).check_free()      # a live driver runs it: fail now, not after the checks
        except LeaseHeld as e:
            if not args.plan:
                raise
            print(f"note: {e}", file=sys.stderr)
        prework_checks(resolved, planned, log=lambda m: print(m, file=sys.stderr, flush=True))
        if args.plan:
            for ps in planned:
                print(f"{ps.stage.name:<8} {ps.action:<11} {ps.fingerprint[:12]}  {ps.reason}")
            return 0
        _sigterm_as_interrupt()
        record_written = True
        record = run_pipeline(cfg, run_id=run_id, stages=stages, resume=args.resume, force=args.force, graph=graph,
                              store=store)
    except KeyboardInterrupt:
        print("interrupted: " + ("the run record says so; rerun with --resume to continue" if record_written
                                 else "before any stage started; nothing was written"), file=sys.stderr)
        return 130
    except (PipelineError, CheckFailed, ConfigError, InvalidRunId, LeaseHeld, StorageError) as e:
        return _fail(args, str(e))
    except StageFailed as e:
        print(f"error: {e}\nfix it and rerun the same command: finished stages are reused, the failed one "
              f"re-runs (add --resume to continue it from its checkpoint)", file=sys.stderr)
        if args.debug:
            traceback.print_exception(e.error)
        return 1
    except Exception as e:  # noqa: BLE001 -- one line, never a bare traceback (unless --debug)
        return _fail(args, f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)
    print(format_status(record.doc))
    if record.status == "incomplete":
        print("note: some stages could not run (see 'unavailable' / 'blocked' above)", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
