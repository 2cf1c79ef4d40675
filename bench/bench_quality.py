"""Benchmark: does the search beat chance? The product's lambda sweep against uniform random nets.

    .venv/bin/python bench/bench_quality.py [--lambdas 0 0.1 0.3 1 3] [--seeds 3] [--random 20]
                                            [--cost profile] [--epochs N] [--out DIR] [--label TEXT]

1. Runs the pipeline's Ray Tune sweep (``jobs.sweep.run``) on ``configs/sweep_tiny.yaml``'s space,
   data and search schedule, lambda = 0 included: one shared warm-up, then per trial search (Ray Train)
   -> derive -> retrain -> measured latency. The cost model is a latency table profiled here by the
   profile stage's actors (``--cost profile``), or ``macs``, or a table JSON path.
2. Every derived net is retrained with ``--seeds`` seeds, and ``--random`` networks drawn uniformly from
   the space (path uniform over the space's block paths, every op uniform over its candidates) are
   retrained once, all with the retrain stage's recipe (``densenas.retrain``: ``TrainRecipe`` from the
   sweep section, ``build_optimizer``, ``build_scheduler``, ``train_epoch``, ``evaluate``) on the split's
   search-train + search-val images with random flips, and evaluated on the held-out test split
   (the whole Fashion-MNIST test set, 10,000 images, unless ``--test-per-class`` caps it).
3. All nets (derived and random) are re-timed together in this process, interleaved round by round
   (batch 1, 1 thread, median of ``--rounds``).
4. Goals (issue 13): Spearman(lambda, re-timed latency of the derived nets) <= -0.9; each derived net
   (mean over seeds) beats the median accuracy of the random nets within +-10 % of its re-timed latency
   in at least 4 of 5 points; the whole run within 60 minutes on the 2-core machine.
5. Whether the setting has a trade-off to find: Spearman(re-timed latency, top-1) over the uniform
   random nets, reported beside the goals (positive: slower nets retrain better).
Writes ``--doc`` (docs/benchmarks/quality.md), a JSON beside it and the accuracy/latency plot
(derived points, random points, both Pareto fronts).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_sweep import interleaved_latency_ms, load_tensors, spearman  # noqa: E402
from bench.machine import uptime  # noqa: E402


def retrain(arch, train, test, num_classes, recipe, seed):
    """The retrain stage's recipe on in-memory tensors: (test top-1, model)."""
    from densenas.arch import build_model
    from densenas.retrain import build_optimizer, build_scheduler, evaluate, train_epoch

    tx, ty = train
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes, dropout=recipe.dropout)
    opt = build_optimizer(model, recipe)
    steps = len(ty) // recipe.batch_size
    sched = build_scheduler(opt, recipe, steps)
    g = torch.Generator().manual_seed(seed)

    def batches():
        order = torch.randperm(len(ty), generator=g)
        for s in range(steps):
            idx = order[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            flip = torch.rand(len(idx), generator=g) < 0.5
            yield torch.where(flip[:, None, None, None], tx[idx].flip(-1), tx[idx]), ty[idx]

    for _ in range(recipe.epochs):
        train_epoch(model, batches(), opt, sched, recipe)
    vx, vy = test
    res = evaluate(model, ((vx[i:i + 500], vy[i:i + 500]) for i in range(0, len(vy), 500)))
    return res["top1"], model.eval()


def arch_of_choice(space, net, num_classes, path, ops):
    """The network a block path and one op index per mixed op (``net.mixed_ops`` order) select."""
    from densenas.arch import Arch

    heads = {tuple(m.edge): m.op_names[ops[k]] for k, m in enumerate(net.mixed_ops) if m.kind == "head"}
    stacks: dict[int, list[str]] = {}
    for k, m in enumerate(net.mixed_ops):
        if m.kind == "stack":
            stacks.setdefault(m.block, []).append(m.op_names[ops[k]])
    return Arch.from_path(space, path, [heads[e] for e in zip(path, path[1:])],
                          [stacks.get(j, []) for j in path[1:]], num_classes=num_classes)


def uniform_random_nets(space, num_classes, n, rng):
    """n distinct networks: path uniform over the space's block paths, each op uniform."""
    from densenas.supernet import SuperNet

    with torch.device("meta"):
        net = SuperNet(space, num_classes=num_classes)
    paths, out, seen = space.paths(), [], set()
    while len(out) < n:
        path = list(rng.choice(paths))
        ops = [rng.randrange(len(m.op_names)) for m in net.mixed_ops]
        arch = arch_of_choice(space, net, num_classes, path, ops)
        if arch.one_line() not in seen:
            seen.add(arch.one_line())
            out.append({"arch": arch, "path": path, "op_choice": ops})
    return out


def matched_random_nets(space, num_classes, cost_model, targets, per_target, band, rng, exclude=(),
                        max_draws=200_000):
    """Uniform random nets conditioned on the cost model's prediction: for each target cost, up to
    ``per_target`` distinct nets whose predicted cost lies within +-``band`` of it (rejection sampling
    from the same uniform draw as ``uniform_random_nets``, so within the band they are that draw's nets).
    Returns (nets, draws made); a target the space cannot reach in ``max_draws`` gets fewer nets."""
    from densenas.latency import ExpectedLatency
    from densenas.supernet import SuperNet

    with torch.device("meta"):
        net = SuperNet(space, num_classes=num_classes)
    latency = ExpectedLatency(net, cost_model, num_classes)
    want = {t: per_target for t in targets}
    paths, out, seen, draws = space.paths(), [], set(exclude), 0
    while any(want.values()) and draws < max_draws:
        draws += 1
        path = list(rng.choice(paths))
        ops = [rng.randrange(len(m.op_names)) for m in net.mixed_ops]
        cost = latency.path_cost(path, ops)
        hit = next((t for t, n in want.items() if n and abs(cost - t) <= band * t), None)
        if hit is None:
            continue
        arch = arch_of_choice(space, net, num_classes, path, ops)
        if arch.one_line() in seen:
            continue
        seen.add(arch.one_line())
        want[hit] -= 1
        out.append({"arch": arch, "path": path, "op_choice": ops, "predicted": cost, "target": hit})
    return out, draws


def pareto_front(points, lat="ms", acc="acc"):
    """Points not dominated (lower latency and higher accuracy), by latency."""
    pts = sorted(points, key=lambda p: (p[lat], -p[acc]))
    front, best = [], -1.0
    for p in pts:
        if p[acc] > best:
            front.append(p)
            best = p[acc]
    return front


def plot(derived, randoms, path, title, matched=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.6), dpi=110)
    ax.scatter([r["ms"] for r in randoms], [r["acc"] for r in randoms], marker="x", color="0.55",
               label=f"random nets ({len(randoms)})")
    if matched:
        ax.scatter([r["ms"] for r in matched], [r["acc"] for r in matched], marker="+", color="#1f77b4",
                   label=f"latency-matched random nets ({len(matched)})")
    ax.errorbar([d["ms"] for d in derived], [d["acc"] for d in derived],
                yerr=[d["acc_sd"] for d in derived], fmt="o", color="#d62728", label="derived (mean, sd of seeds)")
    for d in derived:
        ax.annotate(f"\u03bb={d['lambda']:g}", (d["ms"], d["acc"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    for pts, color, name in ((randoms, "0.4", "random front"), (derived, "#d62728", "derived front")):
        f = pareto_front(pts)
        ax.step([p["ms"] for p in f], [p["acc"] for p in f], where="post", color=color, lw=1, alpha=0.8,
                label=name)
    ax.set_xlabel("re-timed latency (ms, batch 1, 1 thread, interleaved)")
    ax.set_ylabel("test top-1")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs/sweep_tiny.yaml"))
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0, 3.0])
    ap.add_argument("--seeds", type=int, default=3, help="retrain seeds per derived net")
    ap.add_argument("--random", type=int, default=20, help="uniform random nets (retrained once each)")
    ap.add_argument("--matched", type=int, default=4,
                    help="beside the uniform draw: per distinct derived net, this many random nets drawn "
                         "uniformly but kept only within --band of its predicted cost (0: none)")
    ap.add_argument("--epochs", type=int, default=None, help="retrain epochs (default: sweep.retrain_epochs)")
    ap.add_argument("--cost", default="profile", help="'profile' (measure here), 'macs' or a latency-table JSON")
    ap.add_argument("--test-per-class", type=int, default=None, help="cap the test split (default: all of it)")
    ap.add_argument("--rounds", type=int, default=200, help="interleaved re-timing rounds")
    ap.add_argument("--band", type=float, default=0.10, help="random nets within this relative latency")
    ap.add_argument("--search-epochs", type=int, default=None, help="reduced runs: override search.epochs")
    ap.add_argument("--arch-steps", type=int, default=None, help="reduced runs: override search.arch_steps_per_epoch")
    ap.add_argument("--out", default=None, help="working directory (default: a temp dir)")
    ap.add_argument("--doc", default=str(REPO / "docs/benchmarks/quality.md"))
    ap.add_argument("--label", default="", help="a line stating what kind of run this is (e.g. reduced)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out: reuse its profiled table and finished sweep trials")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import ray

    from cluster.storage import open_store
    from densenas.arch import load_arch
    from densenas.latency import LatencyTable, describe_device, load_cost_model
    from jobs import split as split_stage
    from jobs import sweep as sweep_stage
    from jobs.context import StageContext
    from pipeline.config import load_config, resolve_space

    load_before = uptime()
    t_all = time.time()
    cfg = load_config(args.config, check=False)
    space = resolve_space(cfg.space)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-quality-"))
    split_store = open_store(str(work / "split"))
    data_cfg = cfg.data.model_copy(update={"executor": "local", "test_max_per_class": args.test_per_class})
    split_out = split_stage.run(data_cfg, None, StageContext.standalone(split_store))
    manifest = split_out.model_dump()
    search = cfg.search
    if args.search_epochs is not None or args.arch_steps is not None:
        search = search.model_copy(update={k: v for k, v in (("epochs", args.search_epochs),
                                                            ("arch_steps_per_epoch", args.arch_steps)) if v is not None})
    sweep = cfg.sweep.model_copy(update={"lambdas": args.lambdas, "taus": [search.tau]})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.time()
        if args.cost == "profile":
            from jobs import profile as profile_stage
            from jobs.profile import TABLE_KEY

            profile_store = open_store(str(work / "profile"))
            if not (args.resume and profile_store.exists(TABLE_KEY)):
                profile_stage.run(cfg.profile.model_copy(update={"num_classes": int(manifest["num_classes"])}),
                                  profile_stage.ProfileInputs(space), StageContext.standalone(profile_store))
            cost_model = LatencyTable.from_dict(profile_store.get_json(TABLE_KEY))
        else:
            cost_model = load_cost_model(args.cost, space)
        profile_s = time.time() - t0
        search = search.model_copy(update={"cost": "macs" if args.cost == "macs" else "profile"})
        t0 = time.time()
        inputs = sweep_stage.SweepInputs(space, split_out, split_store, search, cost_model)
        out = sweep_stage.run(sweep, inputs, StageContext.standalone(open_store(str(work / "sweep")), "sweep",
                                                                   checkpoint_store=open_store(str(work / "work")),
                                                                   resume=args.resume))
        out = out.model_dump()
        sweep_s = time.time() - t0
    finally:
        ray.shutdown()
    trials = sorted(out["trials"], key=lambda r: r["lambda"])

    nc = int(manifest["num_classes"])
    tr = load_tensors(manifest, split_store, "train", space)
    va = load_tensors(manifest, split_store, "val", space)
    train = (torch.cat([tr[0], va[0]]), torch.cat([tr[1], va[1]]))
    test = load_tensors(manifest, split_store, "test", space)
    recipe = sweep.train_recipe()
    if args.epochs is not None:
        recipe = recipe.model_copy(update={"epochs": args.epochs})
    t1 = time.time()
    derived, models = [], []
    for r in trials:
        arch = load_arch(json.loads((work / "work" / "trials" / r["trial"] / "derive" / "free" / "arch.json").read_text()))
        accs = []
        for seed in range(args.seeds):
            acc, model = retrain(arch, train, test, nc, recipe, seed)
            accs.append(acc)
            if seed == 0:
                models.append(model)
        derived.append({"lambda": r["lambda"], "trial": r["trial"], "accs": accs, "acc": statistics.fmean(accs),
                        "acc_sd": statistics.pstdev(accs), "predicted": r["predicted_latency"],
                        "sweep_accuracy": r.get("accuracy"), "one_line": arch.one_line(), "path": r.get("path"),
                        "search_metrics": r.get("search_metrics")})
        print(f"lambda {r['lambda']:g}: test top-1 {accs} ({arch.one_line()})", flush=True)
    rng = random.Random(0)
    randoms = []
    for k, c in enumerate(uniform_random_nets(space, nc, args.random, rng)):
        acc, model = retrain(c["arch"], train, test, nc, recipe, 0)
        models.append(model)
        randoms.append({"acc": acc, "one_line": c["arch"].one_line(), "path": c["path"]})
        print(f"random {k}: test top-1 {acc:.4f}", flush=True)
    retrain_s = time.time() - t1
    t1 = time.time()
    matched, matched_draws = [], 0
    if args.matched:
        targets = {}
        for d in derived:
            targets.setdefault(d["one_line"], d["predicted"])
        nets, matched_draws = matched_random_nets(space, nc, cost_model, sorted(targets.values()), args.matched,
                                                  args.band, random.Random(1),
                                                  exclude=[r["one_line"] for r in randoms])
        for k, c in enumerate(nets):
            acc, model = retrain(c["arch"], train, test, nc, recipe, 0)
            models.append(model)
            matched.append({"acc": acc, "one_line": c["arch"].one_line(), "path": c["path"],
                            "predicted": c["predicted"], "target": c["target"]})
            print(f"matched random {k} (predicted {c['predicted']:.4g}): test top-1 {acc:.4f}", flush=True)
    matched_s = time.time() - t1
    times = interleaved_latency_ms(models, space.input_size, space.in_channels, args.rounds)
    for d, ms in zip(derived, times):
        d["ms"] = ms
    for r, ms in zip(randoms + matched, times[len(derived):]):
        r["ms"] = ms
    rho = spearman([d["lambda"] for d in derived], [d["ms"] for d in derived])
    rho_pred = spearman([d["lambda"] for d in derived], [d["predicted"] for d in derived])
    wins = 0
    for d in derived:
        band = [r for r in randoms if abs(r["ms"] - d["ms"]) <= args.band * d["ms"]]
        d["random_in_band"] = len(band)
        d["random_median_acc"] = statistics.median([r["acc"] for r in band]) if band else None
        d["beats_random_median"] = bool(band) and d["acc"] > d["random_median_acc"]
        wins += d["beats_random_median"]
    wins_matched = 0
    for d in derived:  # the uniform draw and the matched draw together, in the same re-timed band
        band = [r for r in randoms + matched if abs(r["ms"] - d["ms"]) <= args.band * d["ms"]]
        d["all_random_in_band"] = len(band)
        d["all_random_median_acc"] = statistics.median([r["acc"] for r in band]) if band else None
        d["beats_all_random_median"] = bool(band) and d["acc"] > d["all_random_median_acc"]
        wins_matched += d["beats_all_random_median"]
    racc = [r["acc"] for r in randoms]
    spread = {"min": min(racc), "median": statistics.median(racc), "max": max(racc), "sd": statistics.pstdev(racc)}
    # Lambda can only buy latency with accuracy where slower nets retrain better; this says whether the
    # setting has that trade-off at all, independently of the search.
    tradeoff = spearman([r["ms"] for r in randoms], racc) if len(randoms) >= 3 else None
    total_s = time.time() - t_all
    load_after = uptime()

    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    png = doc.with_suffix(".png")
    plot(derived, randoms, png, f"{space.name}: lambda sweep vs {len(randoms)} uniform random nets", matched)
    dev = describe_device("cpu", 1)
    spearman_ok = rho <= -0.9
    wins_ok = wins >= 4 if len(derived) >= 5 else None
    time_ok = total_s <= 3600
    issue_s = total_s - matched_s  # the issue's benchmark has no matched draw (its re-timing share stays in)
    cmd = (f".venv/bin/python bench/bench_quality.py --lambdas {' '.join(f'{v:g}' for v in args.lambdas)} "
           f"--seeds {args.seeds} --random {args.random} --cost {args.cost}"
           + (f" --epochs {args.epochs}" if args.epochs is not None else "")
           + (f" --test-per-class {args.test_per_class}" if args.test_per_class else "")
           + (f" --search-epochs {args.search_epochs}" if args.search_epochs else "")
           + (f" --arch-steps {args.arch_steps}" if args.arch_steps else "")
           + f" --matched {args.matched}"
           + (" --resume" if args.resume else ""))
    lines = [
        "## Search quality: the lambda sweep vs uniform random nets (bench/bench_quality.py)",
        "",
        *( [f"**{args.label}**", ""] if args.label else []),
        f"Machine: {dev.get('name')}, 2 cores shared with other jobs; torch {torch.__version__}, Ray {ray.__version__}. "
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Load before: `{load_before}`; after: `{load_after}`.",
        "",
        f"Command: `{cmd}`.",
        "",
        f"Setup: `{args.config}`: space `{space.name}`, split {manifest['counts']}, search {search.epochs} epochs "
        f"({search.warmup_epochs} warm-up, shared), {search.arch_steps_per_epoch} arch steps per search epoch, "
        f"cost model {cost_model.units}. Retrain recipe (densenas.retrain, the retrain stage's): "
        f"{recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr}, label smoothing {recipe.label_smoothing}, "
        f"on search-train + search-val ({len(train[1])} images) with flips; test: {len(test[1])} held-out images.",
        f"Wall time: profile {profile_s:.0f} s, sweep {sweep_s:.0f} s, retrains {retrain_s:.0f} s, total "
        f"{total_s:.0f} s ({total_s / 60:.1f} min; goal <= 60 min: {'met' if time_ok else 'MISSED'})"
        + (f"; of which the matched draw's {len(matched)} retrains {matched_s:.0f} s, so {issue_s:.0f} s "
           f"({issue_s / 60:.1f} min) without them" if args.matched else "") + ".",
        "",
        "| lambda | predicted | re-timed ms | test top-1 per seed | mean | random nets within +-10 % | their median | beats it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in derived:
        lines.append(f"| {d['lambda']:g} | {d['predicted']:.4g} | {d['ms']:.3f} | "
                     f"{', '.join(f'{a:.4f}' for a in d['accs'])} | {d['acc']:.4f} | {d['random_in_band']} | "
                     f"{'-' if d['random_median_acc'] is None else format(d['random_median_acc'], '.4f')} | "
                     f"{'yes' if d['beats_random_median'] else 'no'} |")
    lines += [
        "",
        f"Spearman(lambda, re-timed latency) = **{rho:+.2f}** (goal <= -0.9: {'met' if spearman_ok else 'MISSED'}); "
        f"with the predicted cost: {rho_pred:+.2f}.",
        f"Derived beats the random median in its latency band in **{wins} of {len(derived)}** points "
        f"(goal >= 4 of 5: {'met' if wins_ok else 'MISSED' if wins_ok is not None else 'n/a'}); a point with no random "
        "net in its band counts as not beaten.",
        f"Random nets' test top-1: min {spread['min']:.4f}, median {spread['median']:.4f}, max {spread['max']:.4f}, "
        f"sd {spread['sd']:.4f}; latency {min(r['ms'] for r in randoms):.3f}-{max(r['ms'] for r in randoms):.3f} ms.",
    ]
    if tradeoff is not None:
        lines += [
            "",
            f"Trade-off check: Spearman(re-timed latency, test top-1) over the uniform random nets = {tradeoff:+.2f}. "
            "Lambda trades accuracy for latency only where slower nets retrain better (a positive value). At or "
            "below zero, the fastest nets are already among the most accurate: lambda 0 then derives a fast net and "
            "the Spearman(lambda, latency) goal has nothing to measure in this setting.",
        ]
    if args.matched:
        lines += [
            "",
            f"Beside the issue's uniform draw: the matched draw, {len(matched)} random nets from the same uniform "
            f"distribution kept only when their predicted cost lies within +-{args.band:.0%} of a derived net's "
            f"({args.matched} per distinct derived net; {matched_draws} draws), retrained and re-timed with the "
            "rest. Derived against the median of all random nets (both draws) within +-10 % of its re-timed latency:",
            "",
            "| lambda | re-timed ms | mean top-1 | random nets within +-10 % (both draws) | their median | beats it |",
            "|---|---|---|---|---|---|",
        ]
        for d in derived:
            lines.append(f"| {d['lambda']:g} | {d['ms']:.3f} | {d['acc']:.4f} | {d['all_random_in_band']} | "
                         f"{'-' if d['all_random_median_acc'] is None else format(d['all_random_median_acc'], '.4f')} | "
                         f"{'yes' if d['beats_all_random_median'] else 'no'} |")
        macc = [r["acc"] for r in matched] or [float("nan")]
        lines += ["", f"Derived beats it in **{wins_matched} of {len(derived)}** points (not the issue's goal, which "
                      f"is judged on the uniform draw above). Matched nets' test top-1: min {min(macc):.4f}, median "
                      f"{statistics.median(macc):.4f}, max {max(macc):.4f}."]
    lines += ["", f"![accuracy vs latency]({png.name})", ""]
    doc.write_text("\n".join(lines))
    doc.with_suffix(".json").write_text(json.dumps({
        "command": cmd, "label": args.label, "load_before": load_before, "load_after": load_after,
        "seconds": {"profile": profile_s, "sweep": sweep_s, "retrain": retrain_s, "matched_retrain": matched_s,
                    "total": total_s, "total_without_matched": issue_s},
        "recipe": recipe.model_dump(mode="json"), "counts": manifest["counts"], "derived": derived,
        "random": randoms, "random_spread": spread, "spearman_retimed": rho, "spearman_predicted": rho_pred,
        "tradeoff_spearman": tradeoff, "wins": wins, "matched": matched, "matched_draws": matched_draws,
        "wins_with_matched": wins_matched,
        "sweep_trials": trials, "work_dir": str(work), "pid": os.getpid()}, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
