"""Why the sum of isolated op timings misses a whole network's latency, and by how much each cause weighs.

For ``--nets`` random networks of the space (``densenas.latency_report.sample_random_nets``), under one
``MeasurementProtocol`` (the demo's: batch 32, 1 thread, float32, contiguous, median):

- ``whole``: the network end to end (``measure_net_latency``);
- ``table_sum``: the sum of its layers' signatures, each timed alone (a fresh module on a random input,
  as the profile stage does), skip entries included as the old table sum did;
- ``in_context``: each layer timed inside the running network (perf_counter around every layer of a
  forward that runs the layers one after the other on the real activations); the per-layer ratio
  in-context / alone, by op kind, is the interaction (cache, memory traffic) effect;
- ``fixed``: stem + first layer + last conv + pooling/classifier, alone and in context;
- ``repeat``: the whole network measured again at the end (the noise floor of one measurement);
- ``concurrent``: the whole network while a second process keeps the other core busy with another
  network (what two profiling actors on two cores do to each other).

Then the affine model of ``densenas.latency_model`` fitted on the first half of the nets and scored
on the second half. Writes a JSON (``--out``) and prints a summary. Run it on a quiet machine:
``flock /tmp/heavy.lock python bench/diagnose_latency_gap.py --out docs/benchmarks/profile_gap.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from densenas.arch import build_model  # noqa: E402
from densenas.latency import LatencyStats, build_signature_module  # noqa: E402
from densenas.latency_model import (MeasurementProtocol, arch_signatures, fit_calibration,  # noqa: E402
                                    measure_net_latency, time_forward)
from densenas.latency_report import accuracy_metrics, net_signatures, sample_random_nets  # noqa: E402
from densenas.profiling import set_cpu_threads  # noqa: E402
from densenas.space import load_space  # noqa: E402


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


@torch.no_grad()
def in_context_layers(net, protocol: MeasurementProtocol) -> list[float]:
    """Median time (ms) of each layer inside a running forward: stem, block layers, last conv, head."""
    layers = [net.stem] + [m for block in net.blocks for m in block]
    if net.last_conv is not None:
        layers.append(net.last_conv)
    head = net.forward_head
    net.eval()
    x0 = torch.randn(protocol.batch, net.arch.in_channels, net.arch.input_size, net.arch.input_size)
    clock = time.perf_counter if protocol.timer == "wall" else time.thread_time
    samples = [[] for _ in range(len(layers) + 1)]
    for rep in range(protocol.warmup + protocol.repeats):
        x = x0
        for k, layer in enumerate(layers):
            t0 = clock()
            x = layer(x)
            if rep >= protocol.warmup:
                samples[k].append((clock() - t0) * 1e3)
        t0 = clock()
        head(x)
        if rep >= protocol.warmup:
            samples[-1].append((clock() - t0) * 1e3)
    return [getattr(LatencyStats.from_samples(s), protocol.statistic) for s in samples]


def _busy_other_core(stop, arch_doc, batch):
    torch.set_num_threads(1)
    net = build_model(arch_doc).eval()
    x = torch.randn(batch, net.arch.in_channels, net.arch.input_size, net.arch.input_size)
    with torch.no_grad():
        while not stop.is_set():
            net(x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default="tiny_mbconv")
    p.add_argument("--nets", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--statistic", default="median", choices=["median", "p10", "mean"])
    p.add_argument("--timer", default="wall", choices=["wall", "thread_cpu"])
    p.add_argument("--concurrent-nets", type=int, default=6)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    set_cpu_threads(args.threads)
    space = load_space(args.space)
    proto = MeasurementProtocol(batch=args.batch, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                                statistic=args.statistic, timer=args.timer)
    nets = sample_random_nets(space, args.nets, args.seed, args.classes)
    load_before = _uptime()
    t_start = time.time()

    alone: dict = {}

    def alone_ms(sig):
        if sig not in alone:
            m = build_signature_module(sig)
            alone[sig] = time_forward(m, (sig.batch, sig.c_in, sig.resolution, sig.resolution), proto)
            alone[sig] = getattr(alone[sig], proto.statistic)
        return alone[sig]

    rows = []
    by_kind = defaultdict(list)  # op kind -> in-context / alone ratios
    for n, net in enumerate(nets):
        model = build_model(net.arch, num_classes=args.classes)
        whole = measure_net_latency(model, proto)["value"]
        sigs_all = net_signatures(space, net, args.batch, args.classes)
        table_sum = sum(alone_ms(s) for s in sigs_all)
        units = arch_signatures(net.arch, args.batch)
        unit_alone = [alone_ms(s) for s in units]
        ctx = in_context_layers(model, proto)
        assert len(ctx) == len(units), (len(ctx), len(units))
        for s, a, c in zip(units, unit_alone, ctx):
            kind = s.op if s.op != "classifier" else "pool+classifier"
            if s == units[0]:
                kind = "stem " + kind
            by_kind[kind].append(c / a)
        fixed_idx = [0, 1, len(units) - 2, len(units) - 1] if space.first_layer is not None else \
            [0, len(units) - 2, len(units) - 1]
        kind_sums = {}
        for sig, a in zip(units, unit_alone):
            kind_sums[sig.op] = kind_sums.get(sig.op, 0.0) + a
        rows.append({"key": net.key, "kind_sums": kind_sums, "units": len(units), "skips": len(sigs_all) - len(units) - 0,
                     "whole_ms": whole, "table_sum_ms": table_sum, "unit_sum_ms": sum(unit_alone),
                     "in_context_sum_ms": sum(ctx),
                     "fixed_alone_ms": sum(unit_alone[i] for i in fixed_idx),
                     "fixed_in_context_ms": sum(ctx[i] for i in fixed_idx)})
        print(f"net {n + 1}/{len(nets)}: whole {whole:.2f} ms, table sum {table_sum:.2f}, in-context sum "
              f"{sum(ctx):.2f}, {len(units)} units", flush=True)

    # The noise floor: each whole net again.
    for r, net in zip(rows, nets):
        r["whole_again_ms"] = measure_net_latency(build_model(net.arch, num_classes=args.classes), proto)["value"]

    # Another process on the other core (two actors on two cores).
    conc = []
    if args.concurrent_nets and os.cpu_count() and os.cpu_count() >= 2:
        ctx_mp = mp.get_context("spawn")
        stop = ctx_mp.Event()
        busy = ctx_mp.Process(target=_busy_other_core, args=(stop, nets[-1].arch.to_dict(), args.batch), daemon=True)
        busy.start()
        time.sleep(3.0)
        try:
            for r, net in list(zip(rows, nets))[:args.concurrent_nets]:
                m = measure_net_latency(build_model(net.arch, num_classes=args.classes), proto)["value"]
                conc.append({"key": r["key"], "alone_ms": r["whole_ms"], "concurrent_ms": m})
        finally:
            stop.set()
            busy.join(10)

    whole = np.array([r["whole_ms"] for r in rows])
    again = np.array([r["whole_again_ms"] for r in rows])
    tsum = np.array([r["table_sum_ms"] for r in rows])
    usum = np.array([r["unit_sum_ms"] for r in rows])
    csum = np.array([r["in_context_sum_ms"] for r in rows])
    fixed_a = np.array([r["fixed_alone_ms"] for r in rows])
    fixed_c = np.array([r["fixed_in_context_ms"] for r in rows])
    nunits = np.array([r["units"] for r in rows])
    half = len(rows) // 2
    per_op = sorted({o for o in (*space.head_ops, *space.stacking_ops) if o != "skip"})
    ks = [r["kind_sums"] for r in rows]
    cal = fit_calibration(usum[:half], nunits[:half], whole[:half], {"nets": "first half"}, kind_sums=ks[:half],
                          per_op=per_op)
    held = np.array([cal.predict(k, u) for k, u in zip(ks[half:], nunits[half:])])
    summary = {
        "gap_table_sum_vs_whole_pct": float(((tsum - whole) / whole).mean() * 100),
        "table_sum_metrics": accuracy_metrics(tsum, whole),
        "skip_entries_share_of_table_sum_pct": float(((tsum - usum) / tsum).mean() * 100),
        "in_context_sum_vs_whole_pct": float(((csum - whole) / whole).mean() * 100),
        "unit_sum_vs_in_context_sum_pct": float(((usum - csum) / csum).mean() * 100),
        "fixed_share_of_whole_pct": float((fixed_c / whole).mean() * 100),
        "fixed_in_context_vs_alone_pct": float(((fixed_c - fixed_a) / fixed_a).mean() * 100),
        "searchable_in_context_vs_alone_pct": float((((csum - fixed_c) - (usum - fixed_a)) / (usum - fixed_a)).mean()
                                                    * 100),
        "in_context_over_alone_by_kind": {k: {"n": len(v), "median_ratio": float(np.median(v)),
                                              "min": float(np.min(v)), "max": float(np.max(v))}
                                          for k, v in sorted(by_kind.items())},
        "repeat_noise_abs_pct": {"median": float(np.median(np.abs(again - whole) / whole) * 100),
                                 "max": float(np.max(np.abs(again - whole) / whole) * 100)},
        "concurrent_vs_alone_pct": (float(np.mean([(c["concurrent_ms"] - c["alone_ms"]) / c["alone_ms"]
                                                    for c in conc]) * 100) if conc else None),
        "affine_model": {"calibration": cal.to_dict(), "held_out": accuracy_metrics(held, whole[half:]),
                         "note": f"fitted on nets 1..{half}, scored on nets {half + 1}..{len(rows)}"},
    }
    out = {"command": " ".join(sys.argv), "space": args.space, "protocol": proto.to_dict(),
           "torch": torch.__version__, "cpu": next((l.split(':', 1)[1].strip() for l in
                                                   Path('/proc/cpuinfo').read_text().splitlines()
                                                   if l.startswith('model name')), None),
           "uptime_before": load_before, "uptime_after": _uptime(), "wall_s": round(time.time() - t_start, 1),
           "summary": summary, "rows": rows, "concurrent": conc}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
