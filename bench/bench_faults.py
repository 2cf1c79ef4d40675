"""Benchmark: what four faults cost one tiny pipeline run (issue 18, item 8).

    python bench/bench_faults.py [--out docs/benchmarks/faults] [--keep DIR]

Runs the scenario of tests/test_faults.py (tests/fault_scenario.py) on a fresh local stack of its own
(SeaweedFS, MLflow, Ray head on free loopback ports under a temporary state directory): the tiny
pipeline submitted with ``ray job submit``; a Train worker killed after the search's epoch-2
checkpoint; MLflow stopped for 30 s at the next search checkpoint; SeaweedFS restarted at the first
retrain checkpoint; the driver killed with ``kill -9`` at the next retrain checkpoint and the run
resubmitted with ``--resume``. Writes ``<out>.json`` (everything measured, with the machine, the
command and the load before and after) and ``<out>.md`` (the per-fault table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from bench.machine import uptime as _uptime  # noqa: E402


def _machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    import ray

    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem, "python": platform.python_version(),
            "ray": ray.__version__, "platform": platform.platform()}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def render(doc: dict) -> str:
    r = doc["result"]
    lines = [f"## Fault injection: one tiny pipeline run, four faults ({doc['date']})", "",
             f"Command: `{doc['command']}` (scenario: tests/fault_scenario.py; the same run is the test "
             f"tests/test_faults.py). Machine: {doc['machine']['cpus']} CPUs ({doc['machine']['cpu']}), "
             f"{doc['machine']['memory']}, Ray {doc['machine']['ray']}; shared with other engineers' jobs.",
             f"Load before: `{doc['load_before']}`; after: `{doc['load_after']}`.", "",
             f"Run `{r['run_id']}`: status **{r['status']}**, {r['wall_s']:.0f} s from stack start to the resumed "
             f"job's end; jobs: " + ", ".join(f"{j['submission_id']} (resume={j['resume']}, rc {j.get('rc')})"
                                             for j in r["jobs"]) + ".", "",
             "| fault | stage | injected at | last epoch done before | resumed from epoch | finished epochs "
             "trained again | interrupted epoch | epochs repeated | fault lasted (s) | stall (s) | epoch (s) "
             "| time lost (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("worker", "mlflow", "s3", "driver"):
        f = r["faults"].get(name)
        if not f:
            continue
        lines.append(f"| {name} | {f['stage']} | {f['trigger']} | {_fmt(f['epochs_done_before'])} | "
                     f"{_fmt(f['resumed_from_epoch'])} | {f['epochs_redone']} | {f['partial_epoch_lost']} | "
                     f"**{f['epochs_repeated']}** | {_fmt(f['fault_duration_s'])} | {_fmt(f['stall_s'])} | "
                     f"{_fmt(f['epoch_s'])} | {_fmt(f['time_lost_s'])} |")
    lines += ["", "MLflow, per stage run (steps >= 1 of every per-epoch metric):", "",
              "| stage | run | status | final | epochs held | metrics | points lost | points duplicated |",
              "|---|---|---|---|---|---|---|---|"]
    for stage, info in r["mlflow"]["stages"].items():
        for run in info["runs"]:
            held = run["epochs_held"]
            span = f"{held[0]}-{held[-1]} ({len(held)})" if held else "none"
            lines.append(f"| {stage} | {run['run_id'][:8]} | {run['status']} | {'yes' if run['final'] else 'no'} | "
                         f"{span} | {run['keys']} | {len(run['lost_epochs'])} | {run['duplicated_points']} |")
    bad = {s: a["bad"] for s, a in r["artifacts"].items() if a.get("bad")}
    n_art = sum(a.get("artifacts", 0) for a in r["artifacts"].values())
    lines += ["", f"Artifacts: {n_art} listed in the 5 stage manifests, each read back and sha256-checked: "
                  + ("all match." if not bad else f"**mismatches** {bad}."),
              f"Epoch ends seen per stage (epoch: times seen): "
              + "; ".join(f"{s} {dict(sorted(c.items()))}" for s, c in r["epoch_completions"].items()) + ".",
              f"MLflow parent runs for the run id: {r['mlflow']['parents']} (status {r['mlflow']['parent_status']}).",
              "", "Definitions: *last epoch done before* is the last epoch checkpoint the watcher saw before the "
              "injection (an epoch that ended but was not checkpointed yet is the interrupted one); *resumed from* "
              "is the epoch the stage continued from (first epoch ended after the fault, minus one; `-` when no "
              "epoch ended between this fault and the next); *finished epochs trained again* counts checkpointed "
              "epochs whose end was seen again; the *interrupted epoch* is the unfinished one a killed worker or "
              "driver, or a restarted worker group, throws away; *stall* runs from the injection (for a killed "
              "worker or driver: from the recovery) to the first end of an epoch beyond that checkpoint, *time "
              "lost* is the stall less the stage's median epoch time (`-`: no epoch ended before the next fault). "
              "The MLflow and S3 faults overlap whatever runs at the time (the stage column names where they were "
              "triggered). This file is rendered from faults.json (`bench.bench_faults.render`)."]
    if doc.get("problems"):
        lines += ["", "**Problems found:** " + "; ".join(doc["problems"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks/faults", help="writes <out>.json and <out>.md")
    parser.add_argument("--keep", default=None, help="state / log directory to keep (default: a temporary one)")
    args = parser.parse_args(argv)

    from cluster.local import LocalStack, StackPorts
    from tests.fault_scenario import FaultScenario

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="densenas-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = _uptime()
    stack = LocalStack(work / "stack", StackPorts.free(), verbose=True)
    try:
        result = FaultScenario(stack, work, tag="bench-faults").run()
    finally:
        stack.down()
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *(argv or sys.argv[1:])])
    doc = write_report(result, args.out, command, load_before, str(work))
    print(render(doc))
    return 0 if not doc["problems"] else 1


def write_report(result: dict, out: str, command: str, load_before: str, workdir: str = "") -> dict:
    """``<out>.json`` (everything) and ``<out>.md`` (the tables); also used by tests/test_faults.py when
    ``$DENSENAS_FAULTS_REPORT`` names ``<out>``."""
    from tests.fault_scenario import summarise

    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command,
           "machine": _machine(), "load_before": load_before, "load_after": _uptime(), "workdir": workdir,
           "result": result, "problems": summarise(result)}
    path = REPO / out if not Path(out).is_absolute() else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    path.with_suffix(".md").write_text(render(doc))
    return doc


if __name__ == "__main__":
    sys.exit(main())
