"""Benchmark: a 4-point lambda sweep on the tiny config, with retraining, against random paths.

    .venv/bin/python bench/bench_sweep.py [--lambdas 0.1 0.3 1 3] [--epochs 3] [--random 10] [--cost profile]
                                          [--search-epochs N] [--out DIR]

1. Runs ``jobs.sweep.run`` (Ray Tune, one shared warm-up, search -> derive -> 1-epoch retrain ->
   measured latency) over 4 lambdas on ``configs/sweep_tiny.yaml``'s data / space / search. The cost
   model is the one the pipeline uses: a latency table profiled here by the Ray profiling actors
   (``--cost profile``, default), or ``macs``, or a table JSON path.
2. Question 1: does the derived nets' measured latency fall as lambda rises? Each trial times its net
   when it ends, so those timings see whatever else ran at that moment; the derived nets are therefore
   also re-timed together in this process, interleaved round by round (median of ``--rounds``), which
   is the comparison that counts. Spearman rank correlation of lambda vs both, plus the table.
3. Question 2: is a derived net better than random nets of the same space at the same predicted cost?
   For each derived net, 10 random (path, ops) networks of the space whose predicted cost is within
   +-10 % of the derived net's (closest 10 of 4,000 draws when fewer fall in the band) are retrained
   *the same way* as the derived net (same in-process loop, epochs, lr, batch, seed, data), and the
   derived net's accuracy is compared with their median.
Writes docs/benchmarks/sweep.md and docs/benchmarks/sweep_pareto.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@torch.no_grad()
def measure_latency_ms(model: torch.nn.Module, input_size: int, in_channels: int, repeats: int = 30,
                       warmup: int = 5) -> float:
    """Median wall time (ms) of one inference forward at batch 1 with the current thread settings."""
    from densenas.profiling import time_module

    return float(statistics.median(time_module(model, torch.randn(1, in_channels, input_size, input_size), "cpu",
                                               warmup, repeats)))


def load_tensors(manifest, split_store, split, space):
    """A split as in-memory tensors (evaluation transform: deterministic, identical for every net)."""
    from jobs.data import iter_batches, shard_dataset

    ds = shard_dataset(manifest, split, split_store, train=False, input_size=space.input_size,
                       channels=space.in_channels)
    xs, ys = zip(*iter_batches(ds, 256))
    return torch.cat(xs), torch.cat(ys)


def retrain(arch, data, num_classes, epochs, lr, batch, seed):
    """The same short retrain for every network: SGD + cosine, flips, then test accuracy."""
    from densenas.arch import build_model

    (tx, ty), (vx, vy) = data
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5, nesterov=True)
    steps = epochs * (len(ty) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(ty), generator=g)
        for s in range(len(ty) // batch):
            idx = order[s * batch:(s + 1) * batch]
            x = tx[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), ty[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = sum(int((model(vx[i:i + 256]).argmax(1) == vy[i:i + 256]).sum()) for i in range(0, len(vy), 256))
    return acc / len(vy), model


@torch.no_grad()
@torch.no_grad()
def interleaved_latency_ms(models, input_size, in_channels, rounds):
    """Median batch-1 inference time (ms, no autograd, as the profile and retrain stages time a net) of
    each model, timed round-robin so that load changes hit all alike."""
    x = torch.randn(1, in_channels, input_size, input_size)
    models = [m.eval() for m in models]
    for m in models:
        for _ in range(5):
            m(x)
    times = [[] for _ in models]
    for _ in range(rounds):
        for k, m in enumerate(models):
            t0 = time.perf_counter()
            m(x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return [float(statistics.median(t)) for t in times]


def random_nets(space, cost_model, num_classes, target, n, rng, draws=4000, band=0.10):
    """n random (path, ops) networks whose predicted cost is closest to ``target`` (within the band if possible)."""
    from densenas.arch import Arch
    from densenas.latency import ExpectedLatency
    from densenas.supernet import SuperNet

    with torch.device("meta"):
        net = SuperNet(space, num_classes=num_classes)
    lat = ExpectedLatency(net, cost_model)
    paths = space.paths()
    cands = []
    for _ in range(draws):
        path = list(rng.choice(paths))
        ops = [rng.randrange(len(m.op_names)) for m in net.mixed_ops]
        cands.append((abs(lat.path_cost(path, ops) - target) / target, path, ops, lat.path_cost(path, ops)))
    cands.sort(key=lambda c: c[0])
    chosen, seen = [], set()
    for rel, path, ops, cost in cands:
        heads = {tuple(m.edge): m.op_names[ops[k]] for k, m in enumerate(net.mixed_ops) if m.kind == "head"}
        stacks = {}
        for k, m in enumerate(net.mixed_ops):
            if m.kind == "stack":
                stacks.setdefault(m.block, []).append(m.op_names[ops[k]])
        arch = Arch.from_path(space, path, [heads[e] for e in zip(path, path[1:])],
                              [stacks.get(j, []) for j in path[1:]], num_classes=num_classes)
        if arch.one_line() in seen:
            continue
        seen.add(arch.one_line())
        chosen.append({"arch": arch, "predicted": cost, "rel_gap": rel, "path": path})
        if len(chosen) == n:
            break
    return chosen


def spearman(xs, ys):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs/sweep_tiny.yaml"))
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    ap.add_argument("--epochs", type=int, default=3, help="retrain epochs of the comparison (derived and random)")
    ap.add_argument("--random", type=int, default=10, help="random nets per derived net")
    ap.add_argument("--cost", default="profile",
                    help="'profile' (profile the space here, as the pipeline does), 'macs' or a latency-table JSON path")
    ap.add_argument("--search-epochs", type=int, default=10,
                    help="search epochs, warm-up included (the config's 4 leave only 2 architecture epochs)")
    ap.add_argument("--rounds", type=int, default=200, help="interleaved re-timing rounds of the derived nets")
    ap.add_argument("--out", default=None, help="working directory (default: a temp dir)")
    ap.add_argument("--doc", default=str(REPO / "docs/benchmarks/sweep.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import tempfile

    import ray

    from cluster.storage import open_store
    from densenas.latency import load_cost_model
    from jobs.diagrams import pareto_plot
    from jobs import split as split_stage
    from jobs import sweep as sweep_stage
    from jobs.context import StageContext
    from pipeline.config import load_config, resolve_space

    cfg = load_config(args.config, check=False)
    space = resolve_space(cfg.space)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-sweep-"))
    t_all = time.time()
    split_store = open_store(str(work / "split"))
    data_cfg = cfg.data.model_copy(update={"executor": "local"})
    split_out = split_stage.run(data_cfg, None, StageContext.standalone(split_store))
    manifest = split_out.model_dump()
    search = cfg.search.model_copy(update={"epochs": args.search_epochs})
    sweep = cfg.sweep.model_copy(update={"lambdas": args.lambdas, "taus": [search.tau]})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    try:
        if args.cost == "profile":
            from densenas.latency import LatencyTable
            from jobs import profile as profile_stage
            from jobs.profile import TABLE_KEY

            profile_store = open_store(str(work / "profile"))
            # the classifier's width is part of its signature: profile it for this dataset's classes
            profile_stage.run(cfg.profile.model_copy(update={"num_classes": int(manifest["num_classes"])}),
                              profile_stage.ProfileInputs(space), StageContext.standalone(profile_store))
            cost_model = LatencyTable.from_dict(profile_store.get_json(TABLE_KEY))
            print(f"profiled latency table: {len(cost_model.entries)} entries in {time.time() - t0:.0f} s", flush=True)
        else:
            cost_model = load_cost_model(args.cost, space)
        search = search.model_copy(update={"cost": "macs" if args.cost == "macs" else "profile"})
        t0 = time.time()
        inputs = sweep_stage.SweepInputs(space, split_out, split_store, search, cost_model)
        out = sweep_stage.run(sweep, inputs, StageContext.standalone(open_store(str(work / "sweep")), "sweep",
                                                                   checkpoint_store=open_store(str(work / "work"))))
        out = out.model_dump()
    finally:
        ray.shutdown()
    sweep_s = time.time() - t0
    trials = sorted(out["trials"], key=lambda r: r["lambda"])
    rho = spearman([r["lambda"] for r in trials], [r["measured_latency_ms"] for r in trials])
    rho_pred = spearman([r["lambda"] for r in trials], [r["predicted_latency"] for r in trials])

    # Matched-cost comparison with random paths, every net retrained the same way in this process.
    from densenas.arch import load_arch

    nc = int(manifest["num_classes"])
    data = (load_tensors(manifest, split_store, "train", space), load_tensors(manifest, split_store, "test", space))
    rng = random.Random(0)
    comparison = []
    baseline_pts = []
    derived_models = []
    t1 = time.time()
    for r in trials:
        cand = json.loads((work / "work" / "trials" / r["trial"] / "derive" / "free" / "arch.json").read_text())
        arch = load_arch(cand)
        acc, model = retrain(arch, data, nc, args.epochs, sweep.retrain_lr, sweep.retrain_batch_size, 0)
        lat = measure_latency_ms(model, space.input_size, space.in_channels, 30)
        derived_models.append(model)
        rnd = random_nets(space, cost_model, nc, r["predicted_latency"], args.random, rng)
        accs, lats = [], []
        for k, c in enumerate(rnd):
            a, m = retrain(c["arch"], data, nc, args.epochs, sweep.retrain_lr, sweep.retrain_batch_size, 0)
            accs.append(a)
            lats.append(measure_latency_ms(m, space.input_size, space.in_channels, 30))
            baseline_pts.append({"accuracy": a, "measured_latency_ms": lats[-1]})
        comparison.append({"lambda": r["lambda"], "predicted": r["predicted_latency"], "derived_acc": acc,
                           "derived_ms": lat, "random_median_acc": statistics.median(accs),
                           "random_min_acc": min(accs), "random_max_acc": max(accs),
                           "random_median_ms": statistics.median(lats),
                           "max_rel_gap": max(c["rel_gap"] for c in rnd), "one_line": arch.one_line()})
        print(f"lambda {r['lambda']}: derived {acc:.3f} vs random median {statistics.median(accs):.3f} "
              f"(predicted {r['predicted_latency']:.3g}, band <= {100 * max(c['rel_gap'] for c in rnd):.1f}%)",
              flush=True)
    compare_s = time.time() - t1
    retimed = interleaved_latency_ms(derived_models, space.input_size, space.in_channels, args.rounds)
    for r, ms in zip(trials, retimed):
        r["retimed_ms"] = ms
    rho_retimed = spearman([r["lambda"] for r in trials], retimed)

    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    png = doc.parent / "sweep_pareto.png"
    rows = [dict(r) for r in out["trials"]]
    pareto_plot(rows, png, latency="measured_latency_ms", latency_label="measured latency (ms, batch 1, 1 thread)",
                accuracy_label=f"test accuracy ({sweep.retrain_epochs}-epoch retrain in the sweep)", extra=[],
                title=f"lambda sweep on {space.name}: {len(rows)} trials")
    wins = sum(c["derived_acc"] > c["random_median_acc"] for c in comparison)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    lines = [
        "## Sweep: lambda vs latency, derived vs random paths (bench/bench_sweep.py)",
        "",
        f"Machine: {cpu}, 2 cores shared with other engineers' jobs (timings are noisy), torch "
        f"{torch.__version__}, Ray {ray.__version__}. Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Command: `.venv/bin/python bench/bench_sweep.py --lambdas {' '.join(f'{l:g}' for l in args.lambdas)} "
        f"--epochs {args.epochs} --random {args.random} --cost {args.cost} --search-epochs {args.search_epochs}`",
        "",
        f"Setup: space `{space.name}`, data as in `configs/sweep_tiny.yaml` ({manifest['counts']}), search "
        f"{search.epochs} epochs ({search.warmup_epochs} warm-up, trained once and shared), tau {search.tau}, "
        f"cost model {cost_model.units}; each trial: search (Ray Train) -> derive -> {sweep.retrain_epochs}-epoch "
        f"retrain stage (Ray Train) -> measured latency (the retrain stage's, under the table's protocol). "
        f"Sweep wall time {sweep_s:.0f} s; comparison retrains {compare_s:.0f} s; total {time.time() - t_all:.0f} s.",
        "",
        "### 1. Does measured latency fall as lambda rises?",
        "",
        "| lambda | predicted (" + cost_model.units + ") | measured ms (in trial) | re-timed ms (interleaved) | "
        "accuracy (sweep) | params | MACs | Pareto | net |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in trials:
        lines.append(f"| {r['lambda']:g} | {r['predicted_latency']:.4g} | {r['measured_latency_ms']:.3f} | "
                     f"{r['retimed_ms']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['params']:,} | {r['macs']:,} | {'yes' if r['pareto'] else ''} | "
                     f"`{r['one_line']}` |")
    lines += ["",
              f"Spearman rank correlation of lambda with the re-timed latency (all derived nets timed together, "
              f"interleaved, median of {args.rounds} rounds): **{rho_retimed:+.2f}**; with the in-trial timing: "
              f"{rho:+.2f}; with the predicted cost: {rho_pred:+.2f}. -1 means latency falls strictly as lambda rises.",
              "", f"![Pareto plot]({png.name})", "",
              f"### 2. Derived net vs {args.random} random paths at matched predicted cost "
              f"(all retrained {args.epochs} epochs the same way, in one process)",
              "",
              "| lambda | predicted | derived acc | random median acc (min-max) | derived ms | random median ms | "
              "cost gap of the random nets |",
              "|---|---|---|---|---|---|---|"]
    for c in comparison:
        lines.append(f"| {c['lambda']:g} | {c['predicted']:.4g} | {c['derived_acc']:.3f} | "
                     f"{c['random_median_acc']:.3f} ({c['random_min_acc']:.3f}-{c['random_max_acc']:.3f}) | "
                     f"{c['derived_ms']:.3f} | {c['random_median_ms']:.3f} | <= {100 * c['max_rel_gap']:.1f}% |")
    lines += ["", f"The derived net beats the random median in {wins} of {len(comparison)} points.", ""]
    doc.write_text("\n".join(lines))
    (doc.parent / "sweep.json").write_text(json.dumps({"trials": trials, "comparison": comparison, "rho": rho,
                                                       "rho_retimed": rho_retimed, "rho_predicted": rho_pred}, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
