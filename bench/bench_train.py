"""Benchmark: search epoch time on Ray Train with 1 vs 2 workers, and retrain throughput (img/s).

    python bench/bench_train.py [--space tiny_mbconv] [--per-class 100] [--epochs 2] [--gpu]

Splits the embedded Fashion-MNIST (10 classes x ``--per-class``) into a temporary local store, then
runs ``jobs.search.run`` (weights-only warm-up epoch + one search epoch, i.e. ``--epochs``) with
1 and with 2 workers (``cpus_per_worker`` 0.5 on CPU so Ray Data keeps a CPU), reading the epoch
times from the search records, and ``jobs.retrain.run`` of the derived network (1 worker),
reading img/s from its records. Writes docs/benchmarks/train.md (docs/benchmarks/gpu_train.md with
``--gpu``). Numbers on a shared machine move with its load: the section records the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="tiny_mbconv")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--retrain-epochs", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="workers on GPUs (NCCL); needs one GPU per worker")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args(argv)

    import ray
    import torch

    from cluster.storage import open_store
    from densenas.latency import MacsCostModel
    from densenas.space import load_space
    from jobs import retrain, search, split
    from jobs.context import StageContext
    from jobs.retrain import RetrainConfig
    from jobs.search import SearchJobConfig
    from jobs.split import SplitConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    split_store = open_store(str(tmp / "split"))
    split_out = split.run(SplitConfig(classes=10, max_per_class=args.per_class, test_max_per_class=20,
                                      val_fraction=0.2, executor="local"), None, StageContext.standalone(split_store))
    space = load_space(args.space)
    ray.init(include_dashboard=False, num_cpus=None if args.gpu else 3)
    rows = []
    arch = None
    for w in [int(v) for v in args.workers.split(",")]:
        job = SearchJobConfig.model_validate({
            "workers": w, "cpus_per_worker": 1 if args.gpu else 0.5, "use_gpu": args.gpu, "max_failures": 0,
            "epochs": args.epochs, "warmup_epochs": 1, "batch_size": args.batch, "cost": "macs"})
        store = open_store(str(tmp / f"search-{w}"))
        t0 = time.time()
        search.run(job, search.SearchInputs(space, split_out, split_store, MacsCostModel(space)),
                   StageContext.standalone(store))
        wall = time.time() - t0
        recs = [json.loads(line) for line in store.get_bytes("search_record.jsonl").decode().splitlines()]
        rows.append((w, [round(r["seconds"], 1) for r in recs], round(wall, 1)))
        print(f"search, {w} worker(s): epoch seconds {rows[-1][1]}, wall {wall:.1f}s", flush=True)
        arch = store.get_bytes("arch.json").decode()
    rcfg = RetrainConfig(epochs=args.retrain_epochs, batch_size=64, lr=0.1, workers=1,
                         cpus_per_worker=1, use_gpu=args.gpu, latency_repeats=20)
    rstore = open_store(str(tmp / "retrain"))
    rout = retrain.run(rcfg, retrain.RetrainInputs(arch, split_out, split_store), StageContext.standalone(rstore))
    rrecs = [json.loads(line) for line in rstore.get_bytes("retrain_record.jsonl").decode().splitlines()]
    ray.shutdown()

    speeds = ", ".join(f"{r['img_per_s']:.0f}" for r in rrecs)
    card = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else "none"
    lines = [
        "## Ray Train: search epochs (1 vs 2 workers) and retrain throughput", "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, GPU: {card}; "
        f"load average at the end {os.getloadavg()[0]:.1f}",
        f"- command: `python bench/bench_train.py {' '.join(argv or sys.argv[1:])}`",
        f"- data: Fashion-MNIST, 10 classes, {split_out.counts} images; space {args.space}; global batch "
        f"{args.batch}; epoch 1 is the weights-only warm-up, later epochs arch + weight passes", "",
        "| workers | epoch seconds (per epoch) | wall of the Train run (s) |", "|---|---|---|",
        *[f"| {w} | {secs} | {wall} |" for w, secs, wall in rows], "",
        f"Retrain of the derived net (1 worker, batch 64): "
        f"{speeds} img/s per epoch; test top-1 "
        f"{rout.metrics['test_top1']:.3f} after {args.retrain_epochs} epochs; measured latency "
        f"{rout.measured_latency_ms or float('nan'):.3f} ms (batch 1).", "",
        "Epoch seconds are wall-clock intervals between epoch ends: the first includes the workers' start "
        "and their one-time read of the shards (`data_loading: memory`); every epoch includes the per-epoch "
        "report + checkpoint" + ("." if args.gpu else "; on 2 shared cores a second worker competes for the same CPU."),
        ""]
    out = REPO / "docs" / "benchmarks" / ("gpu_train.md" if args.gpu else "train.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
