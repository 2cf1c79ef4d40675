"""Benchmark of the DenseNAS search (not a test): writes docs/benchmarks/search.md.

Three parts:

1. ``lambda``: short searches on the tiny config (configs/search_tiny.yaml data and space) that share
   one weights-only warm-up, then search with lambda = 0, medium, large. The derived architecture's
   predicted cost must fall as lambda rises.
2. ``overhead``: the super network's weight step (``Searcher.weight_step``: sampling, every edge
   active and weighted, SGD, schedule) vs the same sampled computation written as a plain static
   module (the floor), on the tiny space. Goal: <= 1.3x.
3. ``format``: interleaved A/B of the same steps on an NHWC and an NCHW super network (one process,
   same weights), ImageNet space, both inputs: which memory format is faster here.
4. ``imagenet``: our weight and architecture steps on the MBConv ImageNet space (100 classes) at
   224x224 batch 8 and 64x64 batch 32, each case in its own subprocess (peak RSS per case), 9 steps
   after 2 warm-up steps, each alternated with a standalone DenseNAS-C step; min / p25 / median and the
   ratio to the standalone step. The comparison with the authors' code (goal: >= 1.5x faster, lower
   peak RSS) is measured side by side, both codes in one process, by bench/bench_vs_authors.py
   (docs/benchmarks/vs_authors.md); this part no longer compares with constants from another day.

    python bench/bench_search.py                      # everything (about 10-15 min on 2 cores)
    python bench/bench_search.py --only overhead      # one part (repeatable)
    python bench/bench_search.py --threads 2          # torch threads (default: 2, as the reference)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from densenas.latency import describe_device  # noqa: E402

OUT = REPO / "docs" / "benchmarks" / "search.md"
# The authors' step times are no longer constants here: bench/bench_vs_authors.py runs their code
# (JaminFong/DenseNAS) and ours side by side in one process (docs/benchmarks/vs_authors.md).


def machine() -> str:
    cpu = describe_device("cpu")["name"]
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def load() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- 1. lambda sweep
def bench_lambda(threads: int, epochs: int, lambdas: list[float]) -> list[str]:
    from densenas.search import (SearchRunConfig, SearchConfig, Searcher, _load_data, iterate_batches,
                                 random_flip)
    from densenas.space import load_space
    from densenas.supernet import SuperNet
    import io

    torch.set_num_threads(threads)
    run = SearchRunConfig.from_yaml(REPO / "configs" / "search_tiny.yaml")
    data = run.data.model_copy(update={"samples_per_class": 150})
    tx, ty, vx, vy, classes = _load_data(data)
    warm = 2
    base = run.search.model_copy(update={"epochs": warm + epochs, "warmup_epochs": warm})
    base = SearchConfig.model_validate({**base.dump(), "arch": {"lr": 1e-2}})
    steps = len(ty) // base.batch_size
    space = load_space(run.space)

    def epoch(s: Searcher) -> dict:
        e = s.epoch
        return s.run_epoch(iterate_batches(tx, ty, base.batch_size, base.seed, e, "train",
                                           transform=random_flip(base.seed, e, "train")),
                           iterate_batches(vx, vy, base.batch_size, base.seed, e, "val"))

    torch.manual_seed(0)
    t0 = time.time()
    s = Searcher(SuperNet(space, classes), base, steps_per_epoch=steps, log=lambda m: print("  " + m, flush=True))
    while s.epoch < warm:
        epoch(s)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    rows = []
    for lam in lambdas:
        cfg = SearchConfig.model_validate({**base.dump(), "lambda": lam})
        s = Searcher(SuperNet(space, classes), cfg, steps_per_epoch=steps, log=lambda m: print("  " + m, flush=True))
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        state["config"] = cfg.dump()
        s.load_state_dict(state)
        print(f"lambda {lam}:", flush=True)
        while s.epoch < cfg.epochs:
            rec = epoch(s)
        rows.append((lam, rec))
    elapsed = time.time() - t0
    preds = [r["predicted_latency"] for _, r in rows]
    falls = all(a > b for a, b in zip(preds, preds[1:]))
    lines = [
        "### Latency trade-off: lambda sweep on the tiny space",
        "",
        f"`configs/search_tiny.yaml` space and data (150 images per class, {len(ty)} search-train / {len(vy)} "
        f"search-val), one shared weights-only warm-up of {warm} epochs, then {epochs} search epochs per lambda "
        f"(arch lr 1e-2, tau {base.tau}), cost: MACs. {elapsed:.0f} s in all, {threads} thread(s).",
        "",
        "| lambda | derived path | predicted MMACs | E[MMACs] | val acc | derived (one line) |",
        "|---|---|---|---|---|---|",
    ]
    for lam, r in rows:
        lines.append(f"| {lam} | {r['derived']['path']} | {r['predicted_latency']:.3f} | {r['expected_latency']:.3f} "
                     f"| {r['val_acc']:.3f} | `{_one_line(r)}` |")
    lines += ["", f"Predicted cost falls as lambda rises: **{'yes' if falls else 'NO'}**.", ""]
    return lines


def _one_line(rec: dict) -> str:
    parts = []
    for b in rec["derived"]["blocks"]:
        ops = [b["head"]] + b["stack"]
        parts.append(f"{b['c_out']}:s{b['stride']} " + " ".join(o.replace("mbconv_", "") for o in ops))
    return " | ".join(parts)


# --------------------------------------------------------------------------- 2. overhead vs static
class StaticSampledNet(nn.Module):
    """The computation of one weight step's sampled super network as a plain module: the chosen op
    of every mixed op (sharing the super network's weights), every edge with its p as a constant."""

    def __init__(self, net: nn.Module, choices) -> None:
        super().__init__()
        space = net.space
        with torch.no_grad():
            probs = {e: float(p) for e, p in net.edge_probs().items()}
        self.stem, self.first_layer = net.stem, net.first_layer
        self.ops = nn.ModuleList()
        self.plan: list[tuple[list[tuple[int, float, int]], list[int]]] = []
        k = 0
        for j in range(1, len(space.blocks)):
            heads = []
            for (i, _, _) in space.in_edges(j):
                self.ops.append(net.mixed_ops[k].ops[choices[k][0]])
                heads.append((i, probs[(i, j)], len(self.ops) - 1))
                k += 1
            stack = []
            for _ in range(space.blocks[j].n_stacking):
                self.ops.append(net.mixed_ops[k].ops[choices[k][0]])
                stack.append(len(self.ops) - 1)
                k += 1
            self.plan.append((heads, stack))
        self.finals = [(b, probs[(b, space.end_node)]) for b in space.final_blocks]
        self.final_convs = net.final_convs if space.last_conv_channels is not None else None
        self.classifier = net.classifier if space.last_conv_channels is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.first_layer(self.stem(x))]
        for heads, stack in self.plan:
            h = sum(p * self.ops[o](outs[i]) for i, p, o in heads)
            for o in stack:
                h = self.ops[o](h)
            outs.append(h)
        z = sum(p * self.final_convs[f"block_{b}"](outs[b]) for b, p in self.finals)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def bench_overhead(threads: int, repeats: int) -> list[str]:
    from densenas.search import SearchConfig, Searcher
    from densenas.supernet import SuperNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = SuperNet("tiny_mbconv", 10)
    cfg = SearchConfig(epochs=1000, warmup_epochs=0, batch_size=64)
    s = Searcher(net, cfg, steps_per_epoch=1000, log=None)
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    t_super, t_static = [], []
    for rep in range(repeats + 2):
        # The static net replays exactly the ops the super network's next step will sample.
        s._epoch_step = rep
        choices = net.sample_choices("alpha1", s._reseed("weight"))
        s._epoch_step = rep
        static = StaticSampledNet(net, choices)
        params = [p for p in static.parameters()]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=4e-5)
        t = time.perf_counter()
        s.weight_step((x, y))
        a = time.perf_counter() - t
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(static(x), y).backward()
        opt.step()
        b = time.perf_counter() - t
        if rep >= 2:
            t_super.append(a)
            t_static.append(b)
    ms, mt = statistics.median(t_super), statistics.median(t_static)
    ratio = ms / mt
    return [
        "### Super-network weight step vs the static sampled network (tiny space)",
        "",
        f"`tiny_mbconv`, 10 classes, batch 64 at 32x32, {threads} thread(s), median of {repeats} alternating "
        "steps. Static: the ops sampled for that step as a plain module with the edge weights as constants "
        "(fwd + bwd + SGD on its parameters).",
        "",
        "| step | median s | img/s |",
        "|---|---|---|",
        f"| super network `Searcher.weight_step` | {ms:.4f} | {64 / ms:.0f} |",
        f"| static sampled network | {mt:.4f} | {64 / mt:.0f} |",
        "",
        f"Ratio **{ratio:.2f}x** (goal <= 1.3x: **{'met' if ratio <= 1.3 else 'missed'}**).",
        "",
    ]


