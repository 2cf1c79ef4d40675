"""Benchmark: the profile stage exactly as the demo runs it -- wall time and the latency model's accuracy.

    flock /tmp/heavy.lock python bench/bench_profile.py [--config configs/tiny.yaml] [--runs 1]

Loads the ``profile:`` section of ``--config`` (the demo's: 2 actors x 1 thread, batch 32, its
calibration and held-out nets), starts a local Ray with 2 CPUs (the demo's machine), and runs the
profile stage (``jobs.profile.Profiler``) into a fresh store, ``--runs`` times (fresh each time).
Records per run: the stage's wall time (actor start included), the held-out accuracy of the latency
model and of the plain table sum (within +-5 / +-10 %, MAPE, Spearman), the calibration, and
``uptime`` before and after. Writes the raw results to ``--json`` and a summary to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from cluster.storage import open_store  # noqa: E402
from densenas.profiling import cpu_model_name  # noqa: E402
from jobs.profile import REPORT_KEY, ProfileConfig, Profiler  # noqa: E402


from bench.machine import uptime as _uptime  # noqa: E402


def _section(config: str, overrides: list[str]) -> tuple[ProfileConfig, str]:
    doc = yaml.safe_load(Path(config).read_text())
    section = dict(doc.get("profile") or {})
    classes = (doc.get("data") or {}).get("classes")
    if section.get("num_classes") is None and isinstance(classes, int):
        section["num_classes"] = classes
    for o in overrides:
        k, v = o.split("=", 1)
        section[k] = yaml.safe_load(v)
    return ProfileConfig.model_validate(section), doc.get("space", "tiny_mbconv")


def _retrain_path_check(store, space, cfg: ProfileConfig, n: int) -> list[dict]:
    """The retrain stage's latency path on ``n`` fresh random nets (neither calibration nor held-out):
    ``jobs.retrain.latency_setup`` from the published table, ``_measure_in_task`` as a Ray task with the
    resources the stage gives it, against ``densenas.latency.predict_latency``."""
    import io

    import ray
    import torch

    from densenas.arch import build_model
    from densenas.latency import LatencyTable, predict_latency
    from densenas.latency_report import sample_random_nets
    from jobs.profile import TABLE_KEY
    from jobs.retrain import RetrainConfig, _measure_in_task, latency_setup

    table = LatencyTable.from_json(store.get_bytes(TABLE_KEY).decode())
    protocol = latency_setup(RetrainConfig(), table)
    classes = table.meta["num_classes"]
    seen = cfg.calibration_paths + cfg.report_paths
    nets = sample_random_nets(space, seen + n, cfg.seed, classes)[seen:]
    out = []
    for net in nets:
        model = build_model(net.arch, num_classes=classes)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        lat = ray.get(ray.remote(num_cpus=float(protocol["threads"]))(_measure_in_task).remote(
            buf.getvalue(), net.arch.to_dict(), classes, protocol), timeout=600)
        pred = predict_latency(net.arch, table)
        out.append({"key": net.key, "predicted_ms": pred, "measured_ms": lat["value"],
                    "plain_median_ms": lat.get("plain_median"),
                    "error_pct": 100 * (pred - lat["value"]) / lat["value"]})
        plain = "" if lat.get("plain_median") is None else f"; the same forwards' own median {lat['plain_median']:.2f} ms"
        print(f"[bench_profile] retrain path: predicted {pred:.2f} ms, measured {lat['value']:.2f} ms "
              f"({out[-1]['error_pct']:+.1f}%){plain}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--set", action="append", default=[], help="override a profile key, e.g. --set statistic=p10")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--retrain-nets", type=int, default=10,
                   help="fresh random nets timed through the retrain stage's latency path (a Ray task)")
    p.add_argument("--json", default=str(REPO / "docs" / "benchmarks" / "profile_demo.json"))
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "profile.md"))
    args = p.parse_args(argv)
    cfg, space = _section(args.config, args.set)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = []
    for k in range(args.runs):
        before = _uptime()
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(Path(tmp) / "profile")
            result = Profiler(cfg, space, store, log=lambda m: print(
                f"[bench_profile +{time.monotonic() - t0:6.1f}s] {m}", flush=True)).run()
            report = store.get_json(REPORT_KEY)
            retrain_path = _retrain_path_check(store, space, cfg, args.retrain_nets) if args.retrain_nets else []
        runs.append({"run": k + 1, "uptime_before": before, "uptime_after": _uptime(), "wall_s": result["wall_s"],
                     "measured_signatures": result["measured_signatures"], "measured_nets": result["measured_nets"],
                     "model": report.get("model"), "plain_sum": report.get("plain_sum"),
                     "calibration_in_sample": report.get("calibration_in_sample"),
                     "calibration": report.get("calibration"), "goal": report.get("goal"),
                     "retrain_path": retrain_path, "report": report})
    ray.shutdown()

    cmd = "python bench/bench_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    raw = {"command": cmd.strip(), "config": args.config, "profile": cfg.model_dump(), "space": space,
           "machine": {"cpu": cpu_model_name(), "cores": os.cpu_count(), "os": f"{platform.system()} "
                                                                               f"{platform.release()}"},
           "torch": __import__("torch").__version__, "ray": ray.__version__, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(raw, indent=1))

    proto = {k: v for k, v in cfg.measurement_protocol().to_dict().items() if k != "reference_ms"}
    ref_ms = [(r["report"].get("protocol") or {}).get("reference_ms") for r in runs]
    lines = [
        "## The profile stage on the demo config (jobs.profile)",
        "",
        f"Machine: {raw['machine']['cpu']}, {os.cpu_count()} cores, {raw['machine']['os']}; torch {raw['torch']}, "
        f"ray {ray.__version__}; local Ray with 2 CPUs, {cfg.actors} actors x {cfg.threads_per_actor} thread.",
        "",
        f"Command: `{cmd.strip()}`; raw output: `docs/benchmarks/{Path(args.json).name}`.",
        "",
        "Protocol: " + ", ".join(f"{k} {v}" for k, v in proto.items())
        + ("" if proto.get("reference", "none") == "none" else
           "; reference_ms (fixed per table) " + " / ".join(
               f"{x:.3f}" if x else "-" for x in ref_ms) + " in run " + " / ".join(str(r["run"]) for r in runs))
        + f". {cfg.calibration_paths} calibration "
        f"nets fit the model; {cfg.report_paths} other (held-out) random nets score it.",
        "",
        "| run | load before / after | stage wall (s) | model within +-10 % | +-5 % | MAPE % | Spearman | "
        "plain sum within +-10 % | plain MAPE % | goal met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m, pl = r["model"] or {}, r["plain_sum"] or {}
        load = lambda s: s.split("load average:")[-1].split(",")[0].strip()  # noqa: E731
        lines.append(f"| {r['run']} | {load(r['uptime_before'])} / {load(r['uptime_after'])} | {r['wall_s']:.1f} | "
                     f"{m.get('within_10pct', 0):.0%} | {m.get('within_5pct', 0):.0%} | {m.get('mape_pct', 0):.1f} | "
                     f"{m.get('spearman', 0):.3f} | {pl.get('within_10pct', 0):.0%} | {pl.get('mape_pct', 0):.1f} | "
                     f"{'yes' if (r['goal'] or {}).get('met') else 'no'} |")
    for r in runs:
        if r["retrain_path"]:
            errs = [abs(x["error_pct"]) for x in r["retrain_path"]]
            lines.append(f"\nRun {r['run']}, the retrain stage's latency path (`jobs.retrain.latency_setup` + "
                         f"`_measure_in_task`, a Ray task) on {len(errs)} fresh random nets: "
                         f"{sum(e <= 10 for e in errs)}/{len(errs)} within +-10 % of `predict_latency`, "
                         f"median |error| {sorted(errs)[len(errs) // 2]:.1f} %, max {max(errs):.1f} %."
                         + ("" if r["retrain_path"][0].get("plain_median_ms") is None else
                            " Measured / the same forwards' own (plain) median: median "
                            + f"{statistics.median(x['measured_ms'] / x['plain_median_ms'] for x in r['retrain_path']):.2f}"
                            + f" (range {min(x['measured_ms'] / x['plain_median_ms'] for x in r['retrain_path']):.2f}-"
                            + f"{max(x['measured_ms'] / x['plain_median_ms'] for x in r['retrain_path']):.2f})."))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
