"""``python -m pipeline run|status|inspect|demo`` (also the ``densenas-pipeline`` console script)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from pipeline.run import add_run_arguments, run_from_args

    parser = argparse.ArgumentParser(prog="python -m pipeline", description="DenseNAS pipeline on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run a config (same as python pipeline/run.py)"))
    st = sub.add_parser("status", help="a run's stages (state, fingerprint, duration, metrics); no id: list runs")
    st.add_argument("run_id", nargs="?")
    st.add_argument("--json", action="store_true")
    st.add_argument("--store", default=None, help="store URI (default: $DENSENAS_STORE or <repo>/runs-store)")
    ins = sub.add_parser("inspect", help="derived architecture, accuracy, predicted vs measured latency, Pareto")
    ins.add_argument("run_id")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--store", default=None)
    demo = sub.add_parser("demo", help="start the local stack and submit configs/tiny.yaml as a Ray job")
    demo.add_argument("--config", default="configs/tiny.yaml")
    demo.add_argument("--run-id", default=None)
    demo.add_argument("--timeout", type=float, default=1800, help="give up following the job after this many s")
    args = parser.parse_args(argv)

    if args.command == "run":
        return run_from_args(args)
    if args.command == "demo":
        from pipeline.demo import run_demo

        return run_demo(args.config, run_id=args.run_id, timeout_s=args.timeout)

    from cluster.storage import default_store_uri
    from pipeline.config import LOCAL_STORE
    from pipeline.records import (InvalidRunId, RunNotFound, RunRecord, effective_status, format_inspect, format_runs,
                                  format_status, inspect_run, list_runs, validate_run_id)
    from cluster.storage import StorageError
    from pipeline.runtime import open_store

    try:
        if args.run_id:
            validate_run_id(args.run_id)
        store = open_store(args.store or default_store_uri(LOCAL_STORE))
    except (InvalidRunId, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "status":
            if not args.run_id:
                runs = list_runs(store)
                print(json.dumps(runs, indent=1) if args.json else format_runs(runs))
                return 0
            doc = RunRecord.load(store, args.run_id).doc
            shown = effective_status(store, args.run_id, doc.get("status"))
            if shown != doc.get("status"):      # the driver is gone: its running stages are not running
                doc["status"] = shown
                for s in doc.get("stages", {}).values():
                    if s.get("state") == "running":
                        s["state"] = "interrupted"
            print(json.dumps(doc, indent=1, default=str) if args.json else format_status(doc))
            return 0
        info = inspect_run(store, args.run_id)
        print(json.dumps(info, indent=1, default=str) if args.json else format_inspect(info))
        return 0
    except (RunNotFound, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