# --------------------------------------------------------------------------- 3. ImageNet step speed
def _pct(values: list[float], q: float) -> float:
    """Low percentile (nearest rank): on a shared machine the fast steps are the ones least disturbed."""
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def imagenet_case(kind: str, size: int, batch: int, threads: int, warmup: int, repeats: int,
                  channels_last: bool = True) -> dict:
    """Runs inside its own subprocess: build, warm up, time, report peak RSS.

    ``channels_last`` is the super network's format; the standalone DenseNAS-C stays NCHW (a fixed
    normaliser, the format the authors' code runs it in)."""
    from densenas.search import SearchConfig, Searcher
    from densenas.supernet import SuperNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t = time.perf_counter()
    net = SuperNet("imagenet_mbconv", 100, channels_last=channels_last)
    build = time.perf_counter() - t
    s = Searcher(net, SearchConfig(epochs=10, warmup_epochs=0), steps_per_epoch=100, log=None)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
    step = s.weight_step if kind == "weight" else s.arch_step
    # The standalone DenseNAS-C (100 classes) step, timed alternately with the search step: the
    # ratio search/standalone is what the neighbours' load moves least.
    from densenas.arch import build_model

    torch.manual_seed(0)
    standalone = build_model("densenas_c_cvpr2020", num_classes=100)
    opt = torch.optim.SGD(standalone.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    xs = x

    def standalone_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(standalone(xs), y).backward()
        opt.step()

    times, base, loads = [], [], []
    for n in range(warmup + repeats):
        t = time.perf_counter()
        step((x, y))
        a = time.perf_counter() - t
        t = time.perf_counter()
        standalone_step()
        b = time.perf_counter() - t
        if n >= warmup:
            times.append(a)
            base.append(b)
            loads.append(os.getloadavg()[0])
        print(f"  step {n}: {kind} {a:.2f} s, standalone {b:.2f} s, {load()}", file=sys.stderr, flush=True)
    ratios = [a / b for a, b in zip(times, base)]
    return {"kind": kind, "size": size, "batch": batch, "channels_last": channels_last,
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "p25_s": _pct(times, 0.25), "build_s": build,
            "standalone_s": statistics.median(base), "standalone_min_s": min(base),
            "ratio": _pct(ratios, 0.25), "ratio_median": statistics.median(ratios),
            "load_min": min(loads), "load_max": max(loads),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "weights": sum(p.numel() for p in net.weight_parameters()),
            "arch_scalars": sum(p.numel() for p in net.arch_parameters())}


def bench_imagenet(threads: int, warmup: int, repeats: int, channels_last: bool) -> list[str]:
    rows = []
    for size, batch in ((224, 8), (64, 32)):
        for kind in ("weight", "arch"):
            print(f"imagenet {kind} step {size}x{size} batch {batch} ...", flush=True)
            cmd = [sys.executable, __file__, "--case", f"{kind}:{size}:{batch}", "--threads", str(threads),
                   "--warmup", str(warmup), "--repeats", str(repeats)] + ([] if channels_last else ["--nchw"])
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=REPO, timeout=1800)
            if res.returncode:
                raise RuntimeError(f"case {kind} {size} {batch} failed (its stderr is above)")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["load"] = load()
            print(f"  {r}", flush=True)
            rows.append(r)
    lines = [
        "### MBConv ImageNet space, 100 classes: our search step speed",
        "",
        f"{rows[0]['weights']:,} weights + {rows[0]['arch_scalars']} architecture parameters; each case in its own "
        f"subprocess, {threads} thread(s), super network {'channels_last (NHWC)' if channels_last else 'NCHW'}, "
        f"{repeats} steps after {warmup} warm-up steps, compute only. Each case also times the standalone "
        "DenseNAS-C (100 classes, fwd + bwd + SGD, NCHW) alternately with the search step: the ratio search / "
        "standalone moves far less with the neighbours' load than raw seconds.",
        "",
        "The comparison with the authors' code (goal: >= 1.5x faster, lower peak RSS) is measured side by side, "
        "both codes in one process, by `python bench/bench_vs_authors.py` (docs/benchmarks/vs_authors.md); it is "
        "no longer made here against constants measured on another day.",
        "",
        "| step | input | min / p25 / median s | standalone median s | search / standalone (p25; median) "
        "| peak RSS GB | 1-min load during steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['size']}x{r['size']} b{r['batch']} | {r['min_s']:.2f} / {r['p25_s']:.2f} / "
                     f"{r['median_s']:.2f} | {r['standalone_s']:.2f} | {r['ratio']:.2f}x; {r['ratio_median']:.2f}x "
                     f"| {r['peak_rss_gb']:.2f} | {r['load_min']:.1f}-{r['load_max']:.1f} |")
    return lines + [""]


