"""The pipeline entry point, and the `ray job submit` entrypoint::

    python pipeline/run.py --config configs/tiny.yaml [--run-id ID] [--resume] [--set key=value ...]
                           [--stages split,search] [--plan]
    ray job submit --working-dir . -- python pipeline/run.py --config configs/tiny.yaml

Inside `ray job submit` (or with $RAY_ADDRESS) the Ray stages join that cluster
(``ray.init(address="auto")``); with none, a local Ray is started, and only when a stage that uses
Ray actually has to run. A bad config fails here, before any work, with the key path and the rule.
Exit codes: 0 finished, 1 a stage failed, 2 bad config / arguments, 3 stages unavailable (not landed).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a file (ray job submit): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.records import format_status  # noqa: E402
from pipeline.stages import PipelineError, StageFailed, builtin_graph, plan, run_pipeline  # noqa: E402


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


def run_from_args(args: argparse.Namespace) -> int:
    from jobs.console import configure
    configure(verbose=getattr(args, "verbose", False))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: config {args.config}: {e}", file=sys.stderr)
        return 2
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    try:
        if args.plan:
            from pipeline.records import default_run_id
            from pipeline.runtime import open_store

            resolved = cfg.resolved()
            store = open_store(resolved.storage.uri)
            run_store = store.child(f"runs/{args.run_id or default_run_id(cfg.name)}")
            planned, _, _ = plan(builtin_graph(), resolved, run_store, stages)
            for ps in planned:
                print(f"{ps.stage.name:<8} {ps.action:<11} {ps.fingerprint[:12]}  {ps.reason}")
            return 0
        _sigterm_as_interrupt()
        record = run_pipeline(cfg, run_id=args.run_id, stages=stages, resume=args.resume)
    except KeyboardInterrupt:
        print("interrupted: the run record says so; rerun with --resume to continue", file=sys.stderr)
        return 130
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"error: {e}\nfix it and rerun the same command: finished stages are reused, the failed one "
              f"re-runs (add --resume to continue it from its checkpoint)", file=sys.stderr)
        return 1
    print(format_status(record.doc))
    if record.status == "incomplete":
        print("note: some stages could not run (see 'unavailable' / 'blocked' above)", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
