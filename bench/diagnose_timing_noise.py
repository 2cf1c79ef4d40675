"""Diagnosis: how far one whole net's CPU time wanders, and what the latency protocol's allocator and
reference workload do about it. One process, one thread, no Ray.

    env -u PYTHONPATH .venv/bin/python bench/diagnose_timing_noise.py --allocator steady --json OUT.json
    env -u PYTHONPATH .venv/bin/python bench/diagnose_timing_noise.py --allocator default --json OUT.json

Run the two in separate processes: the steady allocator cannot be undone within a process.

1. Rounds: ``--nets`` random nets of ``tiny_mbconv`` (batch 32, 10 classes), each timed in ``--rounds``
   rounds of 10 forwards, the rounds spread over the run (shuffled order). Per round: the plain median
   and the median of ratios to the protocol's reference op run right after each forward. Score: the
   fraction of single rounds within +-10 % of that net's median over its rounds.
2. Model: the 86 op signatures and 70 random nets (20 calibration, 50 held-out), each timed once with
   30 forwards, plain and as ratios; ``fit_calibration`` on the first 20, scored on the other 50, for
   plain entries + plain nets and reference entries + reference nets.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from densenas.arch import build_model  # noqa: E402
from densenas.latency import LatencyTable, OpSignature, build_signature_module, space_signatures  # noqa: E402
from densenas.latency_model import DEFAULT_REFERENCE, fit_calibration, unit_features, unit_kind_sums  # noqa: E402
from densenas.latency_report import accuracy_metrics, net_signatures, sample_random_nets  # noqa: E402
from densenas.profiling import steady_allocator, time_paired  # noqa: E402
from densenas.space import load_space  # noqa: E402

BATCH, CLASSES = 32, 10


def paired(module, x, ref, rx, warmup: int, repeats: int) -> tuple[float, float]:
    """(plain median ms, median of ratios to the reference) over ``repeats`` forward pairs."""
    with torch.no_grad():
        own, refs = time_paired(module, x, ref, rx, warmup, repeats, timer="thread_cpu")
    return statistics.median(own), statistics.median(a / b for a, b in zip(own, refs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allocator", choices=("steady", "default"), required=True)
    ap.add_argument("--nets", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.allocator == "steady":
        steady_allocator()
    torch.manual_seed(0)
    space = load_space("tiny_mbconv")
    rsig = OpSignature.parse(f"{DEFAULT_REFERENCE}:{BATCH}")
    ref = build_signature_module(rsig).eval()
    rx = torch.randn(BATCH, rsig.c_in, rsig.resolution, rsig.resolution)
    x = torch.randn(BATCH, 1, space.input_size, space.input_size)
    t_start = time.time()

    # 1. rounds
    nets = sample_random_nets(space, args.nets, seed=7, num_classes=CLASSES)
    models = [build_model(n.arch.to_dict(), num_classes=CLASSES).eval() for n in nets]
    rounds = {i: {"plain": [], "ratio": []} for i in range(len(models))}
    for r in range(args.rounds):
        order = list(range(len(models)))
        random.Random(r).shuffle(order)
        for i in order:
            p, q = paired(models[i], x, ref, rx, warmup=3, repeats=10)
            rounds[i]["plain"].append(p)
            rounds[i]["ratio"].append(q)
    within = {}
    for kind in ("plain", "ratio"):
        dev = [abs(v / statistics.median(rounds[i][kind]) - 1) for i in rounds for v in rounds[i][kind]]
        within[kind] = float(np.mean([d <= 0.10 for d in dev]))
    print(f"rounds: single rounds within +-10 % of the net's median: plain {within['plain']:.2f}, "
          f"reference {within['ratio']:.2f}", flush=True)

    # 2. the model
    sigs = space_signatures(space, BATCH, CLASSES)
    entries = {"plain": {}, "ratio": {}}
    for s in sigs:
        m = build_signature_module(s).eval()
        p, q = paired(m, torch.randn(BATCH, s.c_in, s.resolution, s.resolution), ref, rx, warmup=5, repeats=30)
        entries["plain"][s.key], entries["ratio"][s.key] = p, q
    all_nets = sample_random_nets(space, 70, seed=0, num_classes=CLASSES)
    measured = {"plain": [], "ratio": []}
    for n in all_nets:
        p, q = paired(build_model(n.arch.to_dict(), num_classes=CLASSES).eval(), x, ref, rx, warmup=5, repeats=30)
        measured["plain"].append(p)
        measured["ratio"].append(q)
    per_op = sorted({o for o in (*space.head_ops, *space.stacking_ops) if o != "skip"})
    model = {}
    for kind in ("plain", "ratio"):
        table = LatencyTable({k: {"mean": v, "median": v, "std": 0.0, "p10": v, "p90": v, "count": 30}
                              for k, v in entries[kind].items()}, space.space_hash(), {"name": "diagnosis"},
                             units="ms", statistic="median")
        sig_lists = [net_signatures(space, n, BATCH, CLASSES) for n in all_nets]
        feats = [unit_features(table, s) for s in sig_lists]
        kinds = [unit_kind_sums(table, s) for s in sig_lists]
        cal = fit_calibration([f[0] for f in feats[:20]], [f[1] for f in feats[:20]], measured[kind][:20],
                              kind_sums=kinds[:20], per_op=per_op)
        pred = [cal.predict(k, f[1]) for k, f in zip(kinds[20:], feats[20:])]
        model[kind] = {"form": cal.form, **accuracy_metrics(pred, measured[kind][20:])}
        m = model[kind]
        print(f"model ({kind} entries and nets): {m['within_10pct']:.0%} of 50 held-out nets within +-10 %, "
              f"MAPE {m['mape_pct']:.1f} %, Spearman {m['spearman']:.3f} ({cal.form})", flush=True)
    out = {"command": "python bench/diagnose_timing_noise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "allocator": args.allocator, "reference": f"{DEFAULT_REFERENCE}:{BATCH}", "rounds_within_10pct": within,
           "rounds": rounds, "model": model, "entries": entries, "measured": measured,
           "wall_s": round(time.time() - t_start, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