def format_case(size: int, batch: int, threads: int, repeats: int) -> dict:
    """Runs inside its own subprocess: the same search steps on an NHWC and an NCHW super network (same
    seed, same weights), interleaved step by step (order alternating), so both see the same load."""
    from densenas.search import SearchConfig, Searcher
    from densenas.supernet import SuperNet

    torch.set_num_threads(threads)
    searchers = {}
    for cl in (True, False):
        torch.manual_seed(0)
        searchers[cl] = Searcher(SuperNet("imagenet_mbconv", 100, channels_last=cl),
                                 SearchConfig(epochs=10, warmup_epochs=0), steps_per_epoch=100, log=None)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
    out = {}
    for kind in ("weight", "arch"):
        t_fmt: dict[bool, list[float]] = {True: [], False: []}
        for n in range(repeats + 1):  # step 0 of each: warm-up
            for cl in ((True, False) if n % 2 else (False, True)):
                s = searchers[cl]
                t = time.perf_counter()
                (s.weight_step if kind == "weight" else s.arch_step)((x, y))
                if n:
                    t_fmt[cl].append(time.perf_counter() - t)
        out[kind] = {"nhwc": t_fmt[True], "nchw": t_fmt[False], "load": load()}
        print(f"  {kind} {size} b{batch}: {out[kind]}", file=sys.stderr, flush=True)
    return out


def bench_format(threads: int, repeats: int) -> list[str]:
    lines = [
        "### Memory format: NHWC (channels_last) vs NCHW super network, interleaved A/B",
        "",
        f"Both formats in one process, same weights, steps interleaved (order alternating), {threads} thread(s), "
        f"{repeats} steps each after 1 warm-up. The speed-up is min(NCHW) / min(NHWC).",
        "",
        "| step | input | NHWC min / median s | NCHW min / median s | NHWC speed-up | load after |",
        "|---|---|---|---|---|---|",
    ]
    for size, batch in ((224, 8), (64, 32)):
        cmd = [sys.executable, __file__, "--format-case", f"{size}:{batch}", "--threads", str(threads),
               "--repeats", str(repeats)]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, timeout=1800)
        if res.returncode:
            raise RuntimeError(f"format case {size} {batch} failed (its stderr is above)")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        for kind in ("weight", "arch"):
            a, b = r[kind]["nhwc"], r[kind]["nchw"]
            lines.append(f"| {kind} | {size}x{size} b{batch} | {min(a):.2f} / {statistics.median(a):.2f} "
                         f"| {min(b):.2f} / {statistics.median(b):.2f} | **{min(b) / min(a):.2f}x** | {r[kind]['load']} |")
    return lines + [""]


def _read_blocks() -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    if not OUT.exists():
        return blocks
    current = None
    for line in OUT.read_text().splitlines():
        if line.startswith("<!-- part:"):
            current = line[len("<!-- part:"):-len(" -->")]
            blocks[current] = []
        elif line.startswith("<!-- end:"):
            current = None
        elif current is not None:
            blocks[current].append(line)
    return blocks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=["lambda", "overhead", "format", "imagenet"], default=[])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--lambda-epochs", type=int, default=3)
    p.add_argument("--lambdas", type=float, nargs=3, default=[0.0, 0.5, 5.0])
    p.add_argument("--nchw", action="store_true",
                   help="ImageNet cases with the super network in NCHW (default: channels_last, SuperNet's default)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one ImageNet case in a subprocess
    p.add_argument("--format-case", help=argparse.SUPPRESS)  # internal: one A/B format case
    args = p.parse_args(argv)
    if args.case:
        kind, size, batch = args.case.split(":")
        print(json.dumps(imagenet_case(kind, int(size), int(batch), args.threads, args.warmup, args.repeats,
                                       not args.nchw)))
        return 0
    if args.format_case:
        size, batch = args.format_case.split(":")
        print(json.dumps(format_case(int(size), int(batch), args.threads, args.repeats)))
        return 0
    parts = args.only or ["lambda", "overhead", "format", "imagenet"]
    cmd = "python bench/bench_search.py" + "".join(f" --only {o}" for o in args.only) + f" --threads {args.threads}" + (" --nchw" if args.nchw else "")
    # Each part keeps its own block in the section file, so `--only X` refreshes X and keeps the others.
    blocks = _read_blocks()
    head = f"Machine: {machine()}; {load()} at start (the development machines are shared: timings move with the neighbours' load)."
    if "lambda" in parts:
        blocks["lambda"] = [head, "Command: `" + cmd + "`.", ""] + bench_lambda(args.threads, args.lambda_epochs, args.lambdas)
    if "overhead" in parts:
        blocks["overhead"] = [head, "Command: `" + cmd + "`.", ""] + bench_overhead(args.threads, max(args.repeats, 15))
    if "format" in parts:
        blocks["format"] = [head, "Command: `" + cmd + "`.", ""] + bench_format(args.threads, min(args.repeats, 5))
    if "imagenet" in parts:
        blocks["imagenet"] = [head, "Command: `" + cmd + "`.", ""] + bench_imagenet(args.threads, args.warmup, args.repeats, not args.nchw)
    lines = ["## Search (densenas.search)", ""]
    for name in ("lambda", "overhead", "format", "imagenet", "notes"):  # notes: hand-written, kept
        if name in blocks:
            lines += [f"<!-- part:{name} -->"] + blocks[name] + [f"<!-- end:{name} -->", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
